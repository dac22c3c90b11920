"""Finding run directories and reading them: config, metrics, results and liveness."""
from __future__ import annotations

import glob
import json
import math
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ssl_imwa.keys import LAUNCH_KEYS, SUMMARY_METRICS

METRICS = SUMMARY_METRICS
SOURCES = ("replica", "merged")
SPLITS = ("val", "test")
COMPLETE, CRASHED, STOPPED, RUNNING = "complete", "crashed", "stopped", "running"
# Unfinished runs that will not continue by themselves: marked, averaged only on request.
INCOMPLETE_STATES = (CRASHED, STOPPED)
CRASH_MARK = "†"
MEDIAN_WINDOW = 20
# Files that only a run directory has; a directory with them but without config.yaml is reported.
RUN_MARKERS = ("status.json", "metrics.jsonl", "results.json", ".hydra")
HYDRA_SWEEP_RECORD = "multirun.yaml"  # sits next to the job dirs `multirun/<date>/<time>/*` matches
# Keys that differ between runs without changing the experiment, so they must not split groups:
# the launch keys, the seed (groups are across seeds) and anything naming a place on disk.
IGNORED_TOP_LEVEL = ("seed", "hydra", "logging")
IGNORED_KEYS = LAUNCH_KEYS
IGNORED_LEAVES = ("dir", "path", "root")
IGNORED_LEAF_SUFFIXES = ("_dir", "_path", "_file", "_root")

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
        curve=_representative_curve(evaluations, imwa_setting(config, "k")),
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
        run.wall_time_s = as_float(results.get("wall_time_s"))
        run.images_per_s = as_float(results.get("images_per_s"))
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
    return flatten(data)


def flatten(mapping: dict[Any, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (`imwa.k`), the names Hydra overrides use."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
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
    cleaned: dict[str, Any] = {name: as_float(record.get(name)) for name in METRICS}
    per_class = record.get("per_class")
    # null is the trainer's NaN (e.g. a class without test images): keep it as NaN, not as garbage.
    valid = (
        isinstance(per_class, list)
        and per_class
        and all(v is None or as_float(v) is not None for v in per_class)
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
    if state == "stopped":  # by a signal (its message says which), else at train.stop_at
        error = status.get("error")
        why = error.removeprefix("Terminated: ").split(",")[0] if error else "stopped early by train.stop_at"
        return STOPPED, f"{why} (continue it with resume=true)"
    if state != "running":
        return CRASHED, f"status {state!r} but no results.json"
    updated = as_float(status.get("updated"))
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


def imwa_setting(config: dict[str, Any], name: str) -> int:
    """imwa.k / imwa.episodes; plain configs without an imwa block mean 1."""
    value = config.get(f"imwa.{name}")
    return value if _is_int(value) else 1


# --------------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def percent(value: float | None) -> float | None:
    return value * 100 if value is not None else None


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


