"""The built-in algorithms, each a plugin module: the algorithm registry imports every
module here on first lookup (`ssl_imwa.registry`), so adding one is a file in this folder plus its `configs/algorithm/<name>.yaml`."""
