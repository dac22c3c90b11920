"""Compare finished (and unfinished) training runs: average seeds per config, flag crashes, plot.

    python -m ssl_imwa.report RUN_DIR_OR_SWEEP... [--out DIR] [--metric balanced_acc]

Deliberately torch-free (stdlib, numpy, PyYAML, matplotlib Agg) so it starts in a second on a
login node and can read run directories while training is still going on elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

METRICS = ("top1", "balanced_acc", "macro_f1", "head", "medium", "tail")
SOURCES = ("replica", "merged")
SPLITS = ("val", "test")
COMPLETE, CRASHED, STOPPED, RUNNING = "complete", "crashed", "stopped", "running"
# Unfinished runs that will not continue by themselves: marked, averaged only on request.
INCOMPLETE_STATES = (CRASHED, STOPPED)
CRASH_MARK = "†"
MEDIAN_WINDOW = 20
MAX_PER_CLASS_GROUPS = 6
FIGSIZE, DPI = (6.0, 4.0), 100
# Files that only a run directory has; a directory with them but without config.yaml is reported.
RUN_MARKERS = ("status.json", "metrics.jsonl", "results.json", ".hydra")
HYDRA_SWEEP_RECORD = "multirun.yaml"  # sits next to the job dirs `multirun/<date>/<time>/*` matches
# Keys that differ between runs without changing the experiment, so they must not split groups.
IGNORED_TOP_LEVEL = ("seed", "hydra", "logging")
# The keys configs/config.yaml keeps out of Hydra's override_dirname (besides resume, device).
IGNORED_KEYS = ("train.progress", "train.num_threads")
IGNORED_LEAVES = ("run_dir", "resume", "device", "dir", "path", "root")
IGNORED_LEAF_SUFFIXES = ("_dir", "_path", "_file", "_root")
# (key, header, decimals) of the table/CSV value columns; accuracies are in percent.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("final_top1", "final top1 (%)", 2),
    ("best_top1", "best top1 (%)", 2),
    ("median20_top1", "median last-20 top1 (%)", 2),
    ("final_balanced_acc", "final bal. acc (%)", 2),
    ("final_head", "head (%)", 2),
    ("final_medium", "medium (%)", 2),
    ("final_tail", "tail (%)", 2),
    ("wall_time_h", "wall time (h)", 2),
    ("images_per_s", "images/s", 0),
)

Skipped = tuple[Path, str]


class SkipRun(Exception):
    """A run directory that cannot be reported at all (e.g. unreadable config.yaml)."""


@dataclass
class Run:
    """One run directory, reduced to what the report needs."""

    path: Path
    config: dict[str, Any]  # flattened to dotted keys
    state: str  # COMPLETE, CRASHED, STOPPED or RUNNING
    reason: str = ""  # why a run counts as crashed, stopped or in progress
    final: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    median_last20: dict[str, Any] | None = None
    wall_time_s: float | None = None
    images_per_s: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)  # representative test evals by step
    episodes: list[dict[str, Any]] = field(default_factory=list)  # merged test evals by episode
    problems: list[Skipped] = field(default_factory=list)  # non-fatal: e.g. malformed lines


@dataclass
class Group:
    """Runs sharing every non-bookkeeping config value except the seed."""

    label: str
    settings: dict[str, str]  # varying key -> value as shown in the label
    runs: list[Run]


@dataclass
class Stat:
    mean: float
    std: float  # sample std (ddof=1), 0 for a single value
    n: int


@dataclass
class GroupSummary:
    """A group's table row: which runs were averaged, their statistics and the status notes."""

    group: Group
    included: list[Run]
    stats: dict[str, Stat | None]
    notes: str

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def marked_label(self) -> str:
        """Label with † when the group has incomplete runs, pointing at the list below the table."""
        incomplete = any(run.state in INCOMPLETE_STATES for run in self.group.runs)
        return f"{self.label} {CRASH_MARK}" if incomplete else self.label


# --------------------------------------------------------------------------- discovery


