"""The Python API: train a run as `python main.py` would, and load a run's models for inference.

    import ssl_imwa
    results, run_dir = ssl_imwa.train(["experiment=quickstart"], run_dir="runs/quick")
    run = ssl_imwa.load_run(run_dir)
    predicted = run.predict(run.data.test_images)

Heavy imports (torch, Hydra, the engine) happen inside the functions, so `import ssl_imwa` stays cheap.
Walkthrough: docs/python_api.md.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from ssl_imwa.data import SSLData
    from ssl_imwa.evaluator import LogitOffset

class TrainResult(NamedTuple):
    """What `train` returns: results.json's contents (None when stopped at train.stop_at) and the run directory."""

    results: dict[str, Any] | None
    run_dir: Path


def compose(overrides: Sequence[str] = (), run_dir: str | Path = ".") -> DictConfig:
    """The config `python main.py <overrides>` would train, from the same files and schema (Hydra's compose API),
    validated as a run validates it (`python main.py ... --check`): a mistake raises ValueError (or an
    OmegaConf error) naming the key, and nothing is loaded or written."""
    from ssl_imwa.config import validate

    cfg = _compose(overrides, run_dir)
    validate(cfg)
    return cfg


def _compose(overrides: Sequence[str], run_dir: str | Path) -> DictConfig:
    """Composed, not validated (a run validates after a resume has swapped in the run's own config)."""
    from ssl_imwa.composition import CONFIG_DIR
    from ssl_imwa.preflight import compose_overrides

    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"{CONFIG_DIR} does not exist: the API reads the checkout's configs/, so install the "
                                "package from a checkout with `pip install -e .`")
    return compose_overrides(overrides, run_dir)


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> TrainResult:
    """Train with command-line style `overrides` (`["experiment=quickstart", "seed=1"]`) into `run_dir`.

    `run_dir` defaults to `outputs/<date>/<time>` under the working directory, as main.py's does;
    `resume=true` among the overrides continues the run in `run_dir`. The run writes everything a
    command-line run writes except Hydra's own `.hydra/` record and `main.log` (its log lines go to
    the `ssl_imwa` logger). Errors are raised, not printed.
    """
    from ssl_imwa.run import run

    if any(override.lstrip("+~").startswith("run_dir=") for override in overrides):
        raise ValueError("pass the run directory as train(..., run_dir=...), not as an override")
    directory = Path(run_dir) if run_dir is not None else Path("outputs") / datetime.datetime.now().strftime(
        "%Y-%m-%d/%H-%M-%S")
    results = run(_compose(overrides, directory), list(overrides))
    return TrainResult(results, directory)


@dataclass
class ReplicaModels:
    """One replica's EMA teacher (what the run evaluates) and student, in eval mode."""

    teacher: torch.nn.Module
    student: torch.nn.Module


@dataclass
class LoadedRun:
    """A run's models rebuilt from its config.yaml and one checkpoint, ready for inference.

    Each model returns a dict of logits by head name; `head` is the one the run evaluated (ACR:
    its balanced head). `data` is the run's dataset, split as it was (test images: `data.test_images`).
    `logit_offset`: the algorithm's `eval_logit_offset`, which `predict` applies as the run's evaluation does.
    """

    run_dir: Path
    config: DictConfig
    data: SSLData
    head: str
    replicas: list[ReplicaModels]
    device: torch.device
    logit_offset: LogitOffset | None = None

    @property
    def teacher(self) -> torch.nn.Module:
        """Replica 0's EMA teacher: after the final merge, the merged model."""
        return self.replicas[0].teacher

    @property
    def student(self) -> torch.nn.Module:
        return self.replicas[0].student

    def predict(self, images: torch.Tensor, model: str = "teacher", replica: int = 0) -> torch.Tensor:
        """Predicted classes (on the CPU) of uint8 NCHW images, normalised, batched and cast as the run's
        evaluation does, so the predictions on the test images reproduce the run's top-1."""
        import torch

        from ssl_imwa.data.transforms import normalize
        from ssl_imwa.evaluator import measure_logit_offset, offset_logits
        from ssl_imwa.trainer import autocast_factory

        if model not in ("teacher", "student"):
            raise ValueError(f"model must be 'teacher' or 'student', got {model!r}")
        network = getattr(self.replicas[replica], model)
        autocast = autocast_factory(self.config.train.precision, self.device)
        batch_size = self.config.train.eval_batch_size
        predicted = []
        offset = None
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = normalize(images[start:start + batch_size].to(self.device), self.data.mean, self.data.std)
                if self.config.train.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                if start == 0:   # once per call, as once per evaluation
                    offset = measure_logit_offset(self.logit_offset, network, batch[:1], autocast)
                with autocast():
                    predicted.append(offset_logits(network(batch)[self.head], offset).argmax(dim=1))
        return torch.cat(predicted).cpu()


def load_run(run_dir: str | Path, checkpoint: str = "latest", device: str = "cpu") -> LoadedRun:
    """Every replica's teacher and student from `run_dir`'s `checkpoint` (`latest`, `best`, `merge_002`, ...)
    on `device`, rebuilt as `python -m ssl_imwa.evaluate` does (the run's data must be readable:
    it gives the classes, channels and normalisation)."""
    import torch

    from ssl_imwa.evaluate import open_run, read_run_config

    directory = Path(run_dir)
    cfg = read_run_config(directory, device)
    saved = open_run(directory, cfg, checkpoint, torch.device(device))
    replicas = [ReplicaModels(saved.network(index, "teacher"), saved.network(index, "student"))
                for index in range(len(saved.payload["replicas"]))]
    return LoadedRun(directory, cfg, saved.data, saved.algorithm_cls.eval_head, replicas, saved.device,
                     saved.algorithm_cls.eval_logit_offset)
