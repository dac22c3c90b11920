"""TensorBoard HParams records for runs and sweeps, written with tensorboard alone (no torch).

Why not `SummaryWriter.add_hparams`: it writes an experiment declaration into every run, holding
only that run's values. The HParams tab then takes one run's declaration as the experiment's,
marks every hparam as not differing and shows the first five alphabetically, so the swept key
is hidden; it also logs the metrics as `hparam/*` scalars at step 0. Here a run writes only its
*session* (hparam values, metric values at its last step, status); with no declaration in the
log directory TensorBoard infers one from the sessions and flags the keys that differ. The set
of keys that vary is only known across runs, so `python -m ssl_imwa.report --tensorboard`
writes a declared experiment (domains, metric names) for a whole sweep.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# (tag, display name, description) of the metrics each session logs, in the HParams tab's order:
# the tab shows the first five. Values are fractions, like the test/* curves.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("test/final_top1", "final top1", "test top-1 of the final (merged) model"),
    ("test/final_balanced_acc", "final balanced acc", "test balanced accuracy of the final model"),
    ("test/best_top1", "best top1 (val-selected)",
     "test top-1 at the evaluation with the highest validation top-1 (only with a validation split)"),
    ("test/median_last20_top1", "median last-20 top1", "median test top-1 over the last 20 evaluations"),
    ("test/median_last20_balanced_acc", "median last-20 balanced acc",
     "median test balanced accuracy over the last 20 evaluations"),
    ("test/best_balanced_acc", "best balanced acc (val-selected)",
     "test balanced accuracy at the evaluation with the highest validation top-1"),
)
# Where each metric comes from in results.json: (section, key).
METRIC_SOURCES = {
    "test/final_top1": ("final", "top1"),
    "test/final_balanced_acc": ("final", "balanced_acc"),
    "test/best_top1": ("best", "top1"),
    "test/median_last20_top1": ("median_last20", "top1"),
    "test/median_last20_balanced_acc": ("median_last20", "balanced_acc"),
    "test/best_balanced_acc": ("best", "balanced_acc"),
}
HParamValue = bool | float | int | str


def metric_values(results: Mapping[str, Any]) -> dict[str, float]:
    """The session metrics found in a results.json-shaped mapping (missing and NaN left out)."""
    values = {}
    for tag, (section, key) in METRIC_SOURCES.items():
        value = (results.get(section) or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[tag] = float(value)
    return values


def hparam_value(value: Any) -> HParamValue:
    """TensorBoard takes bool, number or string: null and lists become their override spelling."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def write_session(directory: Path, trial: str, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float],
                  step: int, status: str) -> None:
    """One run's HParams session: its hparams, metric scalars at `step`, and how it ended.

    `status` is one of the api's names without prefix: SUCCESS, FAILURE, RUNNING, UNKNOWN.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    now = time.time()
    start = plugin_data_pb2.SessionStartInfo(group_name=trial, start_time_secs=now)
    for name, value in hparams.items():
        field = "bool_value" if isinstance(value, bool) else "string_value" if isinstance(value, str) else "number_value"
        setattr(start.hparams[name], field, value)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(f"STATUS_{status}"), end_time_secs=now)
    events = [(0, _plugin_summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_start_info=start)))]
    events += [(step, Summary(value=[Summary.Value(tag=tag, simple_value=value)])) for tag, value in metrics.items()]
    events.append((step, _plugin_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_end_info=end))))
    _write_events(directory, events)


def write_experiment(directory: Path, hparams: Sequence[tuple[str, Sequence[HParamValue], bool]],
                     description: str, metrics: Iterable[str] | None = None) -> None:
    """Declare the experiment: each (name, values seen, differs) with a discrete domain of those
    values, in the order given (the tab shows the first five that differ), plus the METRICS whose
    tags are in `metrics` (default: all).

    TensorBoard takes the declaration from whichever run holds it: write it into a session's own
    directory, so that the log directory has no extra run (`.`) holding only the declaration."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    wanted = None if metrics is None else set(metrics)
    experiment = api_pb2.Experiment(
        description=description, time_created_secs=time.time(),
        hparam_infos=[_hparam_info(api_pb2, name, values, differs) for name, values, differs in hparams],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(group="", tag=tag), display_name=name,
                                         description=text) for tag, name, text in METRICS
                      if wanted is None or tag in wanted])
    _write_events(directory, [(0, _plugin_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(
        experiment=experiment)))])


def _plugin_summary(tag: str, plugin_data: Any) -> Any:
    """A Summary holding HParams plugin data, as the plugin's own writers build it (without TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(plugin_data),
                                        tensor=metadata.NULL_TENSOR)])


def declared_type(values: Iterable[HParamValue]) -> type:
    """bool, float or str: numbers stay numbers (sortable, filterable); any mix becomes str."""
    kinds = {bool if isinstance(value, bool) else float if isinstance(value, (int, float)) else str
             for value in values}
    return kinds.pop() if len(kinds) == 1 else str


def as_declared(value: HParamValue, kind: type) -> HParamValue:
    """A session value in its hparam's declared type (a mixed-type key is declared as strings)."""
    return value if kind is not str or isinstance(value, str) else json.dumps(value)


def _hparam_info(api_pb2: Any, name: str, values: Sequence[HParamValue], differs: bool) -> Any:
    kind = declared_type(values)
    info = api_pb2.HParamInfo(name=name, differs=differs, type={
        bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}[kind])
    distinct = sorted({as_declared(value, kind) for value in values})
    info.domain_discrete.extend(distinct)
    return info


def _write_events(directory: Path, events: Sequence[tuple[int, Any]]) -> None:
    """A new event file in `directory` holding the (step, Summary) pairs."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    directory.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(directory))
    for step, summary_pb in events:
        writer.add_event(Event(wall_time=time.time(), step=step, summary=summary_pb))
    writer.close()