def discover(patterns: Iterable[str]) -> tuple[list[Path], list[Skipped]]:
    """Expand directories/globs into run directories, searching sweep roots recursively."""
    found: dict[Path, Path] = {}  # resolved -> as the user spelled it, to dedupe overlapping args
    skipped: list[Skipped] = []
    for pattern in patterns:
        # Hydra names job dirs after overrides, e.g. `model.widths=[1,2]`: try the literal path first.
        if os.path.exists(pattern):
            matches = [Path(pattern)]
        else:
            matches = [Path(match) for match in sorted(glob.glob(pattern))]
        if not matches:
            skipped.append((Path(pattern), "no such file or directory"))
        for match in matches:
            if match.is_dir():
                skipped_before = len(skipped)
                run_dirs = _find_run_dirs(match, skipped)
                if not run_dirs and len(skipped) == skipped_before:
                    skipped.append((match, "no run directory (with config.yaml) inside"))
                for run_dir in run_dirs:
                    found.setdefault(run_dir.resolve(), run_dir)
            elif match.name != HYDRA_SWEEP_RECORD:
                skipped.append((match, "not a directory"))
    return sorted(found.values()), skipped


def _failure_note(run_dir: Path) -> str:
    """The error a run recorded in status.json before it could write its config, if any."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return ""
    return f" (it failed: {status['error']})" if isinstance(status, dict) and status.get("error") else ""


def _find_run_dirs(root: Path, skipped: list[Skipped]) -> list[Path]:
    """Walk a sweep root; stop at run dirs so their .hydra/ and checkpoints/ are never entered."""
    run_dirs = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.yaml" in filenames:
            run_dirs.append(Path(dirpath))
            dirnames.clear()
        elif any(marker in filenames or marker in dirnames for marker in RUN_MARKERS):
            skipped.append((Path(dirpath), "looks like a run directory but has no config.yaml"
                            + _failure_note(Path(dirpath))))
            dirnames.clear()
        else:
            dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
    return run_dirs


# --------------------------------------------------------------------------- loading


def load_run(run_dir: Path, stale_seconds: float = 1800.0, now: float | None = None) -> Run:
    """Read one run directory; raise SkipRun if it has no usable config.yaml."""
    config = _load_config(run_dir / "config.yaml")
    problems: list[Skipped] = []
    evaluations = _read_metrics(run_dir / "metrics.jsonl", problems)
    run = Run(
        path=run_dir,
        config=config,
        state=COMPLETE,
        curve=_representative_curve(evaluations, _imwa_setting(config, "k")),
        episodes=_merged_episodes(evaluations),
        problems=problems,
    )
    results = _read_results(run_dir / "results.json", problems)
    if results is not None:
        run.final = _clean_metrics(results["final"])
        run.best = (
            _clean_metrics(results["best"]) if isinstance(results.get("best"), dict) else None
        )
        run.median_last20 = _clean_metrics(results.get("median_last20"))
        run.wall_time_s = _as_float(results.get("wall_time_s"))
        run.images_per_s = _as_float(results.get("images_per_s"))
        return run
    now = time.time() if now is None else now
    run.state, run.reason = _unfinished_state(run_dir / "status.json", stale_seconds, now)
    if run.curve:
        # No results.json: the last test evaluation stands in for "final". Best stays blank rather
        # than re-implementing the trainer's validation-based selection here.
        run.final = run.curve[-1]
        window = run.curve[-MEDIAN_WINDOW:]
        run.median_last20 = {
            name: _median([e[name] for e in window]) for name in ("top1", "balanced_acc")
        }
    return run


def _load_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SkipRun(f"config.yaml is not valid YAML ({_first_line(err)})") from err
    except (OSError, ValueError) as err:
        raise SkipRun(f"config.yaml unreadable ({_first_line(err)})") from err
    if not isinstance(data, dict):
        raise SkipRun("config.yaml is not a mapping")
    return _flatten(data)


def _flatten(mapping: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _read_metrics(path: Path, problems: list[Skipped]) -> list[dict[str, Any]]:
    """Parse metrics.jsonl, skipping (and counting) lines a crash or a bug left malformed."""
    if not path.is_file():
        return []
    evaluations, bad_lines = [], 0
    try:
        with path.open(errors="replace") as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    evaluation = _parse_evaluation(json.loads(line))
                except json.JSONDecodeError:
                    evaluation = None
                if evaluation is None:
                    bad_lines += 1
                else:
                    evaluations.append(evaluation)
    except OSError as err:
        problems.append((path, f"unreadable ({_first_line(err)})"))
    if bad_lines:
        problems.append((path, f"{bad_lines} malformed line(s) ignored"))
    return evaluations


def _parse_evaluation(record: Any) -> dict[str, Any] | None:
    """Validate one metrics.jsonl record; None marks it malformed."""
    if not isinstance(record, dict) or not _is_int(record.get("step")):
        return None
    if record.get("split") not in SPLITS or record.get("source") not in SOURCES:
        return None
    evaluation = _clean_metrics(record)
    evaluation.update(
        step=record["step"],
        split=record["split"],
        source=record["source"],
        replica=record.get("replica") if _is_int(record.get("replica")) else None,
        episode=record.get("episode") if _is_int(record.get("episode")) else None,
    )
    return evaluation


def _clean_metrics(record: Any) -> dict[str, Any]:
    """Keep only finite numbers so that odd values never reach numpy or the table."""
    if not isinstance(record, dict):
        return {}
    cleaned: dict[str, Any] = {name: _as_float(record.get(name)) for name in METRICS}
    per_class = record.get("per_class")
    # null is the trainer's NaN (e.g. a class without test images): keep it as NaN, not as garbage.
    valid = (
        isinstance(per_class, list)
        and per_class
        and all(v is None or _as_float(v) is not None for v in per_class)
    )
    cleaned["per_class"] = (
        [math.nan if v is None else float(v) for v in per_class] if valid else None
    )
    return cleaned


def _representative_curve(evaluations: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Test evals of the model a run stands for: merged if K>1, else replica 0; one per step."""
    if k > 1:
        chosen = [e for e in evaluations if e["source"] == "merged"]
    else:
        chosen = [e for e in evaluations if e["source"] == "replica" and e["replica"] == 0]
    # A resumed run re-logs steps; the later line is the one that survived.
    by_step = {e["step"]: e for e in chosen if e["split"] == "test"}
    return [by_step[step] for step in sorted(by_step)]


