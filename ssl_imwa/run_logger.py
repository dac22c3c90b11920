"""What a run writes: TensorBoard streams, metrics.jsonl, status.json and results.json ."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ssl_imwa.checkpoint import storage_fault
from ssl_imwa.confusion_image import confusion_image
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


def metrics_line(record: dict[str, Any]) -> str:
    """One evaluation as its line of metrics.jsonl: the same bytes for the same record, whenever written."""
    return json.dumps(_json_ready(record)) + "\n"


def write_json_atomic(path: Path, payload: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        with naming_storage_faults(path):
            temporary.write_text(json.dumps(_json_ready(payload), indent=2))
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_storage_faults(path: Path) -> Iterator[None]:
    """A write that fails for the machine's reasons (no space, read-only, ...) is said in one line with
    the path: the OSError of a write or close carries no file name, and torch's writers wrap it."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        fault = storage_fault(error)
        if fault is None:
            raise
        raise OSError(fault.errno, f"cannot write {path}: {os.strerror(fault.errno)} "
                      f"({errno.errorcode[fault.errno]})") from error


def _write_in_place(path: Path, text: str) -> None:
    """Overwrite `path`'s bytes where they are: on a full disk the blocks it already holds still take
    a short file, where a new temporary file gets none."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, text.encode())
        os.ftruncate(descriptor, len(text.encode()))
    finally:
        os.close(descriptor)


class _TensorBoardWriter:
    """A SummaryWriter whose storage faults name its directory.

    TensorBoard writes events from a background thread; a failed write there is raised again by
    the writer's next call in the run's thread (here, named) and would also print the thread's own
    traceback, which `_quiet_tensorboard_threads` leaves out.
    """

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_threads()
        self.directory = directory
        with naming_storage_faults(directory):
            self._writer = SummaryWriter(str(directory))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._writer, name)

        def named(*args: Any, **kwargs: Any) -> Any:
            with naming_storage_faults(self.directory):
                return method(*args, **kwargs)
        return named


def _quiet_tensorboard_threads() -> None:
    """TensorBoard's event-writer thread re-raises its storage faults in the writer's next call:
    their thread traceback, printed besides, says nothing more."""
    if getattr(threading.excepthook, "quiet_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(arguments: threading.ExceptHookArgs) -> None:
        from_writer = type(arguments.thread).__name__ == "_AsyncWriterThread"
        if not (from_writer and arguments.exc_value is not None and storage_fault(arguments.exc_value)):
            previous(arguments)

    hook.quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


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


def trial_name(run_dir: Path) -> str:
    """The HParams trial id of a run: in a Hydra sweep, the keys the sweep varies (`imwa.k=2,seed=1`,
    in the sweep command's order and spelling), not the job directory's every override; else the
    run directory's name.

    The sweep's keys are the overrides with several values in `multirun.yaml`, which Hydra writes
    into the sweep directory before it starts a job; this job's values are in its
    `.hydra/overrides.yaml`.
    """
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        job = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        sweep_record = next((parent / "multirun.yaml" for parent in list(run_dir.parents)[:3]
                             if (parent / "multirun.yaml").is_file()), None)
        if sweep_record is None:
            return run_dir.name
        swept_overrides = ((yaml.safe_load(sweep_record.read_text()) or {}).get("hydra") or {}) \
            .get("overrides", {}).get("task") or []
        parsed = OverridesParser.create().parse_overrides([str(override) for override in swept_overrides])
        swept = [override.get_key_element().lstrip("+~") for override in parsed if override.is_sweep_override()]
    # an unreadable or foreign record: the directory's name still identifies the run
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError, HydraException):
        return run_dir.name
    values = {}
    for override in job:
        key, equals, value = str(override).partition("=")
        if equals:
            values[key.lstrip("+~")] = f"{key.lstrip('+~')}={value}"
    named = [values[key] for key in swept if key in values]
    return ",".join(named) if named else run_dir.name


class Tracker(Protocol):
    """An experiment tracker the run also logs to (ssl_imwa.trackers: W&B, MLflow)."""

    def scalars(self, stream: str, values: dict[str, float], step: int) -> None: ...

    def summary(self, metrics: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class RunLogger:
    """One TensorBoard event stream per source ('replica<k>', 'merged') plus the JSON files, and the same
    scalars to any experiment tracker the run logs to (ssl_imwa.trackers)."""

    def __init__(self, run_dir: Path, class_names: list[str], enabled_tensorboard: bool = True,
                 trackers: list[Tracker] | None = None, queue_for_trackers: bool = False) -> None:
        self.run_dir = run_dir
        self.class_names = class_names
        self.metrics_path = run_dir / "metrics.jsonl"
        self.status_path = run_dir / "status.json"
        self.enabled_tensorboard = enabled_tensorboard
        self.trackers = trackers or []
        # A process other than 0 of a run with trackers: the tracker runs are process 0's, so this process's
        # scalars (stream, values, step) wait here until a merge hands them over (RunHistory.collect_pending).
        self.tracker_queue: list[tuple[str, dict[str, float], int]] | None = [] if queue_for_trackers else None
        self._writers: dict[str, Any] = {}
        self._results: dict[str, Any] = {}  # as written by results(): the HParams session's metrics
        # (source, replica, split) -> (step, image) of the last confusion matrix drawn
        self._confusion_images: dict[tuple[Any, ...], tuple[int, np.ndarray]] = {}

    def writer(self, source: str) -> Any:
        if source not in self._writers:
            self._writers[source] = _TensorBoardWriter(self.run_dir / "tensorboard" / source)
        return self._writers[source]

    def scalars(self, source: str, values: dict[str, float], step: int, prefix: str = "train") -> None:
        named = {f"{prefix}/{key}": value for key, value in values.items() if not math.isnan(value)}
        self._track(source, named, step)
        if not self.enabled_tensorboard:
            return
        writer = self.writer(source)
        for key, value in named.items():
            writer.add_scalar(key, value, step)

    def _track(self, stream: str, values: dict[str, float], step: int) -> None:
        if self.tracker_queue is not None:
            self.tracker_queue.append((stream, values, step))
        for tracker in self.trackers:
            tracker.scalars(stream, values, step)

    def track(self, calls: list[tuple[str, dict[str, float], int]]) -> None:
        """Log to the trackers the scalars another process queued (it has no tracker run of its own)."""
        for call in calls:
            self._track(*call)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One evaluation as one line of metrics.jsonl (only process 0 writes the file)."""
        with naming_storage_faults(self.metrics_path), self.metrics_path.open("a") as stream:
            stream.write(metrics_line(record))

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> bytes | None:
        """metrics.jsonl made of exactly `records` (the run's history as a checkpoint holds it), replaced
        atomically: a kill leaves the old file or the new one. Returns the old file's bytes (None: none)."""
        try:
            old = self.metrics_path.read_bytes()
        except FileNotFoundError:
            old = None
        temporary = self.metrics_path.with_suffix(self.metrics_path.suffix + ".tmp")
        with temporary.open("w") as stream:
            stream.write("".join(metrics_line(record) for record in records))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.metrics_path)
        return old

    def evaluation_scalars(self, record: dict[str, Any], confusion: list[list[int]] | None,
                           stream: str | None = None) -> None:
        """Mirror one evaluation record to the TensorBoard stream of its source (or to `stream`).

        A test evaluation's confusion image is drawn from `confusion`; with None, the image this
        logger drew for the same evaluation (source, replica, split, step), if any, is reused:
        K=1 mirrors replica 0's evaluations at an episode's end into `merged`.
        """
        name = stream or ("merged" if record["source"] == "merged" else f"replica{record['replica']}")
        split, step = record["split"], record["step"]
        values = {f"{split}/{key}": record[key] for key in SUMMARY_METRICS}
        values.update({f"{split}_per_class/{index:03d}_{self.class_names[index]}": value
                       for index, value in enumerate(record["per_class"])})
        values = {key: value for key, value in values.items() if not math.isnan(value)}
        self._track(name, values, step)
        if not self.enabled_tensorboard:
            return
        writer = self.writer(name)
        identity = (record["source"], record.get("replica"), split)
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        if split != "test":
            return
        if confusion is not None:
            self._confusion_images[identity] = (step, confusion_image(confusion, self.class_names))
        drawn_step, image = self._confusion_images.get(identity, (None, None))
        if drawn_step == step:
            writer.add_image(f"{split}/confusion", image, step, dataformats="HWC")

    def hparams(self, hparams: dict[str, Any], final_metrics: dict[str, float]) -> None:
        """The run's HParams session in tensorboard/hparams, written once the run completes.

        Its hparams are `hparams` (the recipe keys) plus every key set on the run's command line,
        which holds a sweep's swept keys, so TensorBoard flags them as differing. Its metrics are
        `final_metrics` (`final_top1`, ...) and best and median-of-last from the results this
        logger wrote, as test/* scalars at the final step (not `hparam/*` at step 0). No
        experiment declaration: see ssl_imwa/tensorboard_hparams.py for why.
        """
        metrics = metric_values(self._results)
        metrics.update({f"test/{key}": value for key, value in final_metrics.items() if not math.isnan(value)})
        for tracker in self.trackers:
            tracker.summary(metrics)
        if not self.enabled_tensorboard:
            return
        values = {**hparams, **command_line_hparams(self.run_dir)}
        values = {key: hparam_value(value) for key, value in values.items()}
        step = (self._results.get("final") or {}).get("step", 0)
        write_session(self.run_dir / "tensorboard" / "hparams", trial_name(self.run_dir), values, metrics, step,
                      "SUCCESS")

    def status(self, status: str, error: str | None = None) -> None:
        """status.json, replaced atomically; a run that ends (failed, stopped) on a full disk still says
        so, by overwriting the file's own bytes, and a status that cannot be written at all is logged
        rather than raised over the error that ended the run."""
        record = {"status": status, "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
                  "error": error}
        try:
            write_json_atomic(self.status_path, record)
        except OSError as fault:
            if status == "running" or storage_fault(fault) is None:
                raise
            try:
                _write_in_place(self.status_path, json.dumps(_json_ready(record), indent=2))
            except OSError as again:
                log.warning("could not record status %r in %s: %s", status, self.status_path, again)

    def results(self, payload: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "results.json", payload)
        self._results = payload

    def close(self, ending_a_failure: bool = False) -> None:
        """Flush and close every event stream. A stream that cannot be flushed (a full disk) is raised
        after the others are closed, or, while a run ends on another error, logged, so that closing
        never hides the error that ended the run."""
        faults = []
        for tracker in self.trackers:
            tracker.close(failed=ending_a_failure)
        self.trackers = []
        for writer in self._writers.values():
            try:
                writer.close()
            except OSError as fault:
                if storage_fault(fault) is None:
                    raise
                faults.append(fault)
        self._writers.clear()
        for fault in faults if ending_a_failure else faults[1:]:
            log.warning("%s", fault)
        if faults and not ending_a_failure:
            raise faults[0]
