"""Every registered algorithm with one replica trained by two processes (imwa.data_parallel=2, gloo):
a run stopped at step 13 (with generations, step 33: in the second) and resumed ends bitwise where the
uninterrupted two-process run ends: weights, optimiser and the algorithm's state (reduced over the group
each step).

All algorithms' runs are one two-process job (tests/data_parallel_worker.py), trained once for the module:
starting two processes costs more than an algorithm's three short runs. The job stops at the first run
that fails; that algorithm's test reports the job's output, and the algorithms after it report that they
were not reached."""
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


def _overrides(algorithm: str) -> list[str]:
    return [*TINY, *ALGORITHMS[algorithm], "imwa.data_parallel=2", "model.sync_batchnorm=true", "imwa.timeout_s=120"]


def _stop_at(algorithm: str) -> int:
    return 33 if generation_count(validate(compose_config(_overrides(algorithm)))) > 1 else 13


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(root, the job's output if it failed, else ""): root/<algorithm>/{full,split}."""
    root = tmp_path_factory.mktemp("every_algorithm_d2")
    jobs = []
    for algorithm in sorted(ALGORITHMS):
        base, full, split = _overrides(algorithm), root / algorithm / "full", root / algorithm / "split"
        jobs += [[*base, f"run_dir={full}"],
                 [*base, f"train.stop_at={_stop_at(algorithm)}", "train.checkpoint_every=1", f"run_dir={split}"],
                 [*base, "resume=true", f"run_dir={split}"]]
    try:
        launch_jobs(2, jobs, timeout=1800)
    except AssertionError as failure:
        return root, str(failure)
    return root, ""


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_two_processes_stop_and_resume_bitwise(algorithm: str, two_process_runs: tuple[Path, str]) -> None:
    root, failure = two_process_runs
    full, split = root / algorithm / "full", root / algorithm / "split"
    if failure and not (split / "results.json").is_file():
        pytest.fail(f"{algorithm}'s runs did not finish (the job stops at its first failing run):\n{failure}")
    assert read_results(full)["imwa"]["data_parallel"] == 2
    assert_same_run(full, split)
    states = [read_checkpoint(run_dir / "checkpoints" / "latest.pt")["replicas"][0]["algorithm"]
              for run_dir in (full, split)]
    assert_same_state(*states, f"{algorithm} resumed")
