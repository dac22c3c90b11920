"""Compare finished (and unfinished) training runs: average seeds per config, flag crashes, plot.

    python -m ssl_imwa.report RUN_DIR_OR_SWEEP... [--out DIR] [--metric balanced_acc]

Deliberately torch-free (stdlib, numpy, PyYAML, matplotlib Agg) so it starts in a second on a
login node and can read run directories while training is still going on elsewhere.
Modules: `runs` finds and reads run directories, `groups` groups them and averages over seeds,
`tables` writes the Markdown and CSV, `plots` the PNGs, `cli` ties them together.
"""
from ssl_imwa.report.cli import main, parse_args
from ssl_imwa.report.groups import (
    Group,
    GroupSummary,
    Stat,
    aliases,
    duration,
    group_runs,
    is_bookkeeping_key,
    mean_std,
    summarise,
)
from ssl_imwa.report.plots import plot_curves, plot_episodes, plot_per_class
from ssl_imwa.report.runs import (
    COMPLETE,
    CRASHED,
    RUNNING,
    STOPPED,
    Run,
    SkipRun,
    discover,
    load_run,
)
from ssl_imwa.report.tables import format_report, format_stat, format_table, write_csv

__all__ = [
    "COMPLETE", "CRASHED", "RUNNING", "STOPPED", "Group", "GroupSummary", "Run", "SkipRun", "Stat", "aliases",
    "discover", "duration", "format_report", "format_stat", "format_table", "group_runs", "is_bookkeeping_key",
    "load_run", "main", "mean_std", "parse_args", "plot_curves", "plot_episodes", "plot_per_class", "summarise",
    "write_csv",
]
