"""Long-tailed semi-supervised datasets: the dataset contract, splits, batched augmentation and training streams.

Knows nothing about training algorithms: callers say how many strong views they want. The built-in
datasets (`sources/`) are plugins, imported by the dataset registry on first lookup, not here.
"""

from ssl_imwa.data.build import SSLData, build_data
from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.data.counts import long_tailed_counts, unlabeled_counts
from ssl_imwa.data.dataset import (
    DatasetParts,
    ImageArray,
    get_dataset,
    list_datasets,
    register_dataset,
)
from ssl_imwa.data.splits import make_split
from ssl_imwa.data.stream import TrainStream, eval_batches

__all__ = [
    "DatasetConfig",
    "DatasetParts",
    "ImageArray",
    "SSLData",
    "TrainStream",
    "build_data",
    "eval_batches",
    "get_dataset",
    "list_datasets",
    "long_tailed_counts",
    "make_split",
    "register_dataset",
    "unlabeled_counts",
]
