"""The backbone contract: `@register_model(name, config=...)` and `create_model(name, num_classes, in_channels, **options)`.

A backbone is a callable taking `in_channels`, `bn_momentum` and keyword options of its own, and
returning a module with a `feature_dim` attribute whose forward gives pooled features [N, feature_dim].
Its own options, if any, are the fields of the dataclass registered with it: the run's
`model.<option>` keys, typed and checked by name before anything is built, and passed through by
`create_model` as timm passes `**kwargs`. The built-in backbones (`backbones/`) are plugins like any
other: the registry imports every module of that package on first lookup.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ssl_imwa.models.classifier import Classifier
from ssl_imwa.models.config import ENGINE_KEYS, ModelConfig
from ssl_imwa.registry import Registry

BUILTIN_PACKAGE = "ssl_imwa.models.backbones"
SHARED_KEYS = tuple(field.name for field in dataclasses.fields(ModelConfig))

BackboneFactory = Callable[..., nn.Module]
_BACKBONES: Registry[BackboneFactory] = Registry("model", BUILTIN_PACKAGE)


def register_model(name: str, config: type | None = None) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a backbone factory under `name` (the value of `model.name`).

    It is called with `in_channels`, `bn_momentum` and, when `config` is given, the fields of that
    dataclass (its own options: `model.<option>`, typed by the dataclass; a `validate()` method on it
    runs before anything is built). It returns a module with a `feature_dim` attribute.
    """
    if config is not None:
        if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            raise TypeError(f"@register_model('{name}', config={config!r}): expected a dataclass of its options")
        clash = [field.name for field in dataclasses.fields(config) if field.name in SHARED_KEYS]
        if clash:
            raise TypeError(f"@register_model('{name}'): option {clash[0]} is a key every backbone shares "
                            f"(model has {', '.join(SHARED_KEYS)}); give it another name")
    return _BACKBONES.register(name, config=config)


def list_models() -> list[str]:
    return _BACKBONES.names()


def get_backbone(name: str) -> BackboneFactory:
    """The backbone registered as `name`; a ValueError naming `model.name` and the choices otherwise."""
    if name not in _BACKBONES:
        raise ValueError(f"model.name='{name}': expected one of {', '.join(list_models())}")
    return _BACKBONES.get(name)


def backbone_config(name: str) -> type | None:
    """The dataclass of `name`'s own options (None: it takes none beyond `in_channels` and `bn_momentum`)."""
    get_backbone(name)
    return _BACKBONES.config_of(name)


def create_model(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> Classifier:
    """Backbone `name` with a standard linear head named 'logits'.

    `options` go to the backbone as they are, as timm passes `**kwargs`: `bn_momentum` (PyTorch's
    convention, the weight of the new batch statistic; DASO uses 0.1, ACR/FixMatch 0.001) and the
    backbone's own options (`backbone_options(cfg.model)` gives a run's).
    """
    backbone = get_backbone(name)(in_channels=in_channels, **options)
    return Classifier(backbone, num_classes)


def backbone_options(model: Any) -> dict[str, Any]:
    """The keyword options a run's (validated) `model` section gives its backbone: bn_momentum and its own."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(model)
    return {key: value for key, value in values.items() if key not in ENGINE_KEYS}


def typed_model_section(section: Any) -> Any:
    """The config's `model` section, checked: the shared keys typed by ModelConfig, the others by the
    backbone's options dataclass (then its `validate()`). An unknown key or a wrong type raises an error
    naming `model.<key>`; an unknown backbone, a ValueError naming `model.name`."""
    from omegaconf import OmegaConf

    from ssl_imwa.validation import typed_section

    values = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    shared = typed_section("model", ModelConfig, {key: values[key] for key in SHARED_KEYS if key in values})
    own = {key: value for key, value in values.items() if key not in SHARED_KEYS}
    options_class = backbone_config(shared.name)
    if options_class is None:
        if own:
            raise ValueError(f"model.{next(iter(own))}: unknown key; {shared.name} takes no options of its own "
                             f"(model has {', '.join(SHARED_KEYS)})")
        return shared
    options = typed_section("model", options_class, own)
    check = getattr(OmegaConf.to_object(options), "validate", None)
    if callable(check):
        check()
    return OmegaConf.create({**OmegaConf.to_container(shared), **OmegaConf.to_container(options)})
