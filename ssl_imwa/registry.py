"""One way to extend ssl-imwa: a registry per kind (algorithms, merge strategies, datasets, backbones).

Each entry is registered by a decorator in its own module, optionally with the dataclass that
types its options. Built-in entries are plugins like any other: a registry imports every module of
its built-in package on first lookup (no list names them), and `load_plugins` imports the modules a
config names under `plugins=[...]`. The engine looks entries up by name and never imports a plugin.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
PACKAGE_ROOT = Path(__file__).resolve().parent


def _qualified(obj: object) -> str:
    """Identity across module reloads: re-registering a reloaded class replaces it."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry(Generic[T]):
    """Names -> registered objects (and their option dataclasses), with clear lookup errors.

    `builtin_package`: the package whose modules hold the built-in entries, imported on first lookup.
    """

    def __init__(self, kind: str, builtin_package: str | None = None) -> None:
        self.kind = kind
        self.builtin_package = builtin_package
        self._entries: dict[str, T] = {}
        self._configs: dict[str, type | None] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[T], T]:
        """Decorator: `name` finds the object; `config`, when given, is the dataclass of its options."""
        def decorator(obj: T) -> T:
            if name in self._entries and _qualified(self._entries[name]) != _qualified(obj):
                raise KeyError(f"{self.kind} '{name}' is already registered by {self._entries[name]!r}")
            self._entries[name] = obj
            self._configs[name] = config
            return obj

        return decorator

    def get(self, name: str) -> T:
        self.load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; registered: {', '.join(self.names()) or '(none)'}") from None

    def config_of(self, name: str) -> type | None:
        """The dataclass that types `name`'s options (None: it takes none)."""
        self.get(name)
        return self._configs[name]

    def names(self) -> list[str]:
        self.load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self.load_builtins()
        return name in self._entries

    def load_builtins(self) -> None:
        if self.builtin_package is not None:
            load_package(self.builtin_package)


@functools.cache
def load_package(package_name: str) -> None:
    """Import every module of `package_name`, as `load_plugins` imports a user's: a new built-in entry
    is one file there (plus its YAML), and no list names it."""
    package = importlib.import_module(package_name)
    load_plugins(f"{package_name}.{module.name}" for module in pkgutil.iter_modules(package.__path__))


def load_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module so that its registration decorators run.

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
    the engine (empty for a module that was not found). Built-in plugin packages count as plugins."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}: "
    builtin_packages = [str(PACKAGE_ROOT / folder) for folder in BUILTIN_PLUGIN_FOLDERS]

    def in_plugin(filename: str) -> bool:
        return "importlib" not in filename and (
            not filename.startswith(str(PACKAGE_ROOT)) or any(filename.startswith(path) for path in builtin_packages))

    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if in_plugin(frame.filename)]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames and not isinstance(error, ModuleNotFoundError) else ""


# Folders of ssl_imwa/ that hold built-in plugins (an error inside one is the plugin's, not the engine's).
BUILTIN_PLUGIN_FOLDERS = ("algorithms", "data/sources", "models/backbones", "merges")
