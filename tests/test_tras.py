"""TRAS: the prior adjustment and class strengths, both heads' losses and the warm-up against a hand
computation, the evaluated head, data-parallel slices, the (empty) state and merge, no host syncs, learning."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_imwa.algorithm import get_algorithm
from ssl_imwa.algorithms.tras import TARGET_HEAD, TRAS, TRASConfig, transfer_loss
from ssl_imwa.evaluate import evaluate_checkpoint
from tests.test_fixmatch import audit_steps, meta_setup
from tests.utils import algorithm_context, read_results, train_run

COUNTS = [10, 1]   # pi_l = (10/11, 1/11)
PRIOR = [10 / 11, 1 / 11]
ADJUSTMENT = [math.log(p + 1e-12) for p in PRIOR]   # tau = 1
# Rows [standard head | target head] of the labeled batch (labels 0, 1), the weak and the strong view.
LABELED = [[2.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
# Standard head, adjusted by -log pi_l = (0.095, 2.398): (6, 0) -> class 0 at 0.976; (0, 1) -> class 1 at
# 0.964 (0.731 unadjusted); (2, 0) -> class 1 at 0.576, below the threshold (class 0 unadjusted).
# Target head, plain: (4, 0) -> class 0 at 0.982; (0, 0) -> 0.5, out; (0, 5) -> class 1 at 0.993.
WEAK = [[6.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 5.0]]
STRONG = [[1.0, 0.0, 0.0, 1.0], [0.0, 3.0, 2.0, 0.0], [0.5, 0.5, 1.0, 1.0]]


class TwoHeads(nn.Module):
    """A 'model' that returns preset logits of both heads for the concatenated batch, ignoring its input."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.tensor(rows))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.shape[0] == self.rows.shape[0], "TRAS forwards x, u_w and u_s in one batch"
        return {"features": torch.zeros(x.shape[0], 1), "logits": self.rows[:, :2] * 1.0,
                TARGET_HEAD: self.rows[:, 2:] * 1.0}


def make_batch(labels: list[int], unlabeled: int, truth: list[int] | None = None) -> dict:
    return {"x": torch.zeros(len(labels), 1, 2, 2), "y": torch.tensor(labels),
            "u_weak": torch.zeros(unlabeled, 1, 2, 2), "u_strong": [torch.zeros(unlabeled, 1, 2, 2)],
            "u_target": torch.tensor(truth if truth is not None else [-1] * unlabeled)}


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def strength(c: int, scale: float = 2.0, offset: float = 2.0) -> float:
    return scale * softmax([-a for a in ADJUSTMENT])[c] + offset


def transfer_term(student: list[float], teacher: list[float], label: int) -> float:
    q = softmax([(t - strength(label) * a) / 2 for t, a in zip(teacher, ADJUSTMENT, strict=True)])
    log_p = [v - math.log(sum(math.exp(s) for s in student)) for v in student]
    return -sum(qc * lc for qc, lc in zip(q, log_p, strict=True))


def test_adjustment_and_class_strengths_match_hand_computation() -> None:
    algorithm = TRAS(TRASConfig(tau=1.0, strength_scale=2.0, strength_offset=2.0), algorithm_context(COUNTS, 100))
    assert algorithm.adjustment.dtype == torch.float64
    torch.testing.assert_close(algorithm.adjustment, torch.tensor(ADJUSTMENT, dtype=torch.float64))
    # softmax(-log pi_l) = (1/pi_l) / sum(1/pi_l) = (1/11, 10/11): the rarer class gets the stronger adjustment.
    torch.testing.assert_close(algorithm.class_strength, torch.tensor([2 + 2 / 11, 2 + 20 / 11], dtype=torch.float64))
    halved = TRAS(TRASConfig(tau=0.5), algorithm_context(COUNTS, 100))
    torch.testing.assert_close(halved.adjustment, torch.tensor([0.5 * a for a in ADJUSTMENT], dtype=torch.float64))


