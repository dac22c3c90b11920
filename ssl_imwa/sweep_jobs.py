"""A sweep (`python main.py -m ...`) outlives its bad jobs.

Each job that fails (a bad value, missing data, a bug) records `failed` and its reason in its own
`status.json`, says so in a line, and the sweep goes on to the next job; a report of the sweep
lists it. At the end the sweep's exit status is the number of jobs that failed (0: none; at most
125, above which shells reserve the codes), after one line naming them. Jobs that a launcher ran in
other processes (Slurm jobs, submitit's local processes) are counted from the `status.json` files they
wrote under the sweep directory (`CountJobsRunElsewhere`, a Hydra callback). A stop that was asked for
(Ctrl-C, SIGTERM) stops the whole sweep, as it stops a run.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ssl_imwa.stopping import Terminated
from ssl_imwa.user_errors import short_user_errors

log = logging.getLogger("ssl_imwa")
Result = TypeVar("Result")
HIGHEST_EXIT_STATUS = 125


class SweepJobs:
    """The jobs of one sweep in this process: how many ran, which failed and why."""

    def __init__(self) -> None:
        self.started = 0
        self.failed: list[str] = []   # their run directories

    def run(self, job: Callable[[], Result], run_dir: str) -> Result | None:
        """`job()`, or None when it fails: a user's mistake in its `error:` line, a bug with its traceback."""
        self.started += 1
        try:
            with short_user_errors():
                return job()
        except Terminated:
            raise
        except SystemExit as refused:
            if refused.code != 1:   # 130: interrupted outside training; anything else is not a job's failure
                raise
        except Exception:   # a bug in one job: its traceback, then the next job
            log.exception("sweep job %d (%s) failed", self.started, run_dir)
        self.failed.append(run_dir)
        log.error("sweep job %d (%s) failed; the sweep goes on", self.started, run_dir)
        return None

    def count_jobs_recorded_elsewhere(self, records: list[Path]) -> None:
        """Add the jobs whose `status.json` files are `records` (one per job directory) and that this
        process did not run itself: a job that failed on a cluster node counts as one run here."""
        here = {Path(run_dir).resolve() for run_dir in self.failed}
        self.started = max(self.started, len(records))
        for record in sorted(records):
            if json.loads(record.read_text()).get("status") == "failed" and record.parent.resolve() not in here:
                self.failed.append(str(record.parent))

    def exit_status(self) -> int:
        """The number of failed jobs (capped), after a line that names them; 0 when none failed."""
        if not self.failed:
            return 0
        names = ", ".join(self.failed)
        print(f"error: {len(self.failed)} of {self.started} sweep jobs failed ({names}); the report of the sweep "
              "lists why (python -m ssl_imwa.report <sweep dir>)", file=sys.stderr)
        return min(len(self.failed), HIGHEST_EXIT_STATUS)


SWEEP = SweepJobs()   # the jobs of the sweep (-m) that this process runs or waits for


def _status_records(sweep_dir: Path) -> dict[Path, int]:
    """Every `status.json` under the sweep directory, with its modification time (ns)."""
    return {path: path.stat().st_mtime_ns for path in sweep_dir.rglob("status.json")} if sweep_dir.is_dir() else {}


class CountJobsRunElsewhere(Callback):
    """Hydra calls this in the process that launched the sweep: at its start it notes the status
    files already there (an earlier sweep into the same directory), at its end it hands the ones that
    this sweep wrote or rewrote to `SWEEP`, so a job that failed on a Slurm node sets the exit status.
    File identities, not clocks: a node's clock may differ from the submitting machine's."""

    def __init__(self) -> None:
        self.before: dict[Path, int] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = _status_records(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        records = _status_records(Path(config.hydra.sweep.dir))
        SWEEP.count_jobs_recorded_elsewhere([path for path, mtime in records.items() if self.before.get(path) != mtime])


def swept_dirname(task_overrides: list[str], override_dirname: str, sweep_dir: str | None = None,
                  command_line: list[str] | None = None) -> str:
    """A sweep job's directory name: `key=value` for only the keys the sweep varies, in the command
    line's order (`train.lr=0.03,seed=1`), so directories (and TensorBoard's run names, which are
    their paths) say what differs. A job that a launcher started on another machine (a Slurm job) has
    no sweep on its command line: it reads the sweep's overrides from the `multirun.yaml` Hydra wrote
    into the sweep directory. A search (hydra/sweeper=optuna) sweeps the keys of its `params`. Where
    nothing shows a swept key, Hydra's `override_dirname` (every typed key)."""
    swept = _swept_keys(sys.argv[1:] if command_line is None else command_line)
    if not swept and command_line is None and sweep_dir and (Path(sweep_dir) / "multirun.yaml").is_file():
        from omegaconf import OmegaConf

        swept = _swept_keys(list(OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides.task))
    if command_line is None:
        swept += [key for key in _searched_keys() if key not in swept]
    values = {override.split("=", 1)[0].lstrip("+~"): override for override in map(str, task_overrides)}
    named = [values[key].lstrip("+~") for key in swept if key in values]
    return ",".join(named) if named else override_dirname


def _searched_keys() -> list[str]:
    """The keys a search sweeper's space names (`hydra.sweeper.params`); none for Hydra's basic sweeper."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(key) for key in (HydraConfig.get().sweeper.get("params") or {})]


def _swept_keys(arguments: list[str]) -> list[str]:
    """The keys that `arguments` (Hydra overrides) sweep over, in order; none when they do not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides([arg for arg in arguments
                                                            if "=" in arg and not arg.startswith("-")])
    except HydraException:
        return []
    return [override.get_key_element().lstrip("+~") for override in parsed if override.is_sweep_override()]
