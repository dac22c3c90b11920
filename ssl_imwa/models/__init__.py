"""Backbones and the classifier around them: backbones return pooled features, heads are separate.

The built-in backbones (`backbones/`) are plugins, imported by the backbone registry on first lookup, not here.
"""
from ssl_imwa.models.classifier import Classifier
from ssl_imwa.models.config import ModelConfig
from ssl_imwa.models.factory import (
    backbone_options,
    create_model,
    list_models,
    register_model,
)

__all__ = ["Classifier", "ModelConfig", "backbone_options", "create_model", "list_models", "register_model"]
