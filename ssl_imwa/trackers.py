"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (`logger=[tensorboard,wandb]`).

A tracker receives what TensorBoard receives (training scalars, evaluations, merges, the run's
hyperparameters and final metrics) under the same run name. Process 0 holds the tracker runs; the other
processes queue their replicas' scalars (`RunLogger.tracker_queue`), which reach process 0 at each merge.
Its run's id is kept in `RUN_DIR/trackers.json`, so a resumed run continues the same tracker run. The packages are optional
extras (`pip install -e .[wandb]`, `.[mlflow]`); a logger whose package is missing is refused when the
config is validated, naming the extra. W&B without an account: `WANDB_MODE=offline`; MLflow logs to
`MLFLOW_TRACKING_URI` (a server, or a local store such as `sqlite:///mlflow.db`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any

from ssl_imwa.run_logger import Tracker, write_json_atomic

LOGGERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "ssl-imwa"   # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say otherwise


def check_loggers(loggers: list[str]) -> None:
    """Refuse an unknown logger, or one whose package is not installed, naming the extra to install."""
    from ssl_imwa.validation import expect_choice

    for name in loggers:
        expect_choice("logger", name, LOGGERS)
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(f"logger={list(loggers)} needs the {package} package, which is not installed: "
                                      f"pip install -e .[{name}]")


class WandbTracker:
    """One W&B run. Each stream (replica0, merged) counts its own steps (`<stream>/step`): the replicas
    of a time-sliced IMWA run log steps 1..n one after another, and W&B's own step must only grow."""

    def __init__(self, run_id: str, name: str, directory: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), id=run_id, name=name,
                              resume="allow", dir=str(directory), config=config, reinit="create_new")
        self.streams: set[str] = set()

    def scalars(self, stream: str, values: dict[str, float], step: int) -> None:
        if stream not in self.streams:
            self.run.define_metric(f"{stream}/step")
            self.run.define_metric(f"{stream}/*", step_metric=f"{stream}/step")
            self.streams.add(stream)
        self.run.log({f"{stream}/step": step, **{f"{stream}/{key}": value for key, value in values.items()}})

    def summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """One MLflow run in the experiment `MLFLOW_EXPERIMENT_NAME` (default ssl-imwa); metric keys are
    `<stream>/<name>` (replica0/train/loss, merged/test/balanced_acc)."""

    def __init__(self, run_id: str | None, name: str, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()
        if run_id is None:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(experiment_name))
            run = self.client.create_run(experiment_id, run_name=name)
            self.run_id = run.info.run_id
            for start in range(0, len(config), 100):   # the API's limit per batch
                self.client.log_batch(self.run_id, params=[_param(key, value) for key, value in
                                                           list(config.items())[start:start + 100]])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def scalars(self, stream: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _milliseconds()
        self.client.log_batch(self.run_id, metrics=[Metric(f"{stream}/{key}", value, now, step)
                                                    for key, value in values.items()])

    def summary(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = _milliseconds()
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def _milliseconds() -> int:
    import time

    return int(time.time() * 1000)


def open_trackers(loggers: list[str], run_dir: Path, name: str, config: dict[str, Any]) -> list[Tracker]:
    """The trackers `loggers` names, continuing the runs recorded in `run_dir/trackers.json` if any."""
    record_path = run_dir / "trackers.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    trackers: list[Tracker] = []
    for logger in loggers:
        if logger == "wandb":
            record.setdefault("wandb", uuid.uuid4().hex[:16])
            trackers.append(WandbTracker(record["wandb"], name, run_dir, config))
        elif logger == "mlflow":
            tracker = MlflowTracker(record.get("mlflow"), name, config)
            record["mlflow"] = tracker.run_id
            trackers.append(tracker)
    if trackers:
        write_json_atomic(record_path, record)
    return trackers
