"""`python -m ssl_imwa.report`: arguments and the whole report."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ssl_imwa.report.groups import group_runs, summarise
from ssl_imwa.report.plots import (
    MAX_PER_CLASS_GROUPS,
    plot_curves,
    plot_episodes,
    plot_per_class,
)
from ssl_imwa.report.runs import (
    METRICS,
    RUN_MARKERS,
    SkipRun,
    discover,
    load_run,
)
from ssl_imwa.report.tables import format_report, write_csv
from ssl_imwa.report.tensorboard import write_view

# --------------------------------------------------------------------------- CLI


def _is_run_directory(path: Path, run_dirs: set[Path]) -> bool:
    """A run the report read, or a directory holding a file or folder only runs have (RUN_MARKERS)."""
    return path in run_dirs or any(os.path.lexists(path / name) for name in RUN_MARKERS)


def run_directory_clash(out: Path, run_dirs: Sequence[Path]) -> str | None:
    """How `out` collides with a run directory (it is one, lies inside one, or contains one), or None.

    The report deletes and rewrites what it owns in `out` (`tensorboard/`, the PNGs): in a run
    directory that would be the run's own files. Links are not followed, so a report's earlier
    view (links into the runs) is not a run.
    """
    target = Path(os.path.abspath(out))
    runs = {Path(os.path.abspath(run_dir)) for run_dir in run_dirs}
    runs |= {Path(os.path.realpath(run_dir)) for run_dir in run_dirs}
    resolved = Path(os.path.realpath(target))
    for candidate in dict.fromkeys([target, resolved, *target.parents, *resolved.parents]):
        if candidate.is_dir() and _is_run_directory(candidate, runs):
            return f"{'is' if candidate in (target, resolved) else 'lies inside'} the run directory {candidate}"
    if resolved.is_dir():
        for dirpath, dirnames, _ in os.walk(resolved):
            if _is_run_directory(Path(dirpath), runs):
                return f"contains the run directory {dirpath}"
            # a sweep's runs sit a few levels down (multirun/<date>/<time>/<job>); no need to walk a data tree
            depth = len(Path(dirpath).relative_to(resolved).parts)
            dirnames[:] = [name for name in dirnames if not name.startswith(".")] if depth < 4 else []
    for run_dir in runs:
        if run_dir.is_relative_to(resolved) or run_dir.is_relative_to(target):
            return f"contains the run directory {run_dir}"
    return None


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
        help="output dir (default: ./report); refused if it is, lies inside or holds a run directory",
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
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write OUT/tensorboard: the runs under short names, with the HParams experiment declared",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; returns 1 only when no run could be read at all."""
    args = parse_args(argv)
    run_dirs, skipped = discover(args.paths)
    if (clash := run_directory_clash(args.out, run_dirs)) is not None:
        print(f"error: --out {args.out} {clash}: the report never writes into a run directory; "
              "choose an --out outside every run", file=sys.stderr)
        return 1
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
    if args.tensorboard:
        print(f"wrote {write_view(summaries, args.out / 'tensorboard')}")
    return 0


