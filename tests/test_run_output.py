"""What a person watching a run sees: in a log file, one line per evaluation and no progress bar."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import ROOT


@pytest.mark.slow
def test_a_run_logged_to_a_file_says_what_happened_in_few_lines(tmp_path: Path) -> None:
    """stdout and stderr to a file (SLURM, nohup): no carriage-return bar updates, a start line naming
    what runs where, one line per evaluation with ETA, and the warning that the teacher lags."""
    log_file = tmp_path / "job.log"
    with log_file.open("w") as stream:
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "experiment=quickstart", "train.iterations=80",
             "train.eval_every=40", "train.num_threads=1", "algorithm.ema.warmup=false", "algorithm.ema.decay=0.9999",
             f"hydra.run.dir={tmp_path / 'run'}"],
            stdout=stream, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
            check=False)
    text = log_file.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text and len(text.encode()) < 5000
    assert "starting fixmatch on digits (small_cnn) | preset experiment=quickstart" in text and "device cpu" in text
    evaluations = [line for line in text.splitlines() if "replica 0 step " in line]
    assert [line.split("step ")[1].split(":")[0] for line in evaluations] == ["40/80", "80/80"]
    assert all("images/s | ETA " in line for line in evaluations)
    # decay 0.9999 without warm-up: the evaluated teacher is still the initial network at step 40 (its student is at about 0.25)
    assert text.count("the evaluated EMA teacher scores") == 1 and "algorithm.ema.warmup=true" in text
