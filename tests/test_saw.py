"""SAW: effective-number class weights, the weighted losses and the per-epoch re-estimate against a hand
computation; counts summed over a data-parallel group; merge; no host syncs; learning and exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssl_imwa.algorithms.saw import SAW, SAWConfig, effective_number_weights
from tests.test_fixmatch import FixedLogits, audit_steps, meta_setup
from tests.utils import (
    algorithm_context,
    checkpoint_algorithm_state,
    read_results,
    resumed_bitwise,
    train_run,
)

LABELED = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
WEAK = [[5.0, 0.0], [0.2, 0.0], [0.0, 4.0]]    # confidences 0.9933, 0.5498, 0.9820: targets 0, 0, 1
STRONG = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5]]


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def hand_weights(counts: list[float]) -> list[float]:
    mean = sum(counts) / len(counts)
    beta = (mean - 1) / mean
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    return [w / sum(raw) * len(counts) for w in raw]


def test_effective_number_weights_match_hand_computation() -> None:
    # counts (3, 1): N = 2, beta = 1/2, raw (0.5 / 0.875, 0.5 / 0.5) = (4/7, 1), normalised (8/11, 14/11).
    torch.testing.assert_close(effective_number_weights(torch.tensor([3.0, 1.0])), torch.tensor([8 / 11, 14 / 11]))
    counts = [500.0, 299.0, 179.0, 107.0, 64.0, 38.0, 23.0, 13.0, 8.0, 5.0]
    torch.testing.assert_close(effective_number_weights(torch.tensor(counts)), torch.tensor(hand_weights(counts)))
    uniform = effective_number_weights(torch.full((10,), 300.0))
    torch.testing.assert_close(uniform, torch.ones(10))


def batch() -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(3, 1, 2, 2), "y": torch.tensor([0, 1, 1]), "u_weak": torch.zeros(3, 1, 2, 2),
            "u_strong": [torch.zeros(3, 1, 2, 2)], "u_target": torch.tensor([0, 1, -1])}


def test_losses_match_hand_computation() -> None:
    algorithm = SAW(SAWConfig(lambda_u=2.0), algorithm_context([3, 1], 100))
    algorithm.unlabeled_weights = torch.tensor([2.0, 0.5])
    out = algorithm.losses(batch(), FixedLogits(torch.tensor(LABELED + WEAK + STRONG)), None, step=0)
    w_l = [8 / 11, 14 / 11]   # labeled counts (3, 1)
    loss_x = (w_l[0] * ce(LABELED[0], 0) + w_l[1] * ce(LABELED[1], 1) + w_l[1] * ce(LABELED[2], 1)) / 3
    loss_u = (2.0 * ce(STRONG[0], 0) + 0.0 + 0.5 * ce(STRONG[2], 1)) / 3   # the second sample is masked out
    assert math.isclose(out["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u, rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), 2 / 3, rel_tol=1e-6)
    # Every unlabeled sample's argmax counts, confident or not: targets (0, 0, 1).
    assert algorithm.pseudo_counts.tolist() == [2.0, 1.0]


def test_weights_are_re_estimated_after_the_last_step_of_each_epoch() -> None:
    context = algorithm_context([3, 1], 100)   # 28 unlabeled images
    algorithm = SAW(SAWConfig(epoch_length=2), context)
    model = FixedLogits(torch.tensor(LABELED + WEAK + STRONG))
    initial = algorithm.unlabeled_weights.clone()
    torch.testing.assert_close(initial, torch.ones(2))
    algorithm.losses(batch(), model, None, step=0)
    assert torch.equal(algorithm.unlabeled_weights, initial) and algorithm.pseudo_counts.tolist() == [2.0, 1.0]
    algorithm.losses(batch(), model, None, step=1)
    # Counts (4, 2) over 6 predictions, rescaled to 28 images: (56/3, 28/3).
    expected = hand_weights([4 * 28 / 6, 2 * 28 / 6])
    torch.testing.assert_close(algorithm.unlabeled_weights, torch.tensor(expected))
    assert algorithm.pseudo_counts.tolist() == [0.0, 0.0]


def test_estimate_pass_re_weights_from_the_teachers_argmax_over_the_unlabeled_set() -> None:
    """USB's estimate (algorithm.estimate=pass): the engine's pass hands over the teacher's logits of every
    unlabeled image; argmax counts clamped at 1, in float32. The steps themselves count nothing."""
    algorithm = SAW(SAWConfig(epoch_length=2, estimate="pass"), algorithm_context([3, 1, 1], 100))
    assert algorithm.unlabeled_pass_every() == 2
    assert SAW(SAWConfig(epoch_length=2), algorithm_context([3, 1, 1], 100)).unlabeled_pass_every() == 0
    model = FixedLogits(torch.tensor([[2.0, 0.0, 0.0]] * 2 + [[0.0, 1.0, 0.0]] * 4 + [[0.0, 1.0, 0.0]] * 2))
    initial = algorithm.unlabeled_weights.clone()
    for step in (0, 1):
        algorithm.losses({"x": torch.zeros(2), "y": torch.tensor([0, 1]), "u_weak": torch.zeros(3),
                          "u_strong": [torch.zeros(3)], "u_target": torch.full((3,), -1)}, model, None, step)
    assert torch.equal(algorithm.unlabeled_weights, initial) and algorithm.pseudo_counts.tolist() == [0.0] * 3
    logits = torch.tensor([[3.0, 0.0, 0.0], [2.0, 1.0, 0.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    algorithm.after_unlabeled_pass({"logits": logits}, step=1)
    # counts (3, 1, 0) -> clamped (3, 1, 1)
    torch.testing.assert_close(algorithm.unlabeled_weights, torch.tensor(hand_weights([3, 1, 1])), rtol=1e-6, atol=0)
    assert algorithm.unlabeled_weights.dtype == torch.float32


def test_rare_classes_are_clamped_to_one_image() -> None:
    algorithm = SAW(SAWConfig(), algorithm_context([3, 1], 100))
    algorithm.pseudo_counts = torch.tensor([6.0, 0.0], dtype=torch.float64)
    algorithm.refresh_weights()
    torch.testing.assert_close(algorithm.unlabeled_weights, torch.tensor(hand_weights([28.0, 1.0])))


class OtherSlice:
    """A data-parallel group of two in one process: the other slice's counts are given."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.other

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("SAW sums its counts")


