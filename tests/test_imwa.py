"""The IMWA orchestrator: K=1 is the plain run, exact resume mid-episode, W=1 equals W=2, fail fast."""
import time
from pathlib import Path

import pytest
import torch

from tests.reference_runs import IMWA, TINY, ReferenceRun
from tests.test_checkpoint import flip_a_tensor_byte
from tests.utils import (
    assert_bitwise_equal,
    assert_same_run,
    checkpoint_tensors,
    free_port,
    launch_process,
    read_metrics,
    read_results,
    train_run,
)


def _replica_part(tensors: dict[str, torch.Tensor], replica: int, part: str) -> dict[str, torch.Tensor]:
    prefix = f"{replica}.{part}."
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


@pytest.mark.slow
def test_k1_with_episodes_is_bitwise_the_plain_run(tmp_path: Path) -> None:
    """Also: imwa.keep_merges=2 leaves the two newest merge checkpoints, latest.pt one of them."""
    plain = checkpoint_tensors(train_run(tmp_path, TINY, "plain"))
    episodic_dir = train_run(tmp_path, [*TINY, "imwa.episodes=4", "imwa.keep_merges=2"], "episodic")
    assert_bitwise_equal(plain, checkpoint_tensors(episodic_dir))
    checkpoints = episodic_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.glob("merge_*.pt")) == ["merge_003.pt", "merge_004.pt"]
    assert (checkpoints / "latest.pt").samefile(checkpoints / "merge_004.pt")


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_merge(tmp_path: Path,
                                                                   reference_run: ReferenceRun) -> None:
    """Bit rot leaves latest.pt readable but wrong, caught by its digest (a truncated file takes the
    same path, CorruptCheckpoint): the resume says so and continues from merge_001.pt, retraining
    the steps after it, to the uninterrupted run's result."""
    full = reference_run(IMWA)
    stopped = train_run(tmp_path, [*IMWA, "train.stop_at=13", "train.checkpoint_every=1"], "stopped")
    latest = stopped / "checkpoints" / "latest.pt"
    weight = next(value for key, value in checkpoint_tensors(stopped).items()
                  if key.startswith("0.model.") and value.numel() >= 64)
    flip_a_tensor_byte(latest, weight)  # bit rot: still a readable torch file
    train_run(tmp_path, [*IMWA, "resume=true"], "stopped")
    assert_same_run(full, stopped)


@pytest.mark.slow
def test_replicas_differ_within_episodes_and_agree_after_merges(reference_run: ReferenceRun) -> None:
    run_dir = reference_run(IMWA)
    tensors = checkpoint_tensors(run_dir)
    for part in ("model", "teacher"):
        assert_bitwise_equal(_replica_part(tensors, 0, part), _replica_part(tensors, 1, part))
    results = read_results(run_dir)
    assert [entry["episode"] for entry in results["imwa"]["per_episode"]] == [1, 2]
    assert results["imwa"]["k"] == 2 and results["imwa"]["per_episode"][0]["strategy"] == "uniform"
    first_episode = {r["replica"]: r["per_class"] for r in read_metrics(run_dir)
                     if r["source"] == "replica" and r["step"] == 10}
    assert first_episode[0] != first_episode[1], "replicas must see different data"
    assert [r["step"] for r in read_metrics(run_dir) if r["source"] == "merged"] == [10, 20]
    assert all(entry["final"] is not None for entry in results["replicas"])


TWA = ["imwa.merge=twa", "dataset.val_per_class=10", "dataset.m_max=60", "imwa.twa.steps=10",
       "imwa.twa.batch_size=32"]
# Every merge, and every option that keeps state across an episode (TWA's start-point candidate).
MERGES = {"uniform": [], "twa_with_start": [*TWA, "imwa.twa.include_start=true", "imwa.twa.accept=false"]}


@pytest.mark.slow
@pytest.mark.parametrize("merge", list(MERGES))
def test_kill_and_resume_mid_episode_is_bitwise_identical(tmp_path: Path, merge: str,
                                                          reference_run: ReferenceRun) -> None:
    overrides = [*IMWA, *MERGES[merge]]
    full = reference_run(overrides)
    # Step 13 of replica 0 is inside episode 2, while replica 1 is still at the episode start.
    stopped = train_run(tmp_path, [*overrides, "train.stop_at=13", "train.checkpoint_every=1"], "stopped")
    train_run(tmp_path, [*overrides, "resume=true"], "stopped")
    assert_same_run(full, stopped)


@pytest.mark.slow
def test_two_processes_give_the_same_merged_weights_as_one(tmp_path: Path, reference_run: ReferenceRun) -> None:
    single_dir = reference_run(IMWA)
    single = checkpoint_tensors(single_dir)
    run_dir = tmp_path / "two"
    port = free_port()
    processes = [launch_process(rank, 2, port, IMWA, run_dir) for rank in range(2)]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    for rank in range(2):
        spread = checkpoint_tensors(run_dir, f"latest.rank{rank}.pt")
        for part in ("model", "teacher"):
            assert_bitwise_equal(_replica_part(spread, 0, part), _replica_part(single, 0, part))
    assert read_results(run_dir)["imwa"]["processes"] == 2
    merged_two = [r for r in read_metrics(run_dir) if r["source"] == "merged"]
    merged_one = [r for r in read_metrics(single_dir) if r["source"] == "merged"]
    assert [r["per_class"] for r in merged_two] == [r["per_class"] for r in merged_one]


DYING_PLUGIN = '''
import os
from ssl_imwa.algorithms.fixmatch import FixMatch
from ssl_imwa.algorithm import register_algorithm

@register_algorithm("dies_on_rank1")
class DiesOnRank1(FixMatch):
    def losses(self, batch, model, teacher, step):
        if os.environ.get("RANK") == "1" and step == 3:
            os._exit(3)
        return super().losses(batch, model, teacher, step)
'''


@pytest.mark.slow
def test_a_dead_replica_process_fails_the_others_fast(tmp_path: Path) -> None:
    (tmp_path / "dying_plugin.py").write_text(DYING_PLUGIN)
    overrides = [*IMWA, "plugins=[dying_plugin]", "algorithm.name=dies_on_rank1", "imwa.timeout_s=30"]
    port = free_port()
    processes = [launch_process(rank, 2, port, overrides, tmp_path / "run", extra_path=tmp_path) for rank in range(2)]
    started = time.monotonic()
    output, _ = processes[0].communicate(timeout=120)
    processes[1].communicate(timeout=60)
    assert processes[1].returncode == 3
    assert processes[0].returncode != 0
    assert "another replica process died" in output, output[-2000:]
    assert time.monotonic() - started < 90


@pytest.mark.slow
def test_twa_merge_runs_in_the_orchestrator_and_reports_itself(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, [*IMWA, *TWA])
    episodes = read_results(run_dir)["imwa"]["per_episode"]
    assert [entry["strategy"] for entry in episodes] == ["twa", "twa"]
    for entry in episodes:
        assert len(entry["coefficients"]) == 2 and abs(sum(entry["coefficients"]) - 1) < 1e-5
        assert entry["labels_consumed"] == 100  # the whole 10-per-class validation split
        assert isinstance(entry["accepted"], bool)
    tensors = checkpoint_tensors(run_dir)
    assert_bitwise_equal(_replica_part(tensors, 0, "model"), _replica_part(tensors, 1, "model"))


def test_twa_without_a_held_out_split_is_a_clear_error() -> None:

    from ssl_imwa.config import validate
    from tests.utils import compose_config

    with pytest.raises(ValueError, match="dataset.val_per_class > 0"):
        validate(compose_config([*IMWA, "imwa.merge=twa"]))
