"""`create_model(name, num_classes, ...)`: backbone from the registry plus a linear head."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ssl_imwa.models.classifier import Classifier
from ssl_imwa.registry import Registry

BackboneFactory = Callable[..., nn.Module]
_BACKBONES: Registry[BackboneFactory] = Registry("model")


def register_model(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a backbone factory. It must return a module with a `feature_dim` attribute."""
    return _BACKBONES.register(name)


def list_models() -> list[str]:
    return _BACKBONES.names()


def create_model(name: str, num_classes: int, in_channels: int = 3, bn_momentum: float = 0.001) -> Classifier:
    """Build backbone `name` with a standard linear head named 'logits'.

    `bn_momentum` uses PyTorch's convention (weight of the new batch statistic);
    DASO uses 0.1, ACR/FixMatch 0.001 (their official configs).
    """
    backbone = _BACKBONES.get(name)(in_channels=in_channels, bn_momentum=bn_momentum)
    return Classifier(backbone, num_classes)
