"""One run per run directory: a fresh run refuses a used one, a second run refuses a locked one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_imwa.rundir import LOCK_NAME, RunDirectoryLock
from tests.utils import read_metrics, train_run

TINY = ["experiment=quickstart", "train.iterations=10", "train.eval_every=5", "train.batch_size=16", "train.mu=2",
        "train.num_threads=1"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                 "started": "2026-11-28 00:00:00"}))


def test_a_fresh_run_into_a_used_directory_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, TINY)
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints .*resume=true.*hydra.run.dir"):
        train_run(tmp_path, TINY)
    assert (run_dir / "metrics.jsonl").read_text() == before and read_metrics(run_dir)
    assert not (run_dir / LOCK_NAME).exists(), "a finished or refused run leaves no lock"


def test_a_directory_locked_by_a_live_process_is_refused(tmp_path: Path) -> None:
    _write_lock(tmp_path / "run", os.getppid())   # the process that runs pytest: alive
    with pytest.raises(FileExistsError, match=rf"in use by process {os.getppid()} on this host"):
        train_run(tmp_path, TINY)
    _write_lock(tmp_path / "other", 12345, host="some-other-node")
    with pytest.raises(FileExistsError, match="on host some-other-node.*delete"):
        train_run(tmp_path, TINY, "other")


def test_the_lock_of_a_killed_run_is_taken_over_by_its_resume(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, [*TINY, "train.stop_at=5"])
    _write_lock(run_dir, _dead_pid())             # as SIGKILL would leave it
    train_run(tmp_path, [*TINY, "resume=true"])
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    assert not (run_dir / LOCK_NAME).exists()


def test_the_lock_is_exclusive(tmp_path: Path) -> None:
    first, second = RunDirectoryLock(tmp_path), RunDirectoryLock(tmp_path)
    first.acquire()
    with pytest.raises(FileExistsError, match=f"in use by process {os.getpid()}"):
        second.acquire()
    first.release()
    second.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    second.release()
