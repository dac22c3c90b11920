"""Uninterrupted reference runs, trained once per test run and shared by every test that compares
a stopped, killed, resumed or distributed run with one, whichever pytest-xdist worker runs it. The
override lists are shared too: two tests that mean the same run ask for the same list."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from filelock import FileLock

from tests.utils import train_run

TINY = ["experiment=quickstart", "train.iterations=20", "train.eval_every=5", "train.batch_size=16", "train.mu=2",
        "train.log_every=5", "train.num_threads=1"]
IMWA = [*TINY, "imwa.k=2", "imwa.episodes=2"]
# IMWA across processes: a peer that does not reach a merge fails the run within a minute.
DISTRIBUTED = [*IMWA, "imwa.timeout_s=60"]
ReferenceRun = Callable[[Sequence[str]], Path]
# Every registered algorithm, with options under which its state moves within TINY's 20 steps (10 per
# episode with IMWA): DASO blends after 4 steps, ACR estimates from its second 4-step epoch, SAW
# re-weights every 4 steps. The parametrized tests (test_every_algorithm_*.py, test_kill_resume.py)
# run each; test_every_algorithm_imwa.py fails when a registered algorithm has no entry.
ALGORITHMS = {
    "supervised": ["algorithm=supervised"],
    "fixmatch": [],   # the quick start's own FixMatch
    "daso": ["algorithm=daso", "algorithm.warmup_steps=4", "algorithm.dist_update_period=3", "algorithm.queue_size=8"],
    "acr": ["algorithm=acr", "algorithm.epoch_length=4", "algorithm.estimate_start_epoch=1"],
    "debiaspl": ["algorithm=debiaspl", "algorithm.threshold=0.5"],
    "saw": ["algorithm=saw", "algorithm.epoch_length=4", "algorithm.threshold=0.5"],
    "saw_pass": ["algorithm=saw", "algorithm.epoch_length=4", "algorithm.threshold=0.5", "algorithm.estimate=pass"],
    "tras": ["algorithm=tras", "algorithm.warmup=4", "algorithm.threshold=0.5"],   # target head trains from step 4
    "darp": ["algorithm=darp", "algorithm.epoch_length=2", "algorithm.warmup_epochs=1", "algorithm.refine_every=3",
             "algorithm.threshold=0.5"],   # solver at steps 4, 7, 10, 13, 16, 19
    "adsh": ["algorithm=adsh", "algorithm.epoch_length=4", "algorithm.threshold=0.5"],   # passes after steps 3, 7, ...
    # Two generations of 20 steps: the IMWA tests stop and resume in the second as well.
    "crest": ["algorithm=crest", "algorithm.generations=2", "algorithm.threshold=0.5"],
    "crest_plus": ["algorithm=crest_plus", "algorithm.generations=2", "algorithm.threshold=0.5"],
    "abc": ["algorithm=abc", "algorithm.threshold=0.5", "algorithm.abc_threshold=0.5", "algorithm.schedule_epochs=5"],
    "simpro": ["algorithm=simpro", "algorithm.epoch_length=4", "algorithm.threshold=0.5"],   # M-steps after 3, 7, ...
    "cdmad": ["algorithm=cdmad", "algorithm.debias_start=4"],   # stateless; pseudo-labels debiased from step 4
    "cossl": ["algorithm=cossl", "algorithm.warmup=8", "algorithm.classifier_epochs=2", "algorithm.classifier_epoch_steps=5", "algorithm.classifier_batch_size=16", "algorithm.threshold=0.5"],   # classifier warm-up at the start of step 8
}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """`reference_run(overrides)`: the run directory of an uninterrupted run of `overrides`, trained
    the first time any process of this test run asks for it. Tests read it and never write into it.

    pytest-xdist's workers share the runs through the test run's base temporary directory (the
    parent of each worker's own), one training per run under a file lock: a worker that asks for a
    run another is training waits for it instead of training it again."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "reference_runs"
    shared.mkdir(exist_ok=True)

    def run(overrides: Sequence[str]) -> Path:
        folder = shared / hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:16]
        with FileLock(f"{folder}.lock"):
            if not (folder / "trained").is_file():
                shutil.rmtree(folder, ignore_errors=True)   # what a failed attempt left
                train_run(folder, list(overrides), "full")
                (folder / "trained").write_text(json.dumps(list(overrides)))
        return folder / "full"

    return run
