"""Every registered algorithm with one replica trained by two processes (imwa.data_parallel=2, gloo):
a run stopped at step 13 (with generations, step 33: in the second) and resumed ends bitwise where the
uninterrupted two-process run ends: weights, optimiser and the algorithm's state (reduced over the group
each step)."""
from pathlib import Path

import pytest

from ssl_imwa.checkpoint import read_checkpoint
from ssl_imwa.config import generation_count, validate
from tests.reference_runs import ALGORITHMS, TINY
from tests.utils import (
    assert_same_run,
    assert_same_state,
    compose_config,
    launch_jobs,
    read_results,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_two_processes_stop_and_resume_bitwise(algorithm: str, tmp_path: Path) -> None:
    base = [*TINY, *ALGORITHMS[algorithm], "imwa.data_parallel=2", "model.sync_batchnorm=true", "imwa.timeout_s=120"]
    full, split = tmp_path / "full", tmp_path / "split"
    stop_at = 33 if generation_count(validate(compose_config(base))) > 1 else 13
    launch_jobs(2, [[*base, f"run_dir={full}"],
                    [*base, f"train.stop_at={stop_at}", "train.checkpoint_every=1", f"run_dir={split}"],
                    [*base, "resume=true", f"run_dir={split}"]])
    assert read_results(full)["imwa"]["data_parallel"] == 2
    assert_same_run(full, split)
    states = [read_checkpoint(run_dir / "checkpoints" / "latest.pt")["replicas"][0]["algorithm"]
              for run_dir in (full, split)]
    assert_same_state(*states, f"{algorithm} resumed")
