"""The built-in backbones, each a plugin module: the backbone registry imports every module here on first
lookup (`ssl_imwa.models.factory`), so adding one is a file in this folder plus its `configs/model/<name>.yaml`."""
