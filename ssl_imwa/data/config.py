"""Typed dataset configuration; OmegaConf builds it from YAML, `build_data` validates it."""

# Optional[...] rather than `X | None`: the form every OmegaConf 2.3.x structured config accepts.
# ruff: noqa: UP045

from dataclasses import dataclass
from typing import Optional

PROTOCOLS = ("disjoint", "nested")
UNLABELED_SETTINGS = ("consistent", "uniform", "reversed", "unknown", "custom")


@dataclass
class DatasetConfig:
    """Which dataset, how it is made long-tailed, and how it is augmented (the benchmark protocols of DASO and ACR).

    These keys are common to every dataset. A dataset with options of its own registers a subclass
    that adds them (`@register_dataset(name, config=...)`, docs/extending.md).
    """

    name: str = "cifar10"  # a registered dataset: cifar10 | cifar100 | stl10 | imagefolder | digits | a plugin's
    root: Optional[str] = "./data"  # where files live (imagefolder: the folder holding train/ and test/, required)
    download: bool = False  # torchvision download only when True
    protocol: str = "disjoint"  # disjoint | nested (the DASO/ACR split protocols)
    n_max: int = 500  # N1, labeled head count
    m_max: int = 4000  # M1, unlabeled head count (ignored for 'unknown')
    imbalance: float = 100.0  # gamma_l
    unlabeled: str = "consistent"  # consistent | uniform | reversed | unknown | custom
    imbalance_u: Optional[float] = None  # gamma_u, used when unlabeled == 'custom'
    val_per_class: int = 0  # class-balanced validation hold-out per class, taken before the LT split
    split_seed: int = 0
    image_size: Optional[int] = None  # resize every part to this side once at load; None = native
    hflip: bool = True  # weak-augmentation horizontal flip (presets turn it off for digits)
    crop_pad_fraction: float = 0.125  # reflect padding of the random crop, as a fraction of the side
    cutout_fraction: float = 0.5  # cutout side as a fraction of the image side (16 px at 32)
    mean: Optional[list[float]] = None  # None -> the dataset's standard statistics
    std: Optional[list[float]] = None

    def validate(self) -> None:
        """The dataset's own checks: a subclass raises ValueError naming `dataset.<key>` for a value of one of
        its options out of range (the keys above are checked for every dataset by `validate_dataset`)."""
