"""Runs as Slurm jobs launched by Hydra's submitit launcher (configs/hydra/launcher/, docs/cluster.md).

Two things a job needs that a run started by hand does not: the tasks of a multi-task job learn their
ranks from Slurm, as torchrun's processes learn them from torchrun; and a job that Slurm requeued
(preempted, or signalled before its time limit) continues its own run instead of refusing a run
directory that holds a run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("ssl_imwa")


def slurm_restarts() -> int:
    """How often Slurm has requeued this job (0 outside Slurm, and on a job's first start)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def continues_a_requeued_job(run_dir: Path, resume: bool) -> bool:
    """True when this is a job Slurm requeued and its run directory holds the run it started: the run
    resumes (a job requeued before it wrote anything starts afresh, which loses nothing)."""
    from ssl_imwa.rundir import used_by_a_run

    if resume or not slurm_restarts() or used_by_a_run(run_dir) is None:
        return False
    log.info("Slurm requeued this job (restart %d, job %s): resuming its run in %s", slurm_restarts(),
             os.environ.get("SLURM_JOB_ID", "?"), run_dir)
    return True


def export_ranks_of_a_slurm_job() -> None:
    """In a submitit job of several tasks (hydra.launcher.tasks_per_node=N), the environment torchrun
    gives its processes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), taken from Slurm's
    by submitit; a job of one task, or one started by torchrun, is left as it is."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS") or 1) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()
