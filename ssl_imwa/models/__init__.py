"""Model registry and factory: backbones return pooled features, heads are separate."""
from ssl_imwa.models import cnn, wrn  # noqa: F401  (registers the built-in backbones)
from ssl_imwa.models.classifier import Classifier
from ssl_imwa.models.factory import create_model, list_models, register_model

__all__ = ["Classifier", "create_model", "list_models", "register_model"]
