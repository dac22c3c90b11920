"""The built-in algorithms, each a plugin module: `ssl_imwa.algorithm.load_builtin_algorithms` imports
every module here, so adding one is a file in this folder plus its `configs/algorithm/<name>.yaml`."""