def test_counts_are_summed_over_the_data_parallel_group() -> None:
    algorithm = SAW(SAWConfig(), algorithm_context([3, 1], 100))
    algorithm.batch_group = OtherSlice(torch.tensor([1.0, 2.0], dtype=torch.float64))
    algorithm.losses(batch(), FixedLogits(torch.tensor(LABELED + WEAK + STRONG)), None, step=0)
    assert algorithm.pseudo_counts.tolist() == [3.0, 3.0]


def test_merge_averages_weights_and_counts() -> None:
    algorithm = SAW(SAWConfig(), algorithm_context([3, 1], 100))
    states = [{"unlabeled_weights": torch.tensor([1.5, 0.5]), "pseudo_counts": torch.tensor([4.0, 2.0], dtype=torch.float64)},
              {"unlabeled_weights": torch.tensor([0.5, 1.5]), "pseudo_counts": torch.tensor([0.0, 6.0], dtype=torch.float64)}]
    merged = algorithm.merge_states(states)
    torch.testing.assert_close(merged["unlabeled_weights"], torch.tensor([1.0, 1.0]))
    assert merged["pseudo_counts"].tolist() == [2.0, 4.0]
    algorithm.load_state_dict(merged)   # the labeled weights are derived, not part of the state
    assert set(algorithm.state_dict()) == {"unlabeled_weights", "pseudo_counts"}


def test_steps_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(SAW, SAWConfig(epoch_length=2))
    steps = [0, 1, 2, 3]   # refreshes after steps 1 and 3
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}
    assert algorithm.unlabeled_weights.device == torch.device("meta")


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=saw", "train.num_threads=1"])
    assert read_results(run_dir)["final"]["top1"] > 0.3   # 10 classes: chance is 0.1


RUN = ["algorithm=saw", "experiment=quickstart", "train.iterations=30", "train.batch_size=8", "train.mu=2",
       "train.eval_every=10", "train.log_every=5", "algorithm.threshold=0.5", "algorithm.epoch_length=6",
       "imwa.k=2", "imwa.episodes=2"]


@pytest.mark.slow
def test_resume_with_imwa_merges_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Stops at 20, mid-epoch (refreshes after steps 5, 11, 17, 23, 29; the merge after step 14).
    resumed = resumed_bitwise(tmp_path, RUN, stop_at=20, replicas=2)
    for replica in (0, 1):
        state = checkpoint_algorithm_state(resumed, replica)
        assert not torch.allclose(state["unlabeled_weights"], torch.ones(10))   # the weights were re-estimated
