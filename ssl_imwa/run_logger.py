"""What a run writes: TensorBoard streams, metrics.jsonl, status.json and results.json ."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from ssl_imwa.keys import SUMMARY_METRICS
from ssl_imwa.tensorboard_hparams import hparam_value, metric_values, write_session

log = logging.getLogger("ssl_imwa")


def _json_ready(value: Any) -> Any:
    """NaN becomes null so every file we write is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(_json_ready(payload), indent=2))
    os.replace(temporary, path)


def confusion_image(matrix: list[list[int]], class_names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix rendered as an HWC uint8 image for TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(3.0, 0.4 * len(class_names))
    figure, axis = plt.subplots(figsize=(size, size), dpi=80)
    axis.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if len(class_names) <= 20:
        axis.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(class_names)), class_names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return np.asarray(matplotlib.image.imread(buffer, format="png")[..., :3] * 255, dtype=np.uint8)


def command_line_hparams(run_dir: Path) -> dict[str, Any]:
    """The keys set on the run's command line (Hydra's .hydra/overrides.yaml), bookkeeping left out.

    A key of the config takes its resolved, typed value from config.yaml (`imwa.k=2` is the
    number 2); a config group choice (`algorithm=acr`, `experiment=quickstart`) keeps the name
    of the option chosen. No record (a run composed without Hydra's launcher): no keys.
    """
    import yaml

    from ssl_imwa.report import is_bookkeeping_key
    from ssl_imwa.report.runs import flatten

    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        config = flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return {}
    keys = {}
    for override in overrides:
        key, equals, text = str(override).lstrip("+").partition("=")
        key = key.split("@")[0]
        if equals and not key.startswith("~") and (key == "seed" or not is_bookkeeping_key(key)):
            keys[key] = config.get(key, text)
    return keys


class RunLogger:
    """One TensorBoard event stream per source ('replica<k>', 'merged') plus the JSON files."""

    def __init__(self, run_dir: Path, class_names: list[str], enabled_tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.class_names = class_names
        self.metrics_path = run_dir / "metrics.jsonl"
        self.status_path = run_dir / "status.json"
        self.enabled_tensorboard = enabled_tensorboard
        self._writers: dict[str, Any] = {}
        self._results: dict[str, Any] = {}  # as written by results(): the HParams session's metrics

    def writer(self, source: str) -> Any:
        if source not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[source] = SummaryWriter(str(self.run_dir / "tensorboard" / source))
        return self._writers[source]

    def scalars(self, source: str, values: dict[str, float], step: int, prefix: str = "train") -> None:
        if not self.enabled_tensorboard:
            return
        writer = self.writer(source)
        for key, value in values.items():
            if not math.isnan(value):
                writer.add_scalar(f"{prefix}/{key}", value, step)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One evaluation as one line of metrics.jsonl (only process 0 writes the file)."""
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(_json_ready(record)) + "\n")

    def evaluation_scalars(self, record: dict[str, Any], confusion: list[list[int]]) -> None:
        """Mirror one evaluation record to the TensorBoard stream of its source."""
        if not self.enabled_tensorboard:
            return
        name = "merged" if record["source"] == "merged" else f"replica{record['replica']}"
        writer = self.writer(name)
        split, step = record["split"], record["step"]
        for key in SUMMARY_METRICS:
            if not math.isnan(record[key]):
                writer.add_scalar(f"{split}/{key}", record[key], step)
        for index, value in enumerate(record["per_class"]):
            if not math.isnan(value):
                writer.add_scalar(f"{split}_per_class/{index:03d}_{self.class_names[index]}", value, step)
        if split == "test":
            writer.add_image(f"{split}/confusion", confusion_image(confusion, self.class_names), step,
                             dataformats="HWC")

    def hparams(self, hparams: dict[str, Any], final_metrics: dict[str, float]) -> None:
        """The run's HParams session in tensorboard/hparams, written once the run completes.

        Its hparams are `hparams` (the recipe keys) plus every key set on the run's command line,
        which holds a sweep's swept keys, so TensorBoard flags them as differing. Its metrics are
        `final_metrics` (`final_top1`, ...) and best and median-of-last from the results this
        logger wrote, as test/* scalars at the final step (not `hparam/*` at step 0). No
        experiment declaration: see ssl_imwa/tensorboard_hparams.py for why.
        """
        if not self.enabled_tensorboard:
            return
        values = {**hparams, **command_line_hparams(self.run_dir)}
        values = {key: hparam_value(value) for key, value in values.items()}
        metrics = metric_values(self._results)
        metrics.update({f"test/{key}": value for key, value in final_metrics.items() if not math.isnan(value)})
        step = (self._results.get("final") or {}).get("step", 0)
        write_session(self.run_dir / "tensorboard" / "hparams", self.run_dir.name, values, metrics, step, "SUCCESS")

    def status(self, status: str, error: str | None = None) -> None:
        write_json_atomic(self.status_path, {"status": status, "pid": os.getpid(), "host": socket.gethostname(),
                                             "updated": time.time(), "error": error})

    def results(self, payload: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "results.json", payload)
        self._results = payload

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
