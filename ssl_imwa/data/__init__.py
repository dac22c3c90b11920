"""Long-tailed semi-supervised datasets: readers, splits, batched augmentation and training streams.

Knows nothing about training algorithms: callers say how many strong views they want.
"""

from ssl_imwa.data.build import SSLData, build_data, register_dataset
from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.data.counts import long_tailed_counts, unlabeled_counts
from ssl_imwa.data.splits import make_split
from ssl_imwa.data.stream import TrainStream, eval_batches

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
