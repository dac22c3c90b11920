"""ABC: the Bernoulli masks, the FixMatch and ABC losses against a hand computation, the unlabeled schedule,
the draws (deterministic per (seed, step), balanced in expectation, USB's global-generator mode, the same
for data-parallel slices), the evaluated head, merge, no host syncs, and learning."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_imwa.algorithms.abc import ABC, ABC_HEAD, ABCConfig, step_seed
from ssl_imwa.evaluator import Evaluator
from ssl_imwa.models import create_model
from tests.test_fixmatch import audit_steps, meta_setup
from tests.utils import algorithm_context, read_results, train_run

LABELED = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
WEAK = [[5.0, 0.0], [0.2, 0.0], [0.0, 4.0]]           # standard head: confidences 0.9933, 0.5498, 0.9820
STRONG = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5]]
LABELED_ABC = [[0.5, 0.0], [0.0, 2.0], [1.0, 0.0]]
WEAK_ABC = [[4.0, 0.0], [3.0, 0.0], [0.0, 0.1]]       # ABC head: 0.9820, 0.9526, 0.5250 -> targets 0, 0, 1
STRONG_ABC = [[0.0, 1.0], [2.0, 0.0], [1.0, 3.0]]
COUNTS = [4, 1]                                       # keep probabilities N_min / N_c = 0.25, 1


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


class FixedHeads(nn.Module):
    """A 'model' that returns preset logits of both heads for the concatenated batch (x, u_w, u_s)."""

    def __init__(self, logits: list[list[float]], abc_logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))
        self.abc_logits = nn.Parameter(torch.tensor(abc_logits))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.shape[0] == self.logits.shape[0], "ABC forwards x, u_w and u_s in one batch"
        return {"features": torch.zeros(x.shape[0], 1), "logits": self.logits * 1.0, ABC_HEAD: self.abc_logits * 1.0}


def batch() -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(3, 1, 2, 2), "y": torch.tensor([0, 1, 0]), "u_weak": torch.zeros(3, 1, 2, 2),
            "u_strong": [torch.zeros(3, 1, 2, 2)], "u_target": torch.tensor([0, 1, -1])}


def model() -> FixedHeads:
    return FixedHeads(LABELED + WEAK + STRONG, LABELED_ABC + WEAK_ABC + STRONG_ABC)


def test_losses_match_hand_computation() -> None:
    # 10 steps in 5 schedule epochs of 2 steps: step 4 is in epoch 2, progress 0.4, so an unlabeled image
    # pseudo-labeled c is kept with probability 1 - 0.4 (1 - keep_c): (0.7, 1.0).
    config = ABCConfig(threshold=0.95, lambda_u=2.0, abc_threshold=0.9, abc_weight=0.5, schedule_epochs=5)
    algorithm = ABC(config, algorithm_context(COUNTS, 10))
    uniforms = (torch.tensor([0.2, 0.9, 0.3], dtype=torch.float64), torch.tensor([0.65, 0.75, 0.1], dtype=torch.float64))
    algorithm.uniforms = lambda step, labeled, unlabeled: uniforms   # type: ignore[method-assign]
    out = algorithm.losses(batch(), model(), None, step=4)

    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 1) + ce(LABELED[2], 0)) / 3
    loss_u = (ce(STRONG[0], 0) + ce(STRONG[2], 1)) / 3              # the second weak view is not confident
    # Labeled ABC masks: u < keep_y: 0.2 < 0.25, 0.9 < 1, 0.3 >= 0.25 -> (1, 1, 0).
    abc_x = (ce(LABELED_ABC[0], 0) + ce(LABELED_ABC[1], 1)) / 3
    # Unlabeled: the draws keep (0.65 < 0.7, 0.75 >= 0.7, 0.1 < 1) -> (1, 0, 1); confident (1, 1, 0) -> (1, 0, 0).
    abc_u = ce(STRONG_ABC[0], 0) / 3
    assert math.isclose(out["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(out["loss_abc"].item(), abc_x + abc_u, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u + 0.5 * (abc_x + abc_u), rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(out["abc_labeled_rate"].item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(out["abc_mask_rate"].item(), 1 / 3, rel_tol=1e-6)


def test_both_heads_get_gradients_and_the_masked_rows_none() -> None:
    algorithm = ABC(ABCConfig(abc_threshold=0.9, schedule_epochs=5), algorithm_context(COUNTS, 10))
    uniforms = (torch.tensor([0.2, 0.9, 0.3], dtype=torch.float64), torch.tensor([0.65, 0.75, 0.1], dtype=torch.float64))
    algorithm.uniforms = lambda step, labeled, unlabeled: uniforms   # type: ignore[method-assign]
    fixed = model()
    algorithm.losses(batch(), fixed, None, step=4)["loss"].backward()
    rows_with_gradient = fixed.abc_logits.grad.abs().sum(dim=1).ne(0).tolist()
    # ABC rows: labeled (1, 1, 0), weak views never (pseudo-labels are targets), strong (1, 0, 0).
    assert rows_with_gradient == [True, True, False, False, False, False, True, False, False]


def test_unlabeled_keep_probability_follows_the_schedule() -> None:
    algorithm = ABC(ABCConfig(schedule_epochs=5), algorithm_context(COUNTS, 10))   # epochs of 2 steps
    assert [algorithm.progress(step) for step in (0, 1, 2, 5, 9, 10, 1000)] == [0.0, 0.0, 0.2, 0.4, 0.8, 0.8, 0.8]
    short = ABC(ABCConfig(schedule_epochs=5), algorithm_context(COUNTS, 3))       # fewer steps than epochs
    assert [short.progress(step) for step in (0, 1, 2, 4, 7)] == [0.0, 0.2, 0.4, 0.8, 0.8]
    torch.testing.assert_close(algorithm.keep_probability, torch.tensor([0.25, 1.0], dtype=torch.float64))
    # In the first epoch every confident image counts, whatever its class; in the third, head-class ones 70 %.
    high = torch.full((3,), 0.9, dtype=torch.float64)
    algorithm.uniforms = lambda step, labeled, unlabeled: (high[:labeled], high[:unlabeled])  # type: ignore[method-assign]
    assert algorithm.balance_masks(torch.tensor([1]), torch.tensor([0, 0, 1]), step=0)[1].tolist() == [1.0, 1.0, 1.0]
    assert algorithm.balance_masks(torch.tensor([1]), torch.tensor([0, 0, 1]), step=4)[1].tolist() == [0.0, 0.0, 1.0]


def test_draws_depend_on_the_seed_and_step_only() -> None:
    torch.manual_seed(7)
    first, second = (ABC(ABCConfig(), algorithm_context(COUNTS, 100)) for _ in range(2))
    assert first.key == second.key == 7   # the run's seed, not the global generator's position
    labeled, unlabeled = first.uniforms(3, 4, 8)
    assert labeled.dtype == torch.float64 and labeled.shape == (4,) and unlabeled.shape == (8,)
    assert torch.equal(torch.cat(second.uniforms(3, 4, 8)), torch.cat([labeled, unlabeled]))
    assert not torch.equal(torch.cat(first.uniforms(4, 4, 8)), torch.cat([labeled, unlabeled]))
    second.key = 8
    assert not torch.equal(torch.cat(second.uniforms(3, 4, 8)), torch.cat([labeled, unlabeled]))
    assert 0.0 <= float(unlabeled.min()) and float(unlabeled.max()) < 1.0
    assert len({step_seed(7, step) for step in range(10_000)}) == 10_000


def test_masks_keep_each_class_with_its_probability() -> None:
    # A labeled batch of 6 images of the head class (keep 0.25) and 2 of the tail class (keep 1), 1,000 steps:
    # in expectation 1.5 and 2 kept per step, about the tail's count: the subset is (nearly) balanced.
    algorithm = ABC(ABCConfig(schedule_epochs=2), algorithm_context(COUNTS, 1000))   # progress 0.5 from step 500
    algorithm.key = 0
    labels = torch.tensor([0] * 6 + [1] * 2)
    pseudo = torch.tensor([0] * 8 + [1] * 8)
    kept_labeled, kept_early, kept_late = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    for step in range(1000):
        mask_labeled, mask_unlabeled = algorithm.balance_masks(labels, pseudo, step)
        kept_labeled += torch.stack([mask_labeled[:6].sum(), mask_labeled[6:].sum()])
        kept = torch.stack([mask_unlabeled[:8].sum(), mask_unlabeled[8:].sum()])
        if step < 500:
            kept_early += kept
        else:
            kept_late += kept
    assert abs(kept_labeled[0].item() / 6000 - 0.25) < 0.02 and kept_labeled[1].item() == 2000
    assert kept_early.tolist() == [4000.0, 4000.0]                        # progress 0: keep all
    assert abs(kept_late[0].item() / 4000 - 0.625) < 0.03 and kept_late[1].item() == 4000   # 1 - 0.5 * 0.75


def test_usb_rng_draws_as_usb_from_the_global_generator() -> None:
    algorithm = ABC(ABCConfig(usb_rng=True, schedule_epochs=5), algorithm_context(COUNTS, 10))
    labels, pseudo = torch.tensor([0, 1, 0, 0, 0, 0]), torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    torch.manual_seed(11)
    mask_labeled, mask_unlabeled = algorithm.balance_masks(labels, pseudo, step=4)
    torch.manual_seed(11)
    # USB's ABC.compute_abc_loss: bernoulli(lb_class_dist[y_lb]), then bernoulli(ulb_class_dist[y_ulb]), float64.
    keep = torch.tensor([0.25, 1.0], dtype=torch.float64)
    expected_labeled = torch.bernoulli(keep[labels]).float()
    expected_unlabeled = torch.bernoulli((1 - (2 / 5) * (1 - keep))[pseudo]).float()
    assert torch.equal(mask_labeled, expected_labeled) and torch.equal(mask_unlabeled, expected_unlabeled)
    algorithm.batch_group = Slice(0, 2)
    with pytest.raises(ValueError, match="usb_rng"):
        algorithm.balance_masks(labels, pseudo, step=4)


class Slice:
    """Process `rank` of a data-parallel group of `world_size` (only its position is read)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("ABC needs no collective")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("ABC needs no collective")


