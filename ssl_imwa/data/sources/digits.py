"""scikit-learn's bundled 8x8 handwritten digits: needs no download, the quick start's dataset."""

from pathlib import Path

import numpy as np

from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.data.dataset import DatasetParts, ImageArray, register_dataset

DIGITS_TEST_EVERY = 3  # per class, every third image in file order is a test image
# Computed once from the fixed digits training partition (pixels scaled to 0..255).
DIGITS_STATISTICS = ((0.3048,), (0.3757,))


def digits_file() -> Path:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn (2-3 s at every start):
    what `sklearn.datasets.load_digits` reads."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset.name=digits reads scikit-learn's bundled digits: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-learn's digits file {path} is missing: reinstall scikit-learn")
    return path


def read_digits(train: bool) -> ImageArray:
    """scikit-learn's bundled 8x8 digits (0..16 scaled to 0..255), with a fixed seedless partition.

    Per class, in file order, every third image (positions 2, 5, 8, ...) is a test image,
    which gives a stratified one-third test set that never changes.
    """
    table = np.loadtxt(digits_file(), delimiter=",")   # 1797 rows: 64 pixels (0..16), then the digit
    images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    targets = table[:, -1].astype(np.int64)
    position_in_class = np.empty(len(targets), dtype=np.int64)
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        position_in_class[members] = np.arange(len(members))
    is_test = position_in_class % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    keep = ~is_test if train else is_test
    return ImageArray(
        images=np.ascontiguousarray(images[keep]),
        targets=targets[keep],
        classes=[str(digit) for digit in range(10)],
    )


@register_dataset("digits", statistics=DIGITS_STATISTICS, num_classes=10)
def digits(cfg: DatasetConfig) -> DatasetParts:
    return DatasetParts(train=read_digits(train=True), test=read_digits(train=False))
