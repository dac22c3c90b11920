"""Curves, merged-model episodes and per-class accuracy as small PNGs.

Every figure keeps its axes at a fixed size and puts the legend below them, wrapped to the
figure's width: the figure grows downwards with the legend instead of the axes shrinking, so ten
groups with long labels stay readable and nothing runs off the image.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssl_imwa.report.groups import GroupSummary
from ssl_imwa.report.runs import Run, imwa_setting

if TYPE_CHECKING:   # matplotlib is imported when a figure is drawn: a training run imports this package, never draws
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_PER_CLASS_GROUPS = 6
WIDTH_IN, AXES_HEIGHT_IN, DPI = 7.0, 3.2, 100
LEGEND_FONT_PT = 8.0
# Width of a legend character relative to its font size (DejaVu Sans digits, its widest common
# glyphs): used only to choose columns and wrap points; the figure height comes from the drawn legend.
CHAR_WIDTH_EM = 0.64
LEGEND_HANDLE_CHARS = 7  # the line sample and padding in front of each legend entry
METRIC_NAMES = {"top1": "top-1 accuracy", "balanced_acc": "balanced accuracy", "macro_f1": "macro-F1",
                "head": "head-class accuracy", "medium": "medium-class accuracy", "tail": "tail-class accuracy"}
LINE_STYLES = ("-", "--", ":", "-.")  # after the 10 colours, so groups 11+ still differ


def plot_curves(summaries: Sequence[GroupSummary], metric: str, path: Path) -> str:
    """Test `metric` against step per group: mean over seeds with a min-max band."""
    figure = curves_figure(summaries, metric)
    if figure is None:
        path.unlink(missing_ok=True)  # never leave a plot from an earlier report next to this one
        return f"{path.name} not written: no test {metric} values in metrics.jsonl of the included runs"
    figure.savefig(path)
    return f"{path.name}: test {metric} vs step per group, mean over seeds with min-max band" \
        + _few_points_note(summaries, lambda run: run.curve, "step", metric, "test evaluation")


def curves_figure(summaries: Sequence[GroupSummary], metric: str) -> Figure | None:
    """The figure of plot_curves; None when no included run has a test evaluation."""
    styles = _group_styles(summaries)
    lines = [(s.label, styles[s.label], [_series(run.curve, "step", metric) for run in s.included])
             for s in summaries]
    return _series_figure(lines, xlabel="step", ylabel=f"test {METRIC_NAMES[metric]} (%)",
                          title=f"Test {METRIC_NAMES[metric]} during training")


def plot_episodes(summaries: Sequence[GroupSummary], metric: str, path: Path) -> str:
    """Merged-model accuracy after each IMWA episode, for groups that actually merge."""
    if not _merging(summaries):
        path.unlink(missing_ok=True)
        return f"{path.name} not written: no group has imwa.k > 1 or imwa.episodes > 1"
    figure = episodes_figure(summaries, metric)
    if figure is None:
        path.unlink(missing_ok=True)
        return f"{path.name} not written: no merged test {metric} values in metrics.jsonl of the included runs"
    figure.savefig(path)
    return f"{path.name}: merged test {metric} after each episode, mean over seeds, min-max band" \
        + _few_points_note(_merging(summaries), lambda run: run.episodes, "episode", metric, "merged evaluation")


def episodes_figure(summaries: Sequence[GroupSummary], metric: str) -> Figure | None:
    """The figure of plot_episodes; None when no merging group has a merged evaluation."""
    styles = _group_styles(summaries)
    lines = [(s.label, styles[s.label], [_series(run.episodes, "episode", metric) for run in s.included])
             for s in _merging(summaries)]
    return _series_figure(lines, xlabel="IMWA episode",
                          ylabel=f"merged model: test {METRIC_NAMES[metric]} (%)",
                          title=f"Merged model after each IMWA episode: test {METRIC_NAMES[metric]}",
                          integer_x=True)


def _few_points_note(summaries: Sequence[GroupSummary], evaluations: Callable[[Run], list[dict[str, Any]]],
                     x_key: str, metric: str, what: str) -> str:
    """What the plot's note says about groups with fewer than two points: one x value (a single
    marker, no line to see) or none (not drawn), by label; '' when every group has a line."""
    counts = {s.label: len(set().union(*(_series(evaluations(run), x_key, metric) for run in s.included)))
              for s in summaries}
    single = [label for label, count in counts.items() if count == 1]
    empty = [label for label, count in counts.items() if count == 0]
    note = ""
    if single:
        note += f"; only one {what} (a single marker, no line): {'; '.join(single)}"
    if empty:
        note += f"; no {what} with {metric} (not drawn): {'; '.join(empty)}"
    return note


def _merging(summaries: Sequence[GroupSummary]) -> list[GroupSummary]:
    return [summary for summary in summaries
            if max(imwa_setting(summary.group.runs[0].config, name) for name in ("k", "episodes")) > 1]


def _series(evaluations: list[dict[str, Any]], x_key: str, metric: str) -> dict[int, float]:
    return {e[x_key]: e[metric] * 100 for e in evaluations if e[metric] is not None}


def _group_styles(summaries: Sequence[GroupSummary]) -> dict[str, tuple[str, str]]:
    """One (colour, line style) per group, the same in every plot even when a plot shows only some."""
    return {summary.label: (f"C{index % 10}", LINE_STYLES[index // 10 % len(LINE_STYLES)])
            for index, summary in enumerate(summaries)}


def _series_figure(
    lines: Sequence[tuple[str, tuple[str, str], list[dict[int, float]]]],
    xlabel: str,
    ylabel: str,
    title: str,
    integer_x: bool = False,
) -> Figure | None:
    figure, axes = _new_figure()
    plotted = 0
    for label, style, series in lines:
        series = [points for points in series if points]
        if series:
            _plot_band(axes, series, label, style, marker="o")  # a group with one evaluation is a dot
            plotted += 1
    if not plotted:
        return None
    axes.set(xlabel=xlabel, ylabel=ylabel)
    if integer_x:
        axes.xaxis.set_major_locator(_integer_ticks())
    _finish(figure, axes, title, legend_title="mean over seeds; shaded: min to max over seeds")
    return figure


def _plot_band(
    axes: Axes, series: list[dict[int, float]], label: str, style: tuple[str, str], marker: str | None
) -> None:
    """Mean line and min-max band; a step only some seeds reached averages over those seeds."""
    color, linestyle = style
    xs = sorted(set().union(*series))
    columns = [[points[x] for points in series if x in points] for x in xs]
    means = [np.mean(column) for column in columns]
    axes.plot(xs, means, label=label, color=color, linestyle=linestyle, marker=marker, markersize=4)
    lows, highs = [min(column) for column in columns], [max(column) for column in columns]
    axes.fill_between(xs, lows, highs, color=color, alpha=0.2, linewidth=0)


def plot_per_class(
    summaries: Sequence[GroupSummary], selectors: Sequence[str] | None, path: Path
) -> str:
    """Final per-class test accuracy, class 0 (head) to C-1 (tail), for up to 6 groups."""
    chosen = [s for s in summaries if not selectors or any(sel in s.label for sel in selectors)]
    bars = [(s.label, mean) for s in chosen if (mean := _mean_per_class(s.included)) is not None]
    if not bars:
        path.unlink(missing_ok=True)
        return f"{path.name} not written: no per-class accuracies in the selected groups"
    per_class_figure(summaries, bars[:MAX_PER_CLASS_GROUPS]).savefig(path)
    note = f"{path.name}: final per-class test accuracy (mean over seeds), head to tail"
    if len(bars) > MAX_PER_CLASS_GROUPS:
        note += f"; first {MAX_PER_CLASS_GROUPS} of {len(bars)} groups shown, choose with --per-class-groups"
    return note


def per_class_figure(summaries: Sequence[GroupSummary], bars: Sequence[tuple[str, np.ndarray]]) -> Figure:
    """Grouped bars of (label, per-class accuracy in %) in the groups' colours."""
    styles = _group_styles(summaries)
    figure, axes = _new_figure()
    width = 0.8 / len(bars)
    for index, (label, mean) in enumerate(bars):
        offset = (index - (len(bars) - 1) / 2) * width
        axes.bar(np.arange(len(mean)) + offset, mean, width, label=label, color=styles[label][0])
    axes.set(xlabel="class index (head → tail)", ylabel="final test accuracy (%)")
    axes.xaxis.set_major_locator(_integer_ticks())
    _finish(figure, axes, "Final test accuracy per class", legend_title="mean over seeds")
    return figure


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


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _new_figure() -> tuple[Figure, Axes]:
    """A pyplot-free Agg figure: no global backend switch, nothing left open between calls."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, AXES_HEIGHT_IN + 1.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _finish(figure: Figure, axes: Axes, title: str, legend_title: str) -> None:
    """Title, and the legend below the axes in as many columns as the labels allow, wrapped to
    the figure's width; then the figure grows by the legend's drawn height so the axes keep theirs."""
    axes.set_title(title, fontsize="medium", wrap=True)
    handles, labels = axes.get_legend_handles_labels()
    columns, wrap_at = _legend_columns([len(label) for label in labels])
    wrapped = [textwrap.fill(label, wrap_at, break_on_hyphens=False) for label in labels]
    legend = figure.legend(handles, wrapped, loc="outside lower center", ncols=columns, title=legend_title,
                           fontsize=LEGEND_FONT_PT, title_fontsize=LEGEND_FONT_PT, frameon=False)
    # The legend's size does not depend on where it goes: measure it before any layout runs.
    legend_height_in = legend.get_window_extent(figure.canvas.get_renderer()).height / figure.dpi
    figure.set_size_inches(WIDTH_IN, AXES_HEIGHT_IN + 1.2 + legend_height_in)


def _legend_columns(label_lengths: Sequence[int]) -> tuple[int, int]:
    """(columns, characters per line): the most columns (up to 3) in which the longest label
    fits on one line, else one column with labels wrapped to the figure's width."""
    line_chars = math.floor(WIDTH_IN * 72 / (LEGEND_FONT_PT * CHAR_WIDTH_EM))
    longest = max(label_lengths, default=0)
    for columns in (3, 2):
        budget = line_chars // columns - LEGEND_HANDLE_CHARS
        if columns <= len(label_lengths) and longest <= budget:
            return columns, budget
    return 1, line_chars - LEGEND_HANDLE_CHARS