def test_data_parallel_slices_draw_their_rows_of_the_whole_batch() -> None:
    whole = ABC(ABCConfig(schedule_epochs=4), algorithm_context(COUNTS, 8))
    labels, pseudo = torch.tensor([0, 0, 1, 0, 0, 0]), torch.tensor([0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0])
    for step in (0, 5):
        expected = whole.balance_masks(labels, pseudo, step)
        for rank in (0, 1, 2):
            part = ABC(ABCConfig(schedule_epochs=4), algorithm_context(COUNTS, 8))
            part.batch_group = Slice(rank, 3)
            masks = part.balance_masks(labels[2 * rank:2 * rank + 2], pseudo[4 * rank:4 * rank + 4], step)
            assert torch.equal(masks[0], expected[0][2 * rank:2 * rank + 2])
            assert torch.equal(masks[1], expected[1][4 * rank:4 * rank + 4])


def test_evaluation_reads_the_abc_head() -> None:
    algorithm = ABC(ABCConfig(), algorithm_context([5, 3, 1], 100))
    net = create_model("small_cnn", 3, 1, bn_momentum=0.001)
    heads = algorithm.build_heads(net.feature_dim, 3)
    assert list(heads) == [ABC.eval_head] == [ABC_HEAD] and torch.equal(heads[ABC_HEAD].bias, torch.zeros(3))
    for name, head in heads.items():
        net.add_head(name, head)
    with torch.no_grad():   # the standard head always says class 0, the ABC head class 2
        for name, winner in (("logits", 0), (ABC_HEAD, 2)):
            net.heads[name].weight.zero_()
            net.heads[name].bias.copy_(torch.nn.functional.one_hot(torch.tensor(winner), 3).float())
    images, targets = torch.zeros(6, 1, 8, 8, dtype=torch.uint8), torch.full((6,), 2)
    evaluator = Evaluator({"test": (images, targets)}, 3, [5, 3, 1], [0.5], [0.25], ABC.eval_head, 4,
                          torch.device("cpu"), channels_last=False)
    assert evaluator.evaluate(net, "test")["top1"] == 1.0


def test_no_state_to_merge_or_checkpoint() -> None:
    algorithm = ABC(ABCConfig(), algorithm_context(COUNTS, 100))
    assert algorithm.state_dict() == {}   # keep probabilities derived, draws from (seed, step)
    merged = algorithm.merge_states([algorithm.state_dict(), algorithm.state_dict()])
    assert merged == {}
    algorithm.load_state_dict(merged)


@pytest.mark.parametrize("usb_rng", [False, True])
def test_steps_never_wait_for_the_device(usb_rng: bool) -> None:
    algorithm, net, teacher = meta_setup(ABC, ABCConfig(usb_rng=usb_rng, schedule_epochs=50))
    steps = [0, 1, 2, 3]   # total 100 steps: epochs of 2 steps, so the schedule moves at step 2
    assert audit_steps(algorithm, net, teacher, steps) == {step: ([], [], []) for step in steps}


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=abc", "train.num_threads=1"])
    assert read_results(run_dir)["final"]["top1"] > 0.3   # 10 classes: chance is 0.1
