"""The dataset contract: what a dataset module returns, what it declares, and how it is found by name.

A dataset is one module: a reader `reader(cfg) -> DatasetParts` registered with
`@register_dataset(name, ...)`, which also declares its normalisation statistics, its class count
where it is known without reading images, whether it has a separate unlabeled split, and, if it
has options of its own, their dataclass (a subclass of `DatasetConfig`, so `dataset.<option>` is
typed and validated by name). The built-in datasets (`ssl_imwa/data/sources/`) are plugins like
any other: the registry imports every module of that package on first lookup, and
`ssl_imwa.registry.load_plugins` imports the modules a config names under `plugins`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.registry import Registry

BUILTIN_PACKAGE = "ssl_imwa.data.sources"
Statistics = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std) of pixels in [0, 1]


@dataclass
class ImageArray:
    """One split of a dataset as arrays.

    `images` may be a read-only memory map (STL-10), so consumers copy it in chunks.
    """

    images: np.ndarray  # uint8 [N, H, W, C], C in {1, 3}
    targets: np.ndarray  # int64 [N], -1 = unknown
    classes: list[str]


@dataclass
class DatasetParts:
    """What a dataset reader returns: train and test arrays, and a separate unlabeled split if it has one."""

    train: ImageArray
    test: ImageArray
    unlabeled: ImageArray | None = None


Reader = Callable[[DatasetConfig], DatasetParts]
ClassCount = int | Callable[[DatasetConfig], int | None] | None


@dataclass(repr=False)
class Dataset:
    """A registered dataset: its reader and what `build_data` must know before reading it."""

    reader: Reader
    statistics: Statistics | None  # None: computed from the training images at load
    separate_unlabeled: bool  # True: unlabeled data is its own split with unknown labels
    # How many classes, known without reading images (an int, or a cheap function of the config
    # that may answer None); None: known only once read. Lets validation check the split's counts.
    num_classes: ClassCount = None
    config: type[DatasetConfig] = DatasetConfig  # the dataclass typing `dataset.*` for this dataset

    def __repr__(self) -> str:
        """The reader's qualified name: the registry's identity of this entry (a reloaded module re-registers it)."""
        return f"{self.reader.__module__}.{self.reader.__qualname__}"

    def classes_known_before_reading(self, cfg: DatasetConfig) -> int | None:
        return self.num_classes(cfg) if callable(self.num_classes) else self.num_classes


_DATASETS: Registry[Dataset] = Registry("dataset", BUILTIN_PACKAGE)


def register_dataset(
    name: str,
    statistics: Statistics | None = None,
    separate_unlabeled: bool = False,
    num_classes: ClassCount = None,
    config: type[DatasetConfig] | None = None,
) -> Callable[[Reader], Reader]:
    """Register `reader(cfg) -> DatasetParts` under `name` (the value of `dataset.name`).

    `statistics` is the (mean, std) used when the config gives none; without it they are
    computed from the training images. `separate_unlabeled` datasets (like STL-10) bring their
    own unlabeled split and accept only `dataset.unlabeled='unknown'`. `num_classes` (optional) lets
    validation check the labeled counts of the split before any image is read. `config`: a
    dataclass deriving from `DatasetConfig` whose extra fields are this dataset's own options
    (`dataset.<option>`); the reader then receives an instance of it.
    """
    if config is not None and not (dataclasses.is_dataclass(config) and issubclass(config, DatasetConfig)):
        raise TypeError(f"@register_dataset('{name}', config={config!r}): expected a dataclass deriving from "
                        "ssl_imwa.data.DatasetConfig")

    def decorator(reader: Reader) -> Reader:
        entry = Dataset(reader, statistics, separate_unlabeled, num_classes, config or DatasetConfig)
        _DATASETS.register(name, config=config)(entry)
        return reader

    return decorator


def get_dataset(name: str) -> Dataset:
    """The dataset registered as `name`; a ValueError naming `dataset.name` and the choices otherwise."""
    if name not in _DATASETS:
        raise ValueError(f"dataset.name={name!r}: expected one of {', '.join(list_datasets())}")
    return _DATASETS.get(name)


def list_datasets() -> list[str]:
    return _DATASETS.names()


def with_own_options(cfg: Any, entry: Dataset) -> DatasetConfig:
    """`cfg` as an instance of the dataset's own config class: an OmegaConf node becomes its object, and a
    plain `DatasetConfig` (as Python callers build) gets the dataset's defaults for its own options."""
    if not isinstance(cfg, DatasetConfig):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
        if isinstance(cfg, dict):
            return entry.config(**cfg)
    if isinstance(cfg, entry.config):
        return cfg
    common = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(DatasetConfig)}
    return entry.config(**common)


def typed_dataset_section(section: Any) -> Any:
    """The config's `dataset` section typed by its dataset's config class: an unknown key or a wrong type
    raises OmegaConf's error naming `dataset.<key>`; an unknown name, a ValueError naming `dataset.name`."""
    from ssl_imwa.validation import typed_section

    return typed_section("dataset", get_dataset(str(section.get("name"))).config, section)
