"""A disk that fills up during a run, as the kernel fills it (a small tmpfs): the run ends in one
named error, records `failed`, keeps its last checkpoint and leaves no temporary file behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fault_scenarios import fill_the_disk
from ssl_imwa.checkpoint import read_checkpoint
from tests.utils import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("small_filesystem", [8 * 1024], indirect=True)
def test_a_disk_that_fills_during_a_run_ends_it_in_one_named_line(small_filesystem: Path | None) -> None:
    if small_filesystem is None:
        pytest.skip("no tmpfs can be mounted here (needs root and mount permission)")
    run_dir = small_filesystem / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "experiment=quickstart", "train.iterations=2000", "train.eval_every=20",
         "train.num_threads=1", "train.progress=false", f"hydra.run.dir={run_dir}"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    fill_the_disk(small_filesystem)   # every block that is left
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    message = stderr[stderr.index("error: "):].strip().splitlines()
    assert len(message) <= 2 and f"cannot write {run_dir}/" in message[0] and "ENOSPC" in message[0], message
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "ENOSPC" in status["error"]
    assert not [path for path in run_dir.rglob("*") if path.name.endswith(".tmp")]
    payload = read_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert payload["progress"]["replica_steps"][0] >= 20, "the last good checkpoint is kept"
