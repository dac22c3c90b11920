"""`--tensorboard`: one TensorBoard log directory for a whole comparison.

    OUT/tensorboard/acr,K=1,seed=0/        the first run's session, plus the experiment: which hparams
                                           vary, their values, the metrics some run has
    OUT/tensorboard/acr,K=2,seed=0/        a run's session (hparams, final/best/median, status)
        replica0 -> RUN/tensorboard/replica0   its event streams, linked (so they keep updating)
        merged   -> RUN/tensorboard/merged

Run names are the fewest group keys that tell the groups apart, then the seed, so the part
that tells runs apart comes first and the stream name still fits in TensorBoard's run lists.
The declaration lists the keys that name the groups with `differs` set, so the HParams tab
shows them (it displays the first five that differ), each with a discrete domain of the values
seen.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ssl_imwa.report.groups import GroupSummary, aliases, splitting_keys
from ssl_imwa.report.runs import COMPLETE, CRASHED, RUNNING, Run
from ssl_imwa.tensorboard_hparams import (
    METRICS,
    HParamValue,
    as_declared,
    declared_type,
    hparam_value,
    metric_values,
    write_experiment,
    write_session,
)

# Declared for every comparison, after the keys that name the groups: what a reader looks up.
RECIPE_KEYS = ("algorithm.name", "dataset.name", "model.name", "imwa.k", "imwa.episodes", "imwa.merge",
               "train.iterations", "train.lr", "train.mu", "dataset.imbalance", "dataset.unlabeled")
# The HParams api has no "stopped" status: a stopped run (resume=true continues it) is UNKNOWN.
SESSION_STATUS = {COMPLETE: "SUCCESS", RUNNING: "RUNNING", CRASHED: "FAILURE"}
STREAM_RECORD = "hparams"  # the run's own session; the view writes its own instead


def write_view(summaries: Sequence[GroupSummary], directory: Path) -> str:
    """Rebuild `directory` as the comparison's TensorBoard log directory; returns a note."""
    if directory.is_symlink() or directory.is_file():
        directory.unlink()
    elif directory.exists():
        shutil.rmtree(directory)  # links inside are removed, never followed
    runs = _unique(run_names(summaries))
    declared = _declared_keys(summaries, [run for _, run in runs])
    kinds = {key: declared_type(values) for key, values, _ in declared}
    sessions = []
    for name, run in runs:
        values = {key: as_declared(hparam_value(run.config[key]), kinds[key]) for key in kinds if key in run.config}
        metrics = metric_values({"final": run.final, "best": run.best, "median_last20": run.median_last20}) \
            if run.state == COMPLETE else {}
        sessions.append((name, run, values, metrics))
    # Declared: the metrics some run has (no best_* column when no run has a validation split); with
    # no complete run yet, those every complete run has.
    found = {tag for *_, metrics in sessions for tag in metrics}
    # The declaration goes into the first run's directory: a file in `directory` itself is a run named `.`.
    if runs:
        write_experiment(directory / runs[0][0], declared, description=f"{len(runs)} runs compared by python -m "
                         "ssl_imwa.report", metrics=found or [tag for tag, _, _ in METRICS if "/best_" not in tag])
    for name, run, values, metrics in sessions:
        step = run.curve[-1]["step"] if run.curve else 0
        write_session(directory / name, name, values, metrics, step, SESSION_STATUS.get(run.state, "UNKNOWN"))
        streams = run.path / "tensorboard"
        for stream in sorted(streams.iterdir()) if streams.is_dir() else []:
            if stream.is_dir() and stream.name != STREAM_RECORD:
                (directory / name / stream.name).symlink_to(stream.resolve(), target_is_directory=True)
    return f"{directory.name}/: {len(runs)} runs for `tensorboard --logdir {directory}` (HParams: " \
        f"{', '.join(key for key, _, differs in declared if differs) or 'nothing'} differ)"


def run_names(summaries: Sequence[GroupSummary]) -> list[tuple[str, Run]]:
    """`acr,K=2,seed=0` per run: the fewest group keys that tell the groups apart (in reader
    order, short names, the value alone for algorithm/dataset/model), then the seed. The HParams
    tab has every differing key; a run name must fit TensorBoard's run lists with the stream
    (`/merged`, `/replica0`) after it. Path-safe directory names."""
    runs = [run for summary in summaries for run in summary.group.runs]
    keys = list(summaries[0].group.settings) if summaries else []
    names = aliases(keys)
    naming = splitting_keys(runs, keys)
    named = []
    for summary in summaries:
        settings = summary.group.settings
        parts = [settings[key] if key.endswith(".name") else f"{names[key]}={settings[key]}" for key in naming]
        for run in summary.group.runs:
            name = ",".join([*parts, f"seed={hparam_value(run.config.get('seed'))}"])
            named.append((name.replace("/", "_").replace(" ", ""), run))
    return named


def _unique(named: list[tuple[str, Run]]) -> list[tuple[str, Run]]:
    """Runs of the same group and seed from different sweeps get `#2`, `#3`, ... appended."""
    seen: dict[str, int] = {}
    unique = []
    for name, run in named:
        seen[name] = seen.get(name, 0) + 1
        unique.append((name if seen[name] == 1 else f"{name}#{seen[name]}", run))
    return unique


def _declared_keys(summaries: Sequence[GroupSummary], runs: Sequence[Run]
                   ) -> list[tuple[str, list[HParamValue], bool]]:
    """(key, values seen, differs): the group keys, then recipe keys that differ, the seed, the
    other recipe keys; only keys some run has."""
    group_keys = list(summaries[0].group.settings) if summaries else []
    declared = []
    for key in [*group_keys, *(key for key in RECIPE_KEYS if key not in group_keys), "seed"]:
        values = [hparam_value(run.config[key]) for run in runs if key in run.config]
        if values:
            declared.append((key, values, key in group_keys or len(set(values)) > 1))
    # The tab shows the first five that differ: group keys, other differing keys, then the seed.
    first = [item for item in declared if item[0] != "seed" and item[2]]
    seed = [item for item in declared if item[0] == "seed"]
    return first + seed + [item for item in declared if item not in first and item not in seed]
