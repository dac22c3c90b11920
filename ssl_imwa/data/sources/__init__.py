"""The built-in datasets, each a plugin module: the dataset registry imports every module here on first
lookup (`ssl_imwa.data.dataset`), so adding one is a file in this folder plus its `configs/dataset/<name>.yaml`."""
