"""Algorithms are found by name; external plugins are imported from modules named in the config."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ssl_imwa.registry import Registry

if TYPE_CHECKING:
    from algorithms.base import Algorithm

_ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: `@register_algorithm("fixmatch")` makes `algorithm=fixmatch` find the class."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        cls.name = name
        return _ALGORITHMS.register(name)(cls)

    return decorator


def get_algorithm(name: str) -> type[Algorithm]:
    return _ALGORITHMS.get(name)


def list_algorithms() -> list[str]:
    return _ALGORITHMS.names()


def load_plugins(modules: list[str]) -> None:
    """Import each plugin module so its `@register_algorithm` runs. Import errors propagate."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"plugins: could not import plugin module '{module}': {error}") from error