def _merged_episodes(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_episode = {
        e["episode"]: e
        for e in evaluations
        if e["source"] == "merged" and e["split"] == "test" and e["episode"] is not None
    }
    return [by_episode[episode] for episode in sorted(by_episode)]


def _read_results(path: Path, problems: list[Skipped]) -> dict[str, Any] | None:
    """results.json if it is usable; a broken one is reported and the run treated as unfinished."""
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append((path, f"unreadable, run treated as unfinished ({_first_line(err)})"))
        return None
    if not isinstance(results, dict) or not isinstance(results.get("final"), dict):
        problems.append((path, "no 'final' metrics, run treated as unfinished"))
        return None
    return results


def _unfinished_state(status_path: Path, stale_seconds: float, now: float) -> tuple[str, str]:
    """Tell a live run from a dead one when there is no results.json."""
    if not status_path.is_file():
        return CRASHED, "no results.json and no status.json"
    try:
        status = json.loads(status_path.read_text())
    except (OSError, ValueError) as err:
        return CRASHED, f"no results.json; status.json unreadable ({_first_line(err)})"
    if not isinstance(status, dict):
        return CRASHED, "no results.json; status.json is not an object"
    state = status.get("status")
    if state == "failed":
        return CRASHED, f"failed: {status.get('error') or 'no error message'}"
    if state == "stopped":
        return STOPPED, "stopped early by train.stop_at (continue it with resume=true)"
    if state != "running":
        return CRASHED, f"status {state!r} but no results.json"
    updated = _as_float(status.get("updated"))
    age = f"{(now - updated) / 60:.0f} min ago" if updated is not None else "at an unknown time"
    if updated is not None and now - updated > stale_seconds:
        return CRASHED, f"stale: status running, last update {age}"
    pid, host = status.get("pid"), status.get("host")
    if host == socket.gethostname() and _is_int(pid) and pid > 0 and not _pid_alive(pid):
        return CRASHED, f"status running but pid {pid} is not alive on {host}"
    return RUNNING, f"in progress (pid {pid} on {host}, updated {age})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only checks existence
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _imwa_setting(config: dict[str, Any], name: str) -> int:
    """imwa.k / imwa.episodes; plain configs without an imwa block mean 1."""
    value = config.get(f"imwa.{name}")
    return value if _is_int(value) else 1


# --------------------------------------------------------------------------- grouping


def is_bookkeeping_key(key: str) -> bool:
    """Keys that vary between runs of the same experiment (seed, paths, device, logging...)."""
    parts = key.split(".")
    leaf = parts[-1]
    return (
        parts[0] in IGNORED_TOP_LEVEL
        or key in IGNORED_KEYS
        or leaf in IGNORED_LEAVES
        or leaf.endswith(IGNORED_LEAF_SUFFIXES)
    )


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by the config values that differ among them, ignoring seed and bookkeeping."""
    keys = sorted({key for run in runs for key in run.config if not is_bookkeeping_key(key)})
    varying = _distinguishing_keys(runs, [key for key in keys if len({_value_id(run, key) for run in runs}) > 1])
    buckets: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        buckets.setdefault(tuple(_value_id(run, key) for key in varying), []).append(run)
    groups = []
    for members in buckets.values():
        settings = {key: _format_value(members[0].config.get(key, _UNSET)) for key in varying}
        label = ", ".join(f"{key}={value}" for key, value in settings.items()) or "all runs"
        groups.append(Group(label=label, settings=settings, runs=members))
    groups.sort(
        key=lambda group: [_sort_key(group.runs[0].config.get(key, _UNSET)) for key in varying]
    )
    return groups


def _distinguishing_keys(runs: Sequence[Run], varying: list[str]) -> list[str]:
    """The varying keys that split the runs further, in order of preference.

    A key whose values follow from keys already kept (e.g. `algorithm.threshold` when
    `algorithm.name` differs, or a key that one algorithm's config lacks) does not change the
    groups, only lengthens their labels, so it is dropped.
    """
    kept: list[str] = []
    blocks = len({() for _ in runs})
    def preference(key: str) -> tuple[int, bool, str]:
        """Shallow keys first, then keys every run has (algorithm.name before algorithm.lambda_u)."""
        return key.count("."), any(key not in run.config for run in runs), key

    for key in sorted(varying, key=preference):
        refined = len({tuple(_value_id(run, k) for k in (*kept, key)) for run in runs})
        if refined > blocks:
            kept.append(key)
            blocks = refined
    return sorted(kept)


_UNSET = object()  # a key some configs lack; differs from an explicit null


def _value_id(run: Run, key: str) -> str:
    value = run.config.get(key, _UNSET)
    return "<unset>" if value is _UNSET else json.dumps(value, sort_keys=True, default=str)


def _format_value(value: Any) -> str:
    """Hydra override spelling (true, null, [1,2]) so a label can be pasted back on the CLI."""
    if value is _UNSET:
        return "<unset>"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers numerically (k=2 before k=10), then strings, then unset keys."""
    if value is _UNSET:
        return (2, 0.0, "")
    if _as_float(value) is not None:
        return (0, float(value), "")
    return (1, 0.0, _format_value(value))


# --------------------------------------------------------------------------- summarising


def run_values(run: Run) -> dict[str, float | None]:
    """A run's table values in display units (percent, hours), keyed like COLUMNS."""
    final = run.final or {}
    wall_time_h = run.wall_time_s / 3600 if run.wall_time_s is not None else None
    return {
        "final_top1": _percent(final.get("top1")),
        "best_top1": _percent((run.best or {}).get("top1")),
        "median20_top1": _percent((run.median_last20 or {}).get("top1")),
        "final_balanced_acc": _percent(final.get("balanced_acc")),
        "final_head": _percent(final.get("head")),
        "final_medium": _percent(final.get("medium")),
        "final_tail": _percent(final.get("tail")),
        "wall_time_h": wall_time_h,
        "images_per_s": run.images_per_s,
    }


def mean_std(values: Sequence[float]) -> Stat | None:
    """Mean and sample std over seeds; None when there is nothing to average."""
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return Stat(mean=float(np.mean(values)), std=std, n=len(values))


def summarise(group: Group, include_incomplete: bool = False) -> GroupSummary:
    """Average a group over seeds; incomplete runs count only if asked and if they have evals."""
    incomplete = [
        run
        for run in group.runs
        if run.state in INCOMPLETE_STATES and include_incomplete and run.final is not None
    ]
    included = [run for run in group.runs if run.state == COMPLETE] + incomplete
    values = [run_values(run) for run in included]
    stats = {key: mean_std([v[key] for v in values if v[key] is not None]) for key, _, _ in COLUMNS}
    return GroupSummary(
        group=group, included=included, stats=stats, notes=_status_notes(group.runs, included)
    )


def _status_notes(runs: Sequence[Run], included: Sequence[Run]) -> str:
    """E.g. '1 crashed included; 1 stopped, 1 running excluded' (complete runs go unmentioned)."""
    included_ids = {id(run) for run in included}
    notes = []
    for verb, wanted in (("included", True), ("excluded", False)):
        chosen = [run for run in runs if (id(run) in included_ids) == wanted]
        counts = [
            f"{count} {state}"
            for state in (*INCOMPLETE_STATES, RUNNING)
            if (count := sum(run.state == state for run in chosen))
        ]
        if counts:
            notes.append(", ".join(counts) + f" {verb}")
    return "; ".join(notes)


# --------------------------------------------------------------------------- output


def format_stat(stat: Stat | None, decimals: int, n_included: int) -> str:
    """'81.60 ± 0.20'; blank if no value; '(n=k)' when fewer runs than the group's n have it."""
    if stat is None:
        return ""
    text = f"{stat.mean:.{decimals}f} ± {stat.std:.{decimals}f}"
    return text if stat.n == n_included else f"{text} (n={stat.n})"


def format_table(summaries: Sequence[GroupSummary]) -> str:
    """Markdown table, one row per group."""
    headers = ["group", "n"] + [header for _, header, _ in COLUMNS] + ["notes"]
    rows = [
        [summary.marked_label, str(len(summary.included))]
        + [
            format_stat(summary.stats[key], decimals, len(summary.included))
            for key, _, decimals in COLUMNS
        ]
        + [summary.notes]
        for summary in summaries
    ]
    lines = [_markdown_row(headers), _markdown_row(["---"] * len(headers))]
    lines += [_markdown_row(row) for row in rows]
    return "\n".join(lines)


def _markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def format_report(
    summaries: Sequence[GroupSummary],
    include_incomplete: bool,
    plot_notes: Sequence[str],
    skipped: Sequence[Skipped],
) -> str:
    """The whole Markdown report: table, unfinished runs, plots, then everything skipped."""
    sections = ["# Run comparison", format_table(summaries)]
    incomplete = [
        (s.label, run) for s in summaries for run in s.group.runs if run.state in INCOMPLETE_STATES
    ]
    running = [(s.label, run) for s in summaries for run in s.group.runs if run.state == RUNNING]
    if incomplete:
        how = (
            "included in the means (--include-incomplete) if they have test evaluations, "
            "with the last one as final"
            if include_incomplete
            else "excluded from the means (pass --include-incomplete to include them)"
        )
        lines = [f"{CRASH_MARK} Crashed or stopped runs, {how}:"]
        lines += [
            f"- {run.path} [{label}]: {run.reason}; {_last_eval_text(run)}"
            for label, run in incomplete
        ]
        sections.append("\n".join(lines))
    if running:
        lines = ["In progress (excluded):"]
        lines += [
            f"- {run.path} [{label}]: {run.reason}; {_last_eval_text(run)}"
            for label, run in running
        ]
        sections.append("\n".join(lines))
    sections.append("\n".join(["Plots:"] + [f"- {note}" for note in plot_notes]))
    if skipped:
        sections.append("\n".join(f"skipped: {path}: {reason}" for path, reason in skipped))
    return "\n\n".join(sections) + "\n"


def _last_eval_text(run: Run) -> str:
    if not run.curve:
        return "no test evaluations in metrics.jsonl"
    last = run.curve[-1]
    accuracies = ", ".join(
        f"{name} {last[name] * 100:.2f}%"
        for name in ("top1", "balanced_acc")
        if last[name] is not None
    )
    return f"last test evaluation at step {last['step']}" + (
        f": {accuracies}" if accuracies else ""
    )


def write_csv(summaries: Sequence[GroupSummary], path: Path) -> None:
    """Machine-readable twin of the table: one column per varying key, mean/std/n per value."""
    setting_keys = list(summaries[0].group.settings) if summaries else []
    header = ["group", *setting_keys, "n", *INCOMPLETE_STATES, RUNNING]
    for key, _, _ in COLUMNS:
        header += [f"{key}_mean", f"{key}_std", f"{key}_n"]
    header.append("notes")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for summary in summaries:
            runs = summary.group.runs
            row: list[Any] = [
                summary.label,
                *summary.group.settings.values(),
                len(summary.included),
            ]
            row += [
                sum(run.state == state for run in runs) for state in (*INCOMPLETE_STATES, RUNNING)
            ]
            for key, _, _ in COLUMNS:
                stat = summary.stats[key]
                row += [round(stat.mean, 4), round(stat.std, 4), stat.n] if stat else ["", "", 0]
            row.append(summary.notes)
            writer.writerow(row)


# --------------------------------------------------------------------------- plots


def plot_curves(summaries: Sequence[GroupSummary], metric: str, path: Path) -> str:
    """Test `metric` against step per group: mean over seeds with a min-max band."""
    colors = _group_colors(summaries)
    lines = [
        (s.label, colors[s.label], [_series(run.curve, "step", metric) for run in s.included])
        for s in summaries
    ]
    return _plot_series(
        lines,
        path,
        xlabel="step",
        ylabel=f"test {metric} (%)",
        description=f"test {metric} vs step per group, mean over seeds with min-max band",
    )


def plot_episodes(summaries: Sequence[GroupSummary], metric: str, path: Path) -> str:
    """Merged-model accuracy after each IMWA episode, for groups that actually merge."""
    merging = [
        summary
        for summary in summaries
        if max(_imwa_setting(summary.group.runs[0].config, name) for name in ("k", "episodes")) > 1
    ]
    if not merging:
        path.unlink(missing_ok=True)
        return f"{path.name} not written: no group has imwa.k > 1 or imwa.episodes > 1"
    colors = _group_colors(summaries)
    lines = [
        (s.label, colors[s.label], [_series(run.episodes, "episode", metric) for run in s.included])
        for s in merging
    ]
    return _plot_series(
        lines,
        path,
        xlabel="IMWA episode",
        ylabel=f"merged test {metric} (%)",
        description=f"merged test {metric} after each episode, mean over seeds, min-max band",
        integer_x=True,
    )


def _series(evaluations: list[dict[str, Any]], x_key: str, metric: str) -> dict[int, float]:
    return {e[x_key]: e[metric] * 100 for e in evaluations if e[metric] is not None}


def _group_colors(summaries: Sequence[GroupSummary]) -> dict[str, str]:
    """One color per group, the same in every plot even when a plot shows only some groups."""
    return {summary.label: f"C{index % 10}" for index, summary in enumerate(summaries)}


def _plot_series(
    lines: Sequence[tuple[str, str, list[dict[int, float]]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    description: str,
    integer_x: bool = False,
) -> str:
    figure, axes = _new_figure()
    plotted = 0
    for label, color, series in lines:
        series = [points for points in series if points]
        if series:
            _plot_band(axes, series, label, color, marker="o" if integer_x else None)
            plotted += 1
    if not plotted:
        path.unlink(missing_ok=True)  # never leave a plot from an earlier report next to this one
        return f"{path.name} not written: no {ylabel} values in metrics.jsonl of the included runs"
    axes.set(xlabel=xlabel, ylabel=ylabel)
    if integer_x:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="x-small")
    figure.savefig(path)
    return f"{path.name}: {description}"


def _plot_band(
    axes: Axes, series: list[dict[int, float]], label: str, color: str, marker: str | None
) -> None:
    """Mean line and min-max band; a step only some seeds reached averages over those seeds."""
    xs = sorted(set().union(*series))
    columns = [[points[x] for points in series if x in points] for x in xs]
    means = [np.mean(column) for column in columns]
    axes.plot(xs, means, label=label, color=color, marker=marker, markersize=3)
    lows, highs = [min(column) for column in columns], [max(column) for column in columns]
    axes.fill_between(xs, lows, highs, color=color, alpha=0.2, linewidth=0)


def plot_per_class(
    summaries: Sequence[GroupSummary], selectors: Sequence[str] | None, path: Path
) -> str:
    """Final per-class test accuracy, class 0 (head) to C-1 (tail), for up to 6 groups."""
    chosen = [s for s in summaries if not selectors or any(sel in s.label for sel in selectors)]
    colors = _group_colors(summaries)
    bars = [(s.label, mean) for s in chosen if (mean := _mean_per_class(s.included)) is not None]
    if not bars:
        path.unlink(missing_ok=True)
        return f"{path.name} not written: no per-class accuracies in the selected groups"
    shown = bars[:MAX_PER_CLASS_GROUPS]
    figure, axes = _new_figure()
    width = 0.8 / len(shown)
    for index, (label, mean) in enumerate(shown):
        offset = (index - (len(shown) - 1) / 2) * width
        axes.bar(np.arange(len(mean)) + offset, mean, width, label=label, color=colors[label])
    axes.set(xlabel="class index (head → tail)", ylabel="final test accuracy (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="x-small")
    figure.savefig(path)
    note = f"{path.name}: final per-class test accuracy (mean over seeds), head to tail"
    if len(bars) > len(shown):
        note += f"; first {len(shown)} of {len(bars)} groups shown, choose with --per-class-groups"
    return note


def _mean_per_class(runs: Sequence[Run]) -> np.ndarray | None:
    per_class = [(run.final or {}).get("per_class") for run in runs]
    per_class = [values for values in per_class if values]
    # Seeds of one group share the dataset; ignore any run whose class count disagrees.
    same_length = np.array([values for values in per_class if len(values) == len(per_class[0])])
    if not len(same_length):
        return None
    # Mean over the seeds that have a value for the class; NaN (no bar) where none has.
    counts = np.sum(~np.isnan(same_length), axis=0)
    sums = np.nansum(same_length, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan) * 100


def _new_figure() -> tuple[Figure, Axes]:
    """A pyplot-free Agg figure: no global backend switch, nothing left open between calls."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


# --------------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _percent(value: float | None) -> float | None:
    return value * 100 if value is not None else None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_imwa.report",
        description="Compare runs: mean ± sample std over seeds per config group, plus plots.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="RUN_DIR", help="run dirs, sweep roots or globs"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("report"),
        metavar="DIR",
        help="output dir (default: ./report)",
    )
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="balanced_acc",
        help="metric of curves.png and episodes.png",
    )
    parser.add_argument(
        "--per-class-groups",
        nargs="+",
        metavar="SUBSTRING",
        help=f"label substrings of per_class.png groups (default: all, max {MAX_PER_CLASS_GROUPS})",
    )
    parser.add_argument(
        "--stale-minutes",
        type=float,
        metavar="MINUTES",
        default=30.0,
        help="a 'running' run not updated for this long counts as crashed (default: 30)",
    )
    parser.add_argument(
        "--include-incomplete",
        action="store_true",
        help="average crashed and stopped runs too, using their last test evaluation as final",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; returns 1 only when no run could be read at all."""
    args = parse_args(argv)
    run_dirs, skipped = discover(args.paths)
    now = time.time()
    runs = []
    for run_dir in run_dirs:
        try:
            run = load_run(run_dir, stale_seconds=args.stale_minutes * 60, now=now)
        except SkipRun as err:
            skipped.append((run_dir, str(err)))
            continue
        runs.append(run)
        skipped.extend(run.problems)
    if not runs:
        print("no readable runs found")
        for path, reason in skipped:
            print(f"skipped: {path}: {reason}")
        return 1
    summaries = [summarise(group, args.include_incomplete) for group in group_runs(runs)]
    args.out.mkdir(parents=True, exist_ok=True)
    plot_notes = [
        plot_curves(summaries, args.metric, args.out / "curves.png"),
        plot_episodes(summaries, args.metric, args.out / "episodes.png"),
        plot_per_class(summaries, args.per_class_groups, args.out / "per_class.png"),
    ]
    write_csv(summaries, args.out / "report.csv")
    report = format_report(summaries, args.include_incomplete, plot_notes, skipped)
    (args.out / "report.md").write_text(report)
    print(report, end="")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
