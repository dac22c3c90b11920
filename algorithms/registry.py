"""Algorithms are found by name; external plugins are imported from modules named in the config."""
from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ssl_imwa.registry import Registry

if TYPE_CHECKING:
    from algorithms.base import Algorithm

_ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: `@register_algorithm("fixmatch")` makes `algorithm=fixmatch` find the class."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        from algorithms.base import Algorithm

        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm('{name}') decorates {cls!r}: expected a subclass of "
                            "algorithms.Algorithm")
        if cls.losses is Algorithm.losses:
            raise TypeError(f"algorithm '{name}' ({cls.__module__}.{cls.__qualname__}) does not define "
                            "losses(self, batch, model, teacher, step), which returns a dict with the 'loss' to "
                            "minimise (docs/adding_an_algorithm.md)")
        cls.name = name
        return _ALGORITHMS.register(name)(cls)

    return decorator


def get_algorithm(name: str) -> type[Algorithm]:
    return _ALGORITHMS.get(name)


def list_algorithms() -> list[str]:
    return _ALGORITHMS.names()


def load_plugins(modules: list[str]) -> None:
    """Import each plugin module so its `@register_algorithm` runs.

    Any error while importing one (a missing module, a syntax error, an exception in its body)
    becomes an ImportError naming the module and the file and line where it went wrong.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise ImportError(f"plugins: could not import plugin module '{module}': {_where(error)}"
                              f"{type(error).__name__}: {error}") from error


def _where(error: Exception) -> str:
    """`file:line: ` of the failing line inside the plugin: the innermost frame outside importlib and
    this project's engine (empty for a module that was not found)."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}: "
    engine = tuple(str(Path(__file__).resolve().parents[1] / package) for package in ("algorithms", "ssl_imwa"))
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "importlib" not in frame.filename and not frame.filename.startswith(engine)]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames and not isinstance(error, ModuleNotFoundError) else ""
