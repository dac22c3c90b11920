"""Every registered algorithm under IMWA (K=2, E=2): a run stopped mid-episode resumes to bitwise the
uninterrupted run, weights, optimisers and algorithm state, and after the last merge both replicas hold
the same weights and the same algorithm state. The algorithms come from the registry: an algorithm added to
ssl_imwa/algorithms without an entry in tests/reference_runs.ALGORITHMS fails here."""
from pathlib import Path

import pytest

from ssl_imwa.algorithm import BUILTIN_PACKAGE, get_algorithm, list_algorithms
from ssl_imwa.checkpoint import read_checkpoint
from ssl_imwa.config import generation_count, validate
from tests.reference_runs import ALGORITHMS, IMWA, ReferenceRun
from tests.utils import (
    assert_same_run,
    assert_same_state,
    compose_config,
    read_results,
    train_run,
)


def test_every_built_in_algorithm_has_test_options() -> None:
    """Built-in: the registry also holds the plugins other tests of this process registered."""
    built_in = {name for name in list_algorithms() if get_algorithm(name).__module__.startswith(BUILTIN_PACKAGE)}
    missing = sorted(built_in - set(ALGORITHMS))
    assert not missing, f"add {missing} to tests/reference_runs.ALGORITHMS (options that move its state early)"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_run_stopped_mid_episode_resumes_bitwise_and_merges(algorithm: str, tmp_path: Path,
                                                              reference_run: ReferenceRun) -> None:
    overrides = [*IMWA, *ALGORITHMS[algorithm]]
    full = reference_run(overrides)
    generations = generation_count(validate(compose_config(overrides)))
    # Step 13 of replica 0 is inside episode 2, while replica 1 is still at the episode's start; with a
    # second generation, step 33 is the same place in it (the run then resumes across the boundary's records).
    for stop_at in (33,) if generations > 1 else (13,):
        stopped = train_run(tmp_path, [*overrides, f"train.stop_at={stop_at}", "train.checkpoint_every=1"],
                            f"stopped_{stop_at}")
        train_run(tmp_path, [*overrides, "resume=true"], f"stopped_{stop_at}")
        assert_same_run(full, stopped, f"stopped at {stop_at}")
        replicas = [read_checkpoint(run_dir / "checkpoints" / "latest.pt")["replicas"] for run_dir in (full, stopped)]
        for index in (0, 1):
            assert_same_state(replicas[0][index]["algorithm"], replicas[1][index]["algorithm"],
                              f"replica {index} resumed")
    for part in ("model", "teacher", "algorithm"):   # the last merge gave both replicas the same
        assert_same_state(replicas[0][0][part], replicas[0][1][part], f"{algorithm} {part} after the merge")
    assert [entry["episode"] for entry in read_results(full)["imwa"]["per_episode"]] == \
        list(range(1, 2 * generations + 1))
