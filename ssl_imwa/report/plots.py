"""Curves, merged-model episodes and per-class accuracy as small PNGs."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ssl_imwa.report.groups import GroupSummary
from ssl_imwa.report.runs import Run, imwa_setting

# --------------------------------------------------------------------------- plots


MAX_PER_CLASS_GROUPS = 6
FIGSIZE, DPI = (6.0, 4.0), 100


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
        if max(imwa_setting(summary.group.runs[0].config, name) for name in ("k", "episodes")) > 1
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