def test_losses_after_the_warm_up_match_hand_computation() -> None:
    algorithm = TRAS(TRASConfig(lambda_u=2.0, warmup=3), algorithm_context(COUNTS, 100))
    model = TwoHeads(LABELED + WEAK + STRONG)
    out = algorithm.losses(make_batch([0, 1], 3, truth=[0, 0, -1]), model, model, step=3)
    std = lambda row: row[:2]
    tgt = lambda row: row[2:]
    loss_x = (ce(std(LABELED[0]), 0) + ce(std(LABELED[1]), 1)) / 2
    # Adjusted pseudo-labels (0, 1, 1), mask (1, 1, 0).
    loss_u = (ce(std(STRONG[0]), 0) + ce(std(STRONG[1]), 1) + 0.0) / 3
    adjusted = lambda row: [v + a for v, a in zip(tgt(row), ADJUSTMENT, strict=True)]
    loss_x_target = (ce(adjusted(LABELED[0]), 0) + ce(adjusted(LABELED[1]), 1)) / 2
    # Target head's own weak-view labels (0, 0, 1), mask (1, 0, 1); the standard head's strong view is transferred.
    loss_transfer = (transfer_term(tgt(STRONG[0]), std(STRONG[0]), 0) + 0.0
                     + transfer_term(tgt(STRONG[2]), std(STRONG[2]), 1)) / 3
    assert math.isclose(out["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(out["loss_x_target"].item(), loss_x_target, rel_tol=1e-6)
    assert math.isclose(out["loss_transfer"].item(), loss_transfer, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u + loss_x_target + loss_transfer, rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(out["mask_rate_target"].item(), 2 / 3, rel_tol=1e-6)
    # The masked pseudo-labels (0, 1) against the truth (0, 0): one of two right.
    assert math.isclose(out["pseudo_acc"].item(), 0.5)


def test_the_warm_up_is_adjusted_fixmatch_and_gives_the_target_head_a_zero_gradient() -> None:
    algorithm = TRAS(TRASConfig(warmup=3), algorithm_context(COUNTS, 100))
    model = TwoHeads(LABELED + WEAK + STRONG)
    out = algorithm.losses(make_batch([0, 1], 3), model, model, step=2)
    loss_x = (ce(LABELED[0][:2], 0) + ce(LABELED[1][:2], 1)) / 2
    loss_u = (ce(STRONG[0][:2], 0) + ce(STRONG[1][:2], 1)) / 3
    assert math.isclose(out["loss"].item(), loss_x + loss_u, rel_tol=1e-6)
    assert out["loss_x_target"].item() == 0.0 and out["loss_transfer"].item() == 0.0
    out["loss"].backward()
    target_grad = model.rows.grad[:, 2:]
    assert torch.equal(target_grad, torch.zeros_like(target_grad))   # in the graph (DDP), but no signal
    assert model.rows.grad[:, :2].abs().sum() > 0


def test_the_transferred_distribution_carries_no_gradient() -> None:
    student = torch.tensor([[0.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0]], requires_grad=True)
    adjustment = torch.tensor([ADJUSTMENT], dtype=torch.float64) * strength(0)
    loss = transfer_loss(student, teacher, adjustment, torch.ones(1))
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert math.isclose(loss.item(), transfer_term([0.0, 1.0], [1.0, 0.0], 0), rel_tol=1e-6)


def test_the_target_head_is_evaluated() -> None:
    assert get_algorithm("tras") is TRAS
    algorithm = TRAS(TRASConfig(), algorithm_context(COUNTS, 100))
    heads = algorithm.build_heads(feature_dim=8, num_classes=2)
    assert TRAS.eval_head == TARGET_HEAD == "logits_aux" and list(heads) == [TARGET_HEAD]
    assert heads[TARGET_HEAD].out_features == 2 and torch.equal(heads[TARGET_HEAD].bias, torch.zeros(2))


class NoReduction:
    """TRAS keeps no batch-derived state: a data-parallel group must never be asked to reduce anything."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("TRAS reduces nothing")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("TRAS reduces nothing")


def test_two_data_parallel_slices_average_to_the_whole_batch() -> None:
    """DDP averages the slices' gradients, i.e. minimises the mean of the slices' losses: with equal slices
    that mean must be the whole batch's loss, term by term (every mean is over the slice's samples)."""
    generator = torch.Generator().manual_seed(0)
    labels, unlabeled = [0, 1, 0, 0], 6
    rows = 3 * torch.randn(len(labels) + 2 * unlabeled, 4, generator=generator)
    x, weak, strong = rows.split([len(labels), unlabeled, unlabeled])
    algorithm = TRAS(TRASConfig(threshold=0.9, warmup=0), algorithm_context(COUNTS, 100))
    whole = algorithm.losses(make_batch(labels, unlabeled), TwoHeads(rows.tolist()), None, step=0)
    algorithm.batch_group = NoReduction()
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        u_part = slice(3 * part.start // 2, 3 * part.stop // 2)
        sliced = torch.cat([x[part], weak[u_part], strong[u_part]])
        halves.append(algorithm.losses(make_batch(labels[part], 3), TwoHeads(sliced.tolist()), None, step=0))
    assert 0 < whole["mask_rate"].item() < 1 and 0 < whole["mask_rate_target"].item() < 1
    for key in ("loss", "loss_x", "loss_u", "loss_x_target", "loss_transfer"):
        assert math.isclose(whole[key].item(), (halves[0][key].item() + halves[1][key].item()) / 2, rel_tol=1e-6), key


def test_no_state_is_checkpointed_and_merge_has_nothing_to_combine() -> None:
    algorithm = TRAS(TRASConfig(), algorithm_context(COUNTS, 100))
    assert dict(algorithm.state_dict()) == {}   # the adjustment and strengths are derived from the labeled counts
    assert algorithm.merge_states([{}, {}]) == {}
    algorithm.load_state_dict({})
    torch.testing.assert_close(algorithm.adjustment, torch.tensor(ADJUSTMENT, dtype=torch.float64))


def test_config_values_out_of_range_name_the_key() -> None:
    with pytest.raises(ValueError, match="algorithm.threshold"):
        TRASConfig(threshold=1.5).validate()
    with pytest.raises(ValueError, match="algorithm.warmup"):
        TRASConfig(warmup=-1).validate()
    with pytest.raises(ValueError, match="algorithm.strength_scale"):
        TRASConfig(strength_scale=float("inf")).validate()
    assert TRAS(TRASConfig(warmup=0.25), algorithm_context(COUNTS, 40)).warmup == 10   # a fraction of the run


def test_steps_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(TRAS, TRASConfig(warmup=2))
    steps = [0, 1, 2, 3]   # the target head joins the loss at step 2
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}
    assert algorithm.adjustment.device == torch.device("meta")


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    # With EMA warm-up: the recipe's (USB's) EMA has none, and after the quick start's 600 steps its teacher
    # still holds 0.999^600 = 55% of the initial weights; the target head, whose learned weights are smaller
    # than the standard head's (soft targets at temperature 2), then scores 0.22 (its student 0.84).
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=tras", "train.num_threads=1",
                                   "algorithm.ema.warmup=true"])
    final = read_results(run_dir)["final"]
    assert final["top1"] > 0.3   # 10 classes: chance is 0.1
    # The run evaluated the teacher's target head.
    assert final["top1"] == evaluate_checkpoint(run_dir, heads=[TARGET_HEAD])[TARGET_HEAD]["top1"]
