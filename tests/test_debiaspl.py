"""DebiasPL: debiased pseudo-labels, the adaptive marginal loss and the p_hat estimate against a hand
computation; batch-wide estimate under data parallelism; merge; no host syncs; learning and exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssl_imwa.algorithms.debiaspl import DebiasPL, DebiasPLConfig
from tests.test_fixmatch import FixedLogits, audit_steps, meta_setup
from tests.utils import (
    algorithm_context,
    checkpoint_algorithm_state,
    read_results,
    resumed_bitwise,
    train_run,
)

LABELED = [[2.0, 0.0], [0.0, 1.0]]
WEAK = [[3.0, 0.0], [0.0, 0.5], [2.0, 0.0]]
STRONG = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5]]
P_HAT = [0.8, 0.2]


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def hand_step(tau: float, momentum: float, threshold: float, before: bool) -> dict[str, object]:
    """The DebiasPL step on LABELED/WEAK/STRONG with p_hat = P_HAT, in plain Python; `before`: USB's order
    (estimate updated before the pseudo-labels, margin from the estimate before the update)."""
    mean = [sum(softmax(row)[c] for row in WEAK) / len(WEAK) for c in range(2)]
    new_p = [momentum * P_HAT[c] + (1 - momentum) * mean[c] for c in range(2)]
    debias_p, margin_p = (new_p, P_HAT) if before else (P_HAT, new_p)
    labels, mask = [], []
    for row in WEAK:
        probs = softmax([row[c] - tau * math.log(debias_p[c]) for c in range(2)])
        labels.append(max(range(2), key=lambda c, probs=probs: probs[c]))
        mask.append(1.0 if max(probs) >= threshold else 0.0)
    loss_u = sum(m * ce([s[c] + tau * math.log(margin_p[c]) for c in range(2)], t)
                 for s, t, m in zip(STRONG, labels, mask, strict=True)) / len(STRONG)
    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 0)) / 2
    return {"p_hat": new_p, "labels": labels, "mask": mask, "loss_x": loss_x, "loss_u": loss_u}


def run_step(config: DebiasPLConfig) -> tuple[DebiasPL, dict[str, torch.Tensor]]:
    model = FixedLogits(torch.tensor(LABELED + WEAK + STRONG))
    batch = {"x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([0, 0]), "u_weak": torch.zeros(3, 1, 2, 2),
             "u_strong": [torch.zeros(3, 1, 2, 2)], "u_target": torch.tensor([0, 1, -1])}
    algorithm = DebiasPL(config, algorithm_context([10, 1], 100))
    algorithm.p_hat = torch.tensor(P_HAT)
    return algorithm, algorithm.losses(batch, model, model, step=0)


@pytest.mark.parametrize("before", [False, True])
def test_loss_and_estimate_match_hand_computation(before: bool) -> None:
    config = DebiasPLConfig(threshold=0.8, tau=1.0, momentum=0.5, lambda_u=2.0, usb_order=before)
    algorithm, out = run_step(config)
    expected = hand_step(1.0, 0.5, 0.8, before)
    torch.testing.assert_close(algorithm.p_hat, torch.tensor(expected["p_hat"]), rtol=1e-6, atol=0)
    assert math.isclose(out["loss_x"].item(), expected["loss_x"], rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), expected["loss_u"], rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), expected["loss_x"] + 2.0 * expected["loss_u"], rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), sum(expected["mask"]) / 3, rel_tol=1e-6)


def test_the_official_order_debiases_with_the_previous_estimate() -> None:
    # Debiased by p_hat (0.8, 0.2), the confidences are 0.834, 0.868 (class 1), 0.649; debiased by the
    # estimate that already holds this batch (USB's order, p_hat (0.768, 0.232)) 0.858, 0.845, 0.690.
    # The margin reads the other estimate in each order (the loss checks below).
    assert hand_step(1.0, 0.5, 0.85, before=False)["labels"] == [0, 1, 0]
    assert hand_step(1.0, 0.5, 0.85, before=False)["mask"] == [0.0, 1.0, 0.0]
    assert hand_step(1.0, 0.5, 0.85, before=True)["mask"] == [1.0, 0.0, 0.0]
    for before in (False, True):
        _, out = run_step(DebiasPLConfig(threshold=0.85, tau=1.0, momentum=0.5, usb_order=before))
        assert math.isclose(out["loss_u"].item(), hand_step(1.0, 0.5, 0.85, before)["loss_u"], rel_tol=1e-6)


class OtherSlice:
    """A data-parallel group of two in one process: the other slice's gathered tensor is given."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, self.other])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("DebiasPL gathers its batch mean")


def test_estimate_is_the_mean_over_the_whole_gathered_batch() -> None:
    other = torch.tensor([[0.1, 0.9], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    algorithm = DebiasPL(DebiasPLConfig(momentum=0.5), algorithm_context([10, 1], 100))
    algorithm.batch_group = OtherSlice(other)
    weak = torch.tensor(WEAK)
    algorithm.update_estimate(weak)
    whole = torch.cat([torch.softmax(weak, dim=-1), other]).mean(dim=0)
    torch.testing.assert_close(algorithm.p_hat, 0.5 * torch.tensor([0.5, 0.5]) + 0.5 * whole, rtol=0, atol=0)


def test_merge_averages_the_estimate() -> None:
    algorithm = DebiasPL(DebiasPLConfig(), algorithm_context([10, 1], 100))
    merged = algorithm.merge_states([{"p_hat": torch.tensor([0.7, 0.3])}, {"p_hat": torch.tensor([0.5, 0.5])}])
    torch.testing.assert_close(merged["p_hat"], torch.tensor([0.6, 0.4]))
    algorithm.load_state_dict(merged)
    assert set(algorithm.state_dict()) == {"p_hat"}


def test_steps_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(DebiasPL, DebiasPLConfig())
    steps = [0, 1, 2]
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}
    assert algorithm.p_hat.device == torch.device("meta")


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=debiaspl", "train.num_threads=1"])
    assert read_results(run_dir)["final"]["top1"] > 0.3   # 10 classes: chance is 0.1


RUN = ["algorithm=debiaspl", "experiment=quickstart", "train.iterations=30", "train.batch_size=8", "train.mu=2",
       "train.eval_every=10", "train.log_every=5", "algorithm.threshold=0.5", "imwa.k=2", "imwa.episodes=2"]


@pytest.mark.slow
def test_resume_with_imwa_merges_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    resumed = resumed_bitwise(tmp_path, RUN, stop_at=20, replicas=2)
    for replica in (0, 1):
        state = checkpoint_algorithm_state(resumed, replica)
        assert not torch.allclose(state["p_hat"], torch.full_like(state["p_hat"], 0.1))   # the estimate moved
