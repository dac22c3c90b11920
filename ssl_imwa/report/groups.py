"""Grouping runs by the config values that differ, and their mean ± std over seeds."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssl_imwa.report.runs import (
    COMPLETE,
    CRASH_MARK,
    IGNORED_KEYS,
    IGNORED_LEAF_SUFFIXES,
    IGNORED_LEAVES,
    IGNORED_TOP_LEVEL,
    INCOMPLETE_STATES,
    RUNNING,
    Run,
    as_float,
    percent,
)


def _fixed(decimals: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{decimals}f}"


def duration(seconds: float) -> str:
    """h:mm:ss, so a 30-second run and a two-day run are both readable in one column."""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass(frozen=True)
class Column:
    """A table/CSV value column: `key` names the CSV columns, `text` spells a value in the table."""

    key: str
    header: str
    text: Callable[[float], str]


# Accuracies are in percent, wall time in seconds (h:mm:ss in the table).
COLUMNS: tuple[Column, ...] = (
    Column("final_top1", "final top1 (%)", _fixed(2)),
    Column("best_top1", "best top1 (%)", _fixed(2)),
    Column("median20_top1", "median last-20 top1 (%)", _fixed(2)),
    Column("final_balanced_acc", "final bal. acc (%)", _fixed(2)),
    Column("final_head", "head (%)", _fixed(2)),
    Column("final_medium", "medium (%)", _fixed(2)),
    Column("final_tail", "tail (%)", _fixed(2)),
    Column("wall_time_s", "wall time (h:mm:ss)", duration),
    Column("images_per_s", "images/s", _fixed(0)),
)


@dataclass
class Group:
    """Runs sharing every non-bookkeeping config value except the seed."""

    label: str
    settings: dict[str, str]  # varying key -> value as shown in the label
    runs: list[Run]


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std (ddof=1); None for a single value, which has no spread
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
    varying = _label_keys(runs, [key for key in keys if len({_value_id(run, key) for run in runs}) > 1])
    buckets: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        buckets.setdefault(tuple(_value_id(run, key) for key in varying), []).append(run)
    names = aliases(varying)
    groups = []
    for members in buckets.values():
        settings = {key: _format_value(members[0].config.get(key, _UNSET)) for key in varying}
        label = ", ".join(f"{names[key]}={value}" for key, value in settings.items()) or "all runs"
        groups.append(Group(label=label, settings=settings, runs=members))
    groups.sort(
        key=lambda group: [_sort_key(group.runs[0].config.get(key, _UNSET)) for key in varying]
    )
    return groups


# Config groups chosen by name: a differing `<section>.name` brings the section's other keys along.
NAMED_SECTIONS = ("algorithm", "dataset", "model")
# The recipe keys in the order a reader looks for them; other keys follow alphabetically.
LABEL_ORDER = ("algorithm.name", "dataset.name", "model.name", "imwa.k", "imwa.episodes", "imwa.merge",
               "imwa.momentum")
# Short names in labels, plot legends and TensorBoard run names (the paper's K and E for IMWA).
ALIASES = {"algorithm.name": "algorithm", "dataset.name": "dataset", "model.name": "model", "imwa.k": "K",
           "imwa.episodes": "E"}


def _label_keys(runs: Sequence[Run], varying: list[str]) -> list[str]:
    """The varying keys that name the groups, in reader order.

    Every varying key is kept, except a key of a named section (`algorithm.threshold`) when that
    section's `name` differs and the key splits no group further: it comes with the choice of
    algorithm (or is missing from one algorithm's config) and would only lengthen the labels. A
    key that merely varies together with another (`imwa.merge` with `dataset.val_per_class`) is
    kept: the reader needs both.
    """
    named = {key.split(".")[0] for key in varying if key in {f"{section}.name" for section in NAMED_SECTIONS}}
    kept = [key for key in varying if key.split(".")[0] not in named or key.endswith(".name")]
    return sorted(splitting_keys(runs, varying, kept), key=_reader_order)


def splitting_keys(runs: Sequence[Run], keys: Sequence[str], kept: Sequence[str] = ()) -> list[str]:
    """`kept`, plus each of `keys` in turn that splits the runs further: with an empty `kept`,
    the fewest keys (preferring earlier ones) that tell the same groups apart."""
    chosen = list(kept)
    blocks = _blocks(runs, chosen)
    for key in keys:
        if key not in chosen and (refined := _blocks(runs, [*chosen, key])) > blocks:
            chosen.append(key)
            blocks = refined
    return chosen


def _blocks(runs: Sequence[Run], keys: Sequence[str]) -> int:
    return len({tuple(_value_id(run, key) for key in keys) for run in runs})


def alias_note(keys: Sequence[str]) -> str:
    """'K = imwa.k, E = imwa.episodes' for the keys whose label name is not the key itself."""
    return ", ".join(f"{name} = {key}" for key, name in aliases(keys).items() if name != key)


def _reader_order(key: str) -> tuple[int, str]:
    return (LABEL_ORDER.index(key), "") if key in LABEL_ORDER else (len(LABEL_ORDER), key)


def aliases(keys: Sequence[str]) -> dict[str, str]:
    """Short names for `keys`: ALIASES, else the key without its section (`train.lr` -> `lr`)
    when no other key in `keys` shortens to the same name, else the full key."""
    short = {key: ALIASES.get(key, key.split(".", 1)[-1]) for key in keys}
    taken = list(short.values())
    return {key: name if taken.count(name) == 1 else key for key, name in short.items()}


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
    if as_float(value) is not None:
        return (0, float(value), "")
    return (1, 0.0, _format_value(value))


# --------------------------------------------------------------------------- summarising


def run_values(run: Run) -> dict[str, float | None]:
    """A run's table values (accuracies in percent), keyed like COLUMNS."""
    final = run.final or {}
    return {
        "final_top1": percent(final.get("top1")),
        "best_top1": percent((run.best or {}).get("top1")),
        "median20_top1": percent((run.median_last20 or {}).get("top1")),
        "final_balanced_acc": percent(final.get("balanced_acc")),
        "final_head": percent(final.get("head")),
        "final_medium": percent(final.get("medium")),
        "final_tail": percent(final.get("tail")),
        "wall_time_s": run.wall_time_s,
        "images_per_s": run.images_per_s,
    }


def mean_std(values: Sequence[float]) -> Stat | None:
    """Mean and sample std over seeds; None when there is nothing to average."""
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
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
    stats = {
        column.key: mean_std([v[column.key] for v in values if v[column.key] is not None])
        for column in COLUMNS
    }
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


