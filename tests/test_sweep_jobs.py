"""A sweep outlives one bad job: the job records `failed`, the others run, the exit status counts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_imwa.stopping import Terminated
from ssl_imwa.sweep_jobs import SweepJobs, swept_dirname
from tests.utils import ROOT


@pytest.mark.slow
def test_a_sweep_with_a_bad_value_runs_its_good_job_and_exits_with_the_number_that_failed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "-m", "experiment=quickstart", "train.iterations=5",
         "train.num_threads=1", "train.progress=false", "train.lr=-1,0.03,-2", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr[-3000:]
    jobs = {path.name.rsplit("=", 1)[1]: path for path in sweep.iterdir() if path.is_dir()}
    assert sorted(path.name for path in jobs.values()) == ["train.lr=-1", "train.lr=-2", "train.lr=0.03"], \
        "a job's directory names only the keys the sweep varies"
    statuses = {lr: json.loads((path / "status.json").read_text()) for lr, path in jobs.items()}
    assert statuses["0.03"]["status"] == "complete" and (jobs["0.03"] / "results.json").is_file()
    for bad in ("-1", "-2"):
        assert statuses[bad]["status"] == "failed" and "train.lr" in statuses[bad]["error"]
        assert f"error: train.lr={bad}.0: expected" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 3 sweep jobs failed (") and str(jobs["-1"]) in last and str(jobs["-2"]) in last


def test_a_bug_in_one_job_is_logged_with_its_traceback_and_the_sweep_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    jobs = SweepJobs()

    def broken() -> None:
        empty: list[int] = []
        empty.pop()   # a bug (not a `raise` of this project's): its traceback matters

    assert jobs.run(broken, "runs/0") is None
    assert jobs.run(lambda: 0.5, "runs/1") == 0.5
    assert "IndexError: pop from empty list" in caplog.text and "Traceback" in caplog.text
    assert jobs.failed == ["runs/0"] and jobs.exit_status() == 1


def test_a_stop_that_was_asked_for_stops_the_whole_sweep() -> None:
    jobs = SweepJobs()

    def stopped() -> None:
        raise Terminated("stopped by SIGINT after step 3 of replica 0", "SIGINT")

    with pytest.raises(Terminated) as caught:
        jobs.run(stopped, "runs/0")
    assert caught.value.code == 130 and jobs.failed == []


def test_a_sweep_job_directory_names_the_swept_keys_in_command_line_order() -> None:
    task = ["experiment=quickstart", "seed=1", "train.lr=0.03", "+dataset.noise=0.1"]
    everything = "experiment=quickstart,seed=1,train.lr=0.03"
    command = ["-m", "experiment=quickstart", "train.lr=0.01,0.03", "seed=range(2)", "+dataset.noise=0.1"]
    assert swept_dirname(task, everything, command_line=command) == "train.lr=0.03,seed=1"
    assert swept_dirname(task, everything, command_line=["experiment=quickstart"]) == everything, "no swept key: every key"
    assert swept_dirname(task, everything, command_line=["train.lr=[1"]) == everything, "an unreadable line: every key"
