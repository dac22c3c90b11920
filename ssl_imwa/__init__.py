"""ssl-imwa: semi-supervised learning on long-tailed images with Iterative Model Weight Averaging.

The Python API (docs/python_api.md): `train(overrides, run_dir)` runs what `python main.py` runs,
`load_run(run_dir)` gives a run's models for inference, `compose(overrides)` the config alone.
Importing the package loads neither torch nor Hydra; the functions do, when called.
"""
from ssl_imwa.api import LoadedRun, ReplicaModels, TrainResult, compose, load_run, train

__all__ = ["LoadedRun", "ReplicaModels", "TrainResult", "compose", "load_run", "train"]
