"""The Markdown table with its notes, and the CSV."""
from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssl_imwa.report.groups import COLUMNS, GroupSummary, Stat, alias_note
from ssl_imwa.report.runs import (
    CRASH_MARK,
    INCOMPLETE_STATES,
    RUNNING,
    Run,
    Skipped,
)

# --------------------------------------------------------------------------- output


def format_stat(stat: Stat | None, text: Callable[[float], str], n_included: int) -> str:
    """'81.60 ± 0.20'; a single value has no spread, so just '81.60'; blank if no value;
    '(n=k)' when fewer runs than the group's n have it."""
    if stat is None:
        return ""
    cell = text(stat.mean) if stat.std is None else f"{text(stat.mean)} ± {text(stat.std)}"
    return cell if stat.n == n_included else f"{cell} (n={stat.n})"


def format_table(summaries: Sequence[GroupSummary]) -> str:
    """Markdown table, one row per group."""
    headers = ["group", "n"] + [column.header for column in COLUMNS] + ["notes"]
    rows = [
        [summary.marked_label, str(len(summary.included))]
        + [
            format_stat(summary.stats[column.key], column.text, len(summary.included))
            for column in COLUMNS
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
    if summaries and (note := alias_note(list(summaries[0].group.settings))):
        sections.append(f"Group labels use short names: {note}.")
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
    for column in COLUMNS:
        header += [f"{column.key}_mean", f"{column.key}_std", f"{column.key}_n"]
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
            for column in COLUMNS:
                stat = summary.stats[column.key]
                if stat is None:
                    row += ["", "", 0]
                else:
                    std = "" if stat.std is None else round(stat.std, 4)
                    row += [round(stat.mean, 4), std, stat.n]
            row.append(summary.notes)
            writer.writerow(row)


