"""ACR: pseudo-label masks and targets, logit-adjusted losses, the adaptive tau, the estimate, state and merge."""
from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_imwa.algorithms.acr import (
    ACR,
    ACRConfig,
    adjusted_pseudo_labels,
    anchor_distances,
    confident_class_histogram,
    tau_from_distances,
)
from ssl_imwa.models import create_model
from tests.test_fixmatch import audit_steps, meta_batch, meta_setup
from tests.utils import (
    algorithm_context,
    assert_bitwise_equal,
    checkpoint_algorithm_state,
    checkpoint_tensors,
    logged_train_scalars,
    train_run,
)

CIFAR10_GAMMA100 = [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


class SplitLogits(nn.Module):
    """Input rows are [standard logits | balanced logits], so tests choose both heads' outputs."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x, "logits": x[:, :self.num_classes], "logits_balanced": x[:, self.num_classes:]}


def make_batch(x: torch.Tensor, y: list[int], u_weak: torch.Tensor, u_strong: torch.Tensor,
               u_is_labeled: torch.Tensor | None = None) -> dict:
    count = u_weak.shape[0]
    return {"x": x, "y": torch.tensor(y), "u_weak": u_weak, "u_strong": [u_strong, u_strong],
            "u_index": torch.arange(count), "u_target": torch.full((count,), -1),
            "u_is_labeled": torch.zeros(count, dtype=torch.bool) if u_is_labeled is None else u_is_labeled}


def image_batch(generator: torch.Generator, labeled: int = 6, unlabeled: int = 8) -> dict:
    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 1, 8, 8, generator=generator)

    labels = torch.randint(0, 3, (labeled,), generator=generator).tolist()
    batch = make_batch(images(labeled), labels, images(unlabeled), images(unlabeled),
                       torch.rand(unlabeled, generator=generator) < 0.3)
    batch["u_strong"][1] = images(unlabeled)
    return batch


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3, in_channels=1)
    for name, head in ACR.build_heads(ACR(ACRConfig(follow_official_code=False), algorithm_context([3, 2, 1], 10)), model.feature_dim, 3).items():
        model.add_head(name, head)
    return model


# Standard-head weak logits with pi_l = (0.9, 0.1) and tau = 1 (adjusted = logits - log pi_l):
#   (3, 0): plain max 0.953 (confident), adjusted (3.105, 2.303) -> target 0, max 0.691
#   (0, 1): plain max 0.731, adjusted (0.105, 3.303) -> target 1, max 0.961 (confident)
#   (2, 0): plain max 0.881, adjusted (2.105, 2.303) -> target 1, max 0.549
#   (0, 0): plain max 0.5, adjusted (0.105, 2.303) -> target 1, max 0.9
WEAK_STANDARD = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
# Balanced head confident (max 0.993) only on the third sample.
WEAK_BALANCED = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 0.0]])


def test_pseudo_label_masks_use_or_and_targets_use_the_adjusted_logits() -> None:
    adjustment = torch.tensor([0.9, 0.1]).log()
    labels, mask = adjusted_pseudo_labels(WEAK_STANDARD, adjustment, WEAK_STANDARD, threshold=0.95)
    assert labels.tolist() == [0, 1, 1, 1] and mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    labels_b, mask_b = adjusted_pseudo_labels(WEAK_STANDARD, adjustment, WEAK_BALANCED, threshold=0.95)
    assert labels_b.tolist() == [0, 1, 1, 1] and mask_b.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_losses_match_hand_computation() -> None:
    algorithm = ACR(ACRConfig(tau12=0.0, follow_official_code=False), algorithm_context([9, 1], 10))
    algorithm.tau = torch.tensor(1.0, dtype=torch.float64)
    # Labeled (2, 0 | 2, 0), y = 1: CE_s = log(1 + e^2) = 2.1269280; balanced logits + 2 log pi_l =
    # (1.7892790, -4.6051702): CE_b = log(1 + e^6.3944492) = 6.3961186.
    # Strong views all (1, 0 | 1, 0): CE(target 0) = 0.3132617, CE(target 1) = 1.3132617.
    # Standard branch (tau = 1, table above): targets (0, 1, 1, 1), mask (1, 1, 0, 0);
    # L_u = 2 views * (CE_0 + CE_1) / 8 terms = 0.4066308.
    # Balanced branch (tau12 = 0: plain argmax f_s): targets (0, 1, 0, 0); mask = plain max >= 0.95 (first)
    # OR balanced head confident (third) = (1, 0, 1, 0); L_u_balanced = 2 * (CE_0 + CE_0) / 8 = 0.1566309.
    batch = make_batch(torch.tensor([[2.0, 0.0, 2.0, 0.0]]), [1], torch.cat([WEAK_STANDARD, WEAK_BALANCED], 1),
                       torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 4))
    out = algorithm.losses(batch, SplitLogits(2), SplitLogits(2), step=1)
    assert out["loss_x"].item() == pytest.approx(2.1269280 + 6.3961186, abs=1e-5)
    assert out["loss_u"].item() == pytest.approx(0.4066308, abs=1e-6)
    assert out["loss_u_balanced"].item() == pytest.approx(0.1566309, abs=1e-6)
    assert out["mask_rate"].item() == 0.5
    assert out["loss"].item() == pytest.approx(2.1269280 + 6.3961186 + 0.4066308 + 0.1566309, abs=1e-5)


def test_official_adjustment_is_log_of_prior_power_in_float64() -> None:
    paper = ACR(ACRConfig(follow_official_code=False), algorithm_context([9, 1], 10))
    official = ACR(ACRConfig(follow_official_code=True), algorithm_context([9, 1], 10))
    torch.testing.assert_close(paper.adjustment(2.0), torch.tensor([2 * math.log(0.9), 2 * math.log(0.1)]))
    assert official.adjustment(2.0).dtype == torch.float64
    assert official.adjustment(0.0).tolist() == [math.log(1 + 1e-12)] * 2
    assert paper.adjustment(0.0).tolist() == [0.0, 0.0]


def test_anchor_distances_match_hand_computation() -> None:
    # u = (0.5, 0.5), pi_l = (0.8, 0.2): KL(u||pi) = 0.2231436, KL(pi||u) = 0.1927448, so d_con = 0.2079442;
    # d_uni = 0; the reversed anchor (0.2, 0.8) is as far as the consistent one.
    distances = anchor_distances(torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(distances, torch.tensor([0.2079442, 0.0, 0.2079442], dtype=torch.float64))


@pytest.mark.parametrize("anchor, expected_tau", [("consistent", 0.08), ("uniform", 0.81), ("reversed", 1.76)])
def test_tau_at_each_anchor_for_cifar10_gamma100(anchor: str, expected_tau: float) -> None:
    # ACR: the softmax weight cannot reach 0, 1, 2 exactly; about 0.08, 0.81, 1.76 for this prior.
    prior = torch.tensor(CIFAR10_GAMMA100, dtype=torch.float64)
    prior = prior / prior.sum()
    estimate = {"consistent": prior, "uniform": torch.full_like(prior, 0.1), "reversed": prior.flip(0)}[anchor]
    tau = float(tau_from_distances(anchor_distances(estimate, prior), tau_max=2.0))
    assert tau == pytest.approx(expected_tau, abs=0.01)


def test_estimate_histogram_excludes_labeled_images() -> None:
    logits = torch.tensor([[9.0, 0, 0], [9.0, 0, 0], [0, 0, 9.0], [0, 9.0, 0], [0, 0, 0.1]])
    is_labeled = torch.tensor([False, False, True, False, False])
    counts = confident_class_histogram(logits, is_labeled, 0.95, 3, one_unit_per_class=False)
    assert counts.tolist() == [2.0, 1.0, 0.0]   # class 2 only from a labeled image; the last is unconfident
    official = confident_class_histogram(logits, is_labeled, 0.95, 3, one_unit_per_class=True)
    assert official.tolist() == [1.0, 1.0, 0.0]


def test_estimate_updates_only_from_the_start_epoch_and_tau_at_epoch_starts() -> None:
    paper = ACR(ACRConfig(epoch_length=2, estimate_start_epoch=1, follow_official_code=False), algorithm_context([9, 1], 10))
    official = ACR(ACRConfig(epoch_length=2, estimate_start_epoch=1, follow_official_code=True), algorithm_context([9, 1], 10))
    initial_tau = float(paper.tau)
    # Unlabeled samples the balanced head confidently puts in class 1.
    confident = torch.tensor([[0.0, 0.0, 0.0, 9.0]] * 3)
    confident_batch = make_batch(torch.zeros(1, 4), [0], confident, confident)
    unconfident_batch = make_batch(torch.zeros(1, 4), [0], torch.zeros(3, 4), torch.zeros(3, 4))

    def step_both(batch: dict, step: int) -> None:
        for algorithm in (paper, official):
            algorithm.losses(batch, SplitLogits(2), SplitLogits(2), step)

    for step in range(2):
        step_both(confident_batch, step)
        torch.testing.assert_close(paper.estimate, torch.tensor([0.5, 0.5], dtype=torch.float64))
    step_both(confident_batch, step=2)
    # 0.99 * 0.5 + 0.01 * (0, 1).
    estimate = torch.tensor([0.495, 0.505], dtype=torch.float64)
    torch.testing.assert_close(paper.estimate, estimate)
    # Epoch 1 starts with no distances yet: the paper keeps tau, the official code divides zeros -> 2/3.
    assert float(paper.tau) == initial_tau and float(official.tau) == pytest.approx(2 / 3)
    step_both(unconfident_batch, step=3)   # nothing confident: no update, no distance
    torch.testing.assert_close(paper.estimate, estimate)
    step_both(confident_batch, step=4)     # epoch 2 starts: tau from epoch 1's distances
    distances = anchor_distances(estimate, torch.tensor([0.9, 0.1], dtype=torch.float64))
    assert float(paper.tau) == pytest.approx(float(tau_from_distances(distances, 2.0)), abs=1e-12)
    assert float(official.tau) == pytest.approx(float(tau_from_distances(distances / 2, 2.0)), abs=1e-12)


def test_initial_tau_paper_from_uniform_estimate_official_tau_max() -> None:
    prior = torch.tensor(CIFAR10_GAMMA100, dtype=torch.float64)
    assert float(ACR(ACRConfig(follow_official_code=False), algorithm_context(CIFAR10_GAMMA100, 10)).tau) == pytest.approx(
        float(tau_from_distances(anchor_distances(torch.full((10,), 0.1), prior / prior.sum()), 2.0)))
    assert float(ACR(ACRConfig(follow_official_code=True), algorithm_context(CIFAR10_GAMMA100, 10)).tau) == 2.0


@pytest.mark.parametrize("official", [False, True])
def test_state_round_trip_gives_identical_next_losses(official: bool) -> None:
    config = ACRConfig(epoch_length=2, estimate_start_epoch=1, threshold=0.3, follow_official_code=official)
    model = tiny_model()
    teacher = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(3)
    batches = [image_batch(generator) for _ in range(7)]
    original = ACR(config, algorithm_context([3, 2, 1], 10))
    for step in range(3):
        original.losses(batches[step], model, teacher, step)
    assert original.distance_steps > 0
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = ACR(config, algorithm_context([3, 2, 1], 10))
    restored.load_state_dict(torch.load(buffer))
    restored_model = copy.deepcopy(model)
    for step in range(3, 7):
        expected = original.losses(batches[step], model, teacher, step)
        actual = restored.losses(batches[step], restored_model, teacher, step)
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, equal_nan=True)
    assert restored.tau == original.tau


def test_merge_averages_estimate_accumulators_and_tau() -> None:
    algorithm = ACR(ACRConfig(follow_official_code=False), algorithm_context([9, 1], 10))
    state_a = {"estimate": torch.tensor([0.7, 0.3], dtype=torch.float64),
               "distance_sum": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), "distance_steps": 4.0, "tau": 0.5}
    state_b = {"estimate": torch.tensor([0.5, 0.5], dtype=torch.float64),
               "distance_sum": torch.tensor([3.0, 0.0, 1.0], dtype=torch.float64), "distance_steps": 2.0, "tau": 1.5}
    merged = algorithm.merge_states([state_a, state_b])
    torch.testing.assert_close(merged["estimate"], torch.tensor([0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(merged["distance_sum"], torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64))
    assert merged["distance_steps"] == 3.0 and merged["tau"] == 1.0
    algorithm.load_state_dict(merged)
    assert float(algorithm.tau) == 1.0 and float(algorithm.distance_steps) == 3.0


@pytest.mark.parametrize("official", [False, True])
def test_steps_never_wait_for_the_device(official: bool) -> None:
    # Epochs of 2 steps, estimating from epoch 1: step 2 recomputes tau from no steps, step 4 from two.
    config = ACRConfig(epoch_length=2, estimate_start_epoch=1, follow_official_code=official)
    algorithm, model, teacher = meta_setup(ACR, config)
    algorithm.losses(meta_batch(2), model, teacher, 0)   # warm-up
    steps = [1, 2, 3, 4]
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}
    assert algorithm.tau.device == torch.device("meta") and algorithm.distance_steps.device == torch.device("meta")


def test_special_tau_gives_the_adjustment_of_a_python_float() -> None:
    # A Python 3.0 exponent takes ATen's x*x*x, a tensor one pow(): here one entry would differ by an ulp.
    official = ACR(ACRConfig(follow_official_code=True, tau_max=3.0), algorithm_context([9, 8, 7, 6, 5, 4, 3, 2, 1, 1], 10))
    assert torch.equal(official.adjustment(official.tau), official.adjustment(3.0))


def test_merge_of_five_replicas_keeps_the_taus_python_sum() -> None:
    # torch's mean adds five values in another order than Python's sum did when tau was a float.
    algorithm = ACR(ACRConfig(follow_official_code=False), algorithm_context([9, 1], 10))
    taus = [0.1, 0.2, 0.3, 0.9, 1.3]   # Python: 0.5599999999999999, torch.mean: 0.56
    state = algorithm.state_dict()
    merged = algorithm.merge_states([{**state, "tau": torch.tensor(tau, dtype=torch.float64)} for tau in taus])
    assert merged["tau"].item() == sum(taus) / 5


def test_state_with_python_floats_loads() -> None:
    # Checkpoints written before tau and the step count became tensors hold Python floats.
    algorithm = ACR(ACRConfig(follow_official_code=False), algorithm_context([9, 1], 10))
    algorithm.load_state_dict({**algorithm.state_dict(), "tau": 0.25, "distance_steps": 3.0})
    assert algorithm.tau.dtype == torch.float64 and algorithm.tau.dim() == 0 and algorithm.tau.item() == 0.25
    assert algorithm.distance_steps.dtype == torch.float64 and algorithm.distance_steps.item() == 3.0


RUN = ["algorithm=acr", "experiment=quickstart", "train.iterations=30", "train.batch_size=8", "train.mu=2",
       "train.eval_every=10", "train.log_every=5", "algorithm.epoch_length=6", "algorithm.estimate_start_epoch=1",
       "algorithm.threshold=0.5"]


@pytest.mark.slow
def test_end_to_end_with_imwa_merges(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, [*RUN, "imwa.k=2", "imwa.episodes=2"])
    assert (run_dir / "results.json").is_file()
    for source in ("replica0", "replica1"):
        logged = logged_train_scalars(run_dir / "tensorboard" / source)
        for key in ("loss", "loss_x", "loss_u", "loss_u_balanced", "mask_rate", "tau"):
            assert len(logged[key]) == 6 and all(math.isfinite(value) for value in logged[key]), (source, key)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    uninterrupted = train_run(tmp_path, RUN, "uninterrupted")
    train_run(tmp_path, [*RUN, "train.stop_at=20"], "resumed")
    resumed = train_run(tmp_path, [*RUN, "resume=true"], "resumed")
    assert_bitwise_equal(checkpoint_tensors(uninterrupted), checkpoint_tensors(resumed))
    assert_bitwise_equal(checkpoint_algorithm_state(uninterrupted), checkpoint_algorithm_state(resumed))
    assert checkpoint_algorithm_state(resumed)["distance_steps"] > 0   # the estimate ran
