"""Long-tailed semi-supervised datasets: readers, splits, batched augmentation and training streams.

Knows nothing about training algorithms: callers say how many strong views they want.
"""

from datasets.build import SSLData, build_data, register_dataset
from datasets.config import DatasetConfig
from datasets.counts import long_tailed_counts, unlabeled_counts
from datasets.splits import make_split
from datasets.stream import TrainStream, eval_batches

__all__ = [
    "DatasetConfig",
    "SSLData",
    "TrainStream",
    "build_data",
    "eval_batches",
    "long_tailed_counts",
    "make_split",
    "register_dataset",
    "unlabeled_counts",
]
