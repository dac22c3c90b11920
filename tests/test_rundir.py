"""One run per run directory: a fresh run refuses a used one, a second run refuses a locked one."""
from __future__ import annotations

import json
import os
import re
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


def _contend(lock_dir: str, tries: int, start, attempted, released, results) -> None:
    """One of two contenders: at each try, take the lock if it can, hold it until both have tried."""
    for _ in range(tries):
        start.wait()
        lock = RunDirectoryLock(Path(lock_dir))
        try:
            lock.acquire()
            results.put(1)
        except FileExistsError:
            results.put(0)
        attempted.wait()
        lock.release()
        released.wait()


def test_a_stale_lock_is_taken_by_exactly_one_of_two_processes(tmp_path: Path) -> None:
    """Two processes find the lock of a dead run at the same moment: one takes it over, the other is
    refused (reading, unlinking and recreating the file let both in, 45 times in 200)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    tries, dead = 200, _dead_pid()
    start, attempted, released = (context.Barrier(3) for _ in range(3))
    results = context.Queue()
    contenders = [context.Process(target=_contend, args=(str(tmp_path), tries, start, attempted, released, results))
                  for _ in range(2)]
    for process in contenders:
        process.start()
    winners = []
    try:
        for _ in range(tries):
            _write_lock(tmp_path, dead)
            start.wait(timeout=60)
            attempted.wait(timeout=60)
            winners.append(results.get(timeout=60) + results.get(timeout=60))
            released.wait(timeout=60)
    finally:
        for process in contenders:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert winners == [1] * tries, f"{sum(count != 1 for count in winners)} of {tries} tries had {set(winners)} winners"


def test_a_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    """The lock is the kernel's (flock), held for the run's life: a SIGKILL releases it at once."""
    code = ("import sys, time; from pathlib import Path; from ssl_imwa.rundir import RunDirectoryLock; "
            "RunDirectoryLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=rf"in use by process {holder.pid} on this host"):
            RunDirectoryLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirectoryLock(tmp_path)
    lock.acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _main(*arguments: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "main.py"), *arguments], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.slow
def test_a_resume_where_no_run_is_creates_nothing(tmp_path: Path) -> None:
    """resume=true on a directory that does not exist, or holds no run, is refused before Hydra
    creates the directory (and a main.log with a traceback in it)."""
    for run_dir, why in ((tmp_path / "never" / "made", "does not exist"), (tmp_path / "empty", "holds no run")):
        if why == "holds no run":
            run_dir.mkdir()
        result = _main("experiment=quickstart", "resume=true", f"hydra.run.dir={run_dir}")
        assert result.returncode == 1, result.stderr[-2000:]
        assert result.stderr.startswith(f"error: resume=true: {run_dir} {why}"), result.stderr[-2000:]
        assert "there is no run to resume" in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2 and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "never").exists() and list((tmp_path / "empty").iterdir()) == []


QUICK = ["experiment=quickstart", "train.iterations=4", "train.eval_every=2", "train.batch_size=16", "train.mu=2",
         "train.num_threads=1", "train.progress=false"]


def _files(run_dir: Path, leave_out: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*"))
            if path.is_file() and path.name not in leave_out}


@pytest.mark.slow
def test_a_refused_launch_changes_nothing_in_the_run_directory(tmp_path: Path) -> None:
    """A fresh launch into a used directory is refused before Hydra rewrites the run's .hydra/ record,
    so a resume that names another algorithm than the run's is still refused (it trained FixMatch
    as 'supervised'); the record the run writes itself is what Hydra would have written."""
    run_dir = tmp_path / "run"
    assert _main(*QUICK, f"hydra.run.dir={run_dir}").returncode == 0
    before = _files(run_dir, leave_out=("main.log",))
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"} <= set(before)
    refused = _main(*QUICK, "algorithm=supervised", f"hydra.run.dir={run_dir}")
    assert refused.returncode == 1 and "already holds a run" in refused.stderr, refused.stderr[-2000:]
    assert _files(run_dir, leave_out=("main.log",)) == before
    resumed = _main(*QUICK, "algorithm=supervised", "resume=true", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 1, resumed.stderr[-2000:]
    assert re.search(r"algorithm: run was launched with algorithm=fixmatch\w*, command line has supervised", resumed.stderr)
    assert _files(run_dir, leave_out=("main.log",)) == before

    by_hydra = tmp_path / "by_hydra"        # hydra.output_subdir typed: Hydra writes its record itself
    assert _main(*QUICK, f"hydra.run.dir={by_hydra}", "hydra.output_subdir=.hydra").returncode == 0
    for name in ("config.yaml", "overrides.yaml"):
        assert (by_hydra / ".hydra" / name).read_bytes() == (run_dir / ".hydra" / name).read_bytes(), name
    ours = (run_dir / ".hydra" / "hydra.yaml").read_text().replace(str(run_dir), "RUN")
    hydras = (by_hydra / ".hydra" / "hydra.yaml").read_text().replace(str(by_hydra), "RUN")
    assert ours == hydras.replace("    - hydra.output_subdir=.hydra\n", "")


def test_a_resume_refuses_an_empty_or_unreadable_config_yaml_by_name(tmp_path: Path) -> None:
    """An empty config.yaml fell back to the schema's defaults (CIFAR-10) and then blamed a missing file."""
    run_dir = train_run(tmp_path, [*TINY, "train.stop_at=5"])
    for damage in ("", "train: [unclosed\n"):
        (run_dir / "config.yaml").write_text(damage)
        with pytest.raises(ValueError, match=rf"{run_dir / 'config.yaml'} \(the run's saved config\) is "
                                             r"(empty|not valid YAML)"):
            train_run(tmp_path, [*TINY, "resume=true"])
        assert (run_dir / "config.yaml").read_text() == damage
