"""DARP: the solver against scipy's secant method as the official code calls it, its constraints and
optimality, the per-class selection by hand; predictions stored at `u_index`; losses against a hand
computation before and after the warm-up; the refinement schedule; data-parallel gather; merge; no host
syncs; learning and exact resume."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import optimize

from ssl_imwa.algorithms.darp import (
    DARP,
    DARPConfig,
    align_distribution,
    latest_occurrence,
    secant_roots,
    solver_input,
    target_distribution,
)
from tests.test_fixmatch import FixedLogits, audit_steps, meta_setup
from tests.utils import (
    algorithm_context,
    checkpoint_algorithm_state,
    read_results,
    resumed_bitwise,
    train_run,
)

LABELED = [[2.0, 0.0], [0.0, 1.0]]
WEAK = [[5.0, 0.0], [0.2, 0.0], [0.0, 4.0]]    # confidences 0.9933, 0.5498, 0.9820: targets 0, 0, 1
STRONG = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5]]
INDEX = [5, 0, 27]


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


# ----- an independent solver: numpy and scipy.optimize.newton, the official code's calls -----------------

def scipy_solver(probs: np.ndarray, target: np.ndarray, iterations: int, tol: float) -> np.ndarray:
    """The official opt_solver's algorithm: one scipy secant solve per class and iteration."""
    weights = 1 / (-probs * np.log(probs + 1e-6)).sum(axis=1)
    scaled = probs / math.e
    columns = np.exp(-1.0 / weights)[:, None] * np.ones_like(probs)
    previous = np.zeros(probs.shape[1])
    for _ in range(iterations):
        rows = 1 / (scaled * columns).sum(axis=1)
        nu = np.array([optimize.newton(lambda x, c=c, rows=rows: np.sum(scaled[:, c] * rows * np.exp(-x / weights))
                                       - target[c], previous[c], maxiter=30, tol=tol) for c in range(probs.shape[1])])
        previous = nu
        columns = np.exp(-nu[None, :] / weights[:, None])
    rows = 1 / (scaled * columns).sum(axis=1)
    return scaled * rows[:, None] * columns


def scipy_input(predictions: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    """The official estimate_pseudo and rescaling, column by column with a stable argsort."""
    kept = np.zeros_like(predictions)
    mass = np.zeros(predictions.shape[1])
    for c in range(predictions.shape[1]):
        top = np.argsort(-predictions[:, c], kind="stable")[:int(alpha * target[c])]
        kept[top, c] = 1
        mass[c] = predictions[top, c].astype(np.float64).sum()
    rescaled = predictions * kept * ((target + 1e-6) / (mass + 1e-6)) + 1e-6
    return rescaled / rescaled.sum(axis=1, keepdims=True)


def random_predictions(n: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=generator) + torch.linspace(2, -2, classes)   # head-biased
    return torch.softmax(logits, dim=1)


def test_target_is_the_labeled_distribution_scaled_to_the_unlabeled_set() -> None:
    torch.testing.assert_close(target_distribution([3, 1], 28), torch.tensor([21.0, 7.0], dtype=torch.float64))
    algorithm = DARP(DARPConfig(alpha=2.0), algorithm_context([3, 1], 100))   # 28 unlabeled images
    assert algorithm.keep.tolist() == [28, 14]   # int(2 q_c), at most the set's size


def test_solver_input_matches_hand_computation() -> None:
    # q = (3, 1), alpha = 2: column 0 keeps all 4 rows (mass 2.1), column 1 its 2 largest: row 3 (0.8) and,
    # of the tie at 0.5, row 0 (the lower index) (mass 1.3); every other entry drops to the 1e-6 floor.
    predictions = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    out = solver_input(predictions, torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([4, 2]))
    values = predictions.double().tolist()   # the float32 entries, exactly
    mass0, mass1 = sum(row[0] for row in values), values[3][1] + values[0][1]
    s0, s1 = (3 + 1e-6) / (mass0 + 1e-6), (1 + 1e-6) / (mass1 + 1e-6)
    kept = [[1, 1], [1, 0], [1, 0], [1, 1]]
    for row, (probs, flags) in enumerate(zip(values, kept, strict=True)):
        raw = [probs[0] * s0 * flags[0] + 1e-6, probs[1] * s1 * flags[1] + 1e-6]
        expected = [value / sum(raw) for value in raw]
        torch.testing.assert_close(out[row], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [40, 283])
def test_solver_matches_scipy_secant_solver(n: int) -> None:
    predictions = random_predictions(n, 10, seed=n)
    target = target_distribution([40, 30, 23, 18, 14, 11, 8, 6, 5, 4], n)
    keep = torch.tensor([min(int(2.0 * value), n) for value in target.tolist()])
    inputs = solver_input(predictions, target, keep)
    reference_input = scipy_input(predictions.numpy(), target.numpy(), 2.0)
    np.testing.assert_allclose(inputs.numpy(), reference_input, rtol=0, atol=1e-12)
    for tol in (0.1, 1e-6):
        ours = align_distribution(inputs, target, 10, tol).numpy()
        np.testing.assert_allclose(ours, scipy_solver(inputs.numpy(), target.numpy(), 10, tol), rtol=1e-9, atol=1e-12)


def test_solver_meets_its_constraints_and_optimality_conditions() -> None:
    n = 200
    inputs = solver_input(random_predictions(n, 5, seed=1), target_distribution([50, 20, 10, 5, 2], n),
                          torch.tensor([n] * 5))
    target = target_distribution([50, 20, 10, 5, 2], n)
    refined = align_distribution(inputs, target, 60, 1e-10)
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(refined.sum(dim=0), target, rtol=1e-8, atol=0)
    # Stationarity of min sum_i w_i KL(M_i || P_i) under those constraints: w_i log(M_ic / P_ic) = a_i - nu_c,
    # so w_i (log(M_ic / P_ic) - log(M_i0 / P_i0)) = nu_0 - nu_c is the same in every row.
    weights = 1 / (-inputs * torch.log(inputs + 1e-6)).sum(dim=1)
    log_ratio = weights[:, None] * torch.log(refined / inputs)
    differences = log_ratio - log_ratio[:, :1]
    torch.testing.assert_close(differences, differences[:1].expand_as(differences), rtol=0, atol=1e-6)


def test_predictions_already_aligned_are_left_as_they_are() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    refined = align_distribution(probs, probs.sum(dim=0), 20, 1e-12)
    torch.testing.assert_close(refined, probs, rtol=0, atol=1e-12)


def test_secant_roots_follow_scipy_and_stop_early_without_changing_the_result() -> None:
    targets = torch.tensor([0.3, 2.0, 5.0, 0.05], dtype=torch.float64)
    rates = torch.tensor([1.0, 0.5, 0.2, 3.0], dtype=torch.float64)

    def func(x: torch.Tensor) -> torch.Tensor:
        return 4 * torch.exp(-x * rates) - targets

    for tol in (0.1, 1e-10):
        start = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64)
        roots = secant_roots(func, start, tol)
        expected = [optimize.newton(lambda x, c=c: 4 * math.exp(-x * rates[c].item()) - targets[c].item(),
                                    start[c].item(), maxiter=30, tol=tol) for c in range(4)]
        np.testing.assert_allclose(roots.numpy(), expected, rtol=1e-12, atol=0)
        assert torch.equal(secant_roots(func, start, tol, early_exit=True), roots)


def test_latest_occurrence_points_at_the_last_copy() -> None:
    assert latest_occurrence(torch.tensor([4, 1, 4, 7, 1])).tolist() == [2, 4, 2, 3, 4]


def batch() -> dict[str, object]:
    return {"x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([0, 0]), "u_weak": torch.zeros(3, 1, 2, 2),
            "u_strong": [torch.zeros(3, 1, 2, 2)], "u_index": torch.tensor(INDEX), "u_target": torch.tensor([0, 1, -1])}


def model() -> FixedLogits:
    return FixedLogits(torch.tensor(LABELED + WEAK + STRONG))


def test_warmup_step_is_fixmatch_and_stores_predictions_at_their_indices() -> None:
    algorithm = DARP(DARPConfig(lambda_u=2.0, epoch_length=10, warmup_epochs=1), algorithm_context([3, 1], 100))
    out = algorithm.losses(batch(), model(), None, step=19)   # refinement starts at step 20
    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 0)) / 2
    loss_u = (ce(STRONG[0], 0) + 0.0 + ce(STRONG[2], 1)) / 3   # the second sample is below 0.95
    assert math.isclose(out["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u, rel_tol=1e-6)
    assert out["relabel_rate"].item() == 0.0
    expected = torch.full((28, 2), 0.5)
    expected[INDEX] = torch.tensor([softmax(row) for row in WEAK])
    torch.testing.assert_close(algorithm.predictions, expected, rtol=1e-6, atol=0)
    assert torch.equal(algorithm.refined, torch.full((28, 2), 0.5))   # no refinement yet


def test_duplicates_in_a_batch_keep_the_later_prediction() -> None:
    algorithm = DARP(DARPConfig(), algorithm_context([3, 1], 100))
    algorithm.store(torch.tensor([3, 9, 3]), torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]))
    assert algorithm.predictions[3].tolist() == pytest.approx([0.2, 0.8])
    assert algorithm.predictions[9].tolist() == [0.5, 0.5]


def head_biased_state(algorithm: DARP) -> torch.Tensor:
    """Stored predictions that over-predict class 0 (q = (21, 7) of 28); returns the expected refinement."""
    p1 = torch.linspace(0.05, 0.45, 28)
    algorithm.predictions = torch.stack([1 - p1, p1], dim=1)
    return align_distribution(solver_input(algorithm.predictions, algorithm.target, algorithm.keep),
                              algorithm.target, 10, 0.1).float()


@pytest.mark.parametrize("threshold_refined", [True, False])
def test_refinement_step_uses_the_refined_labels(threshold_refined: bool) -> None:
    # Refined confidences of the batch (1.0, 0.559, 0.985), the model's (0.993, 0.550, 0.982): at 0.984 the
    # third image passes only on its refined label.
    config = DARPConfig(threshold=0.984, epoch_length=1, warmup_epochs=0, threshold_refined=threshold_refined)
    algorithm = DARP(config, algorithm_context([3, 1], 100))
    assert algorithm.refine_start == 1
    expected_before = head_biased_state(algorithm)
    probs = torch.softmax(torch.tensor(WEAK), dim=1)
    after = algorithm.predictions.clone()
    after[INDEX] = probs
    expected = align_distribution(solver_input(after, algorithm.target, algorithm.keep), algorithm.target, 10, 0.1).float()
    assert not torch.allclose(expected, expected_before)   # this batch's predictions enter the solve
    out = algorithm.losses(batch(), model(), None, step=1)
    torch.testing.assert_close(algorithm.refined, expected, rtol=0, atol=0)
    rows = expected[INDEX]
    labels = rows.argmax(dim=1).tolist()
    confidence = (rows if threshold_refined else probs).max(dim=1).values.tolist()
    mask = [1.0 if value >= 0.984 else 0.0 for value in confidence]
    assert mask == ([1.0, 0.0, 1.0] if threshold_refined else [1.0, 0.0, 0.0])
    loss_u = sum(m * ce(s, t) for s, t, m in zip(STRONG, labels, mask, strict=True)) / 3
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(out["mask_rate"].item(), sum(mask) / 3, rel_tol=1e-6)
    relabelled = [label != max(range(2), key=lambda c, p=p: p[c]) for label, p in zip(labels, probs.tolist(), strict=True)]
    assert math.isclose(out["relabel_rate"].item(), sum(relabelled) / 3, rel_tol=1e-6)
    assert any(relabelled)   # the solver moved an image of this batch to the rare class


def test_solver_runs_every_refine_every_steps_from_the_end_of_the_warmup() -> None:
    algorithm = DARP(DARPConfig(epoch_length=2, warmup_epochs=1, refine_every=3), algorithm_context([3, 1], 100))
    assert [step for step in range(12) if algorithm.is_refine_step(step)] == [4, 7, 10]
    expected = head_biased_state(algorithm)
    solve = algorithm.refine
    solved: list[int] = []

    def counted() -> torch.Tensor:
        solved.append(step)
        return solve()

    algorithm.refine = counted
    for step in range(9):
        out = algorithm.losses(batch(), model(), None, step=step)
        assert (out["relabel_rate"].item() > 0) == (step >= 4)   # the warm-up trains on the predictions
    assert solved == [4, 7]
    assert not torch.equal(algorithm.refined, expected)   # the batch's predictions were stored first


class OtherSlice:
    """A data-parallel group of two in one process: the other slice's index and predictions are given."""

    def __init__(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        self.other = {torch.long: index, torch.float32: probs}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, self.other[tensor.dtype]])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("DARP gathers its predictions")


def test_every_slice_stores_the_whole_batch_and_reads_its_own_rows() -> None:
    config = DARPConfig(epoch_length=1, warmup_epochs=0)
    whole, sliced = (DARP(config, algorithm_context([3, 1], 100)) for _ in range(2))
    head_biased_state(whole)
    head_biased_state(sliced)
    other_index, other_probs = torch.tensor([1, 2, 26]), torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.99, 0.01]])
    sliced.batch_group = OtherSlice(other_index, other_probs)
    whole.store(other_index, other_probs)   # the other slice's images come after this one's in the batch
    whole.predictions[INDEX] = torch.softmax(torch.tensor(WEAK), dim=1)
    expected = whole.refine()
    out = sliced.losses(batch(), model(), None, step=1)
    assert torch.equal(sliced.predictions, whole.predictions)
    assert torch.equal(sliced.refined, expected)
    rows = expected[INDEX]   # this slice's images: its own rows of the refinement
    mask = rows.max(dim=1).values.ge(0.95).float().tolist()
    loss_u = sum(m * ce(s, t) for s, t, m in zip(STRONG, rows.argmax(dim=1).tolist(), mask, strict=True)) / 3
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6, abs_tol=1e-9)


def test_merge_averages_predictions_and_refined_labels_and_keeps_the_constraints() -> None:
    algorithm = DARP(DARPConfig(), algorithm_context([3, 1], 100))
    target = algorithm.target
    refined = []
    states = []
    for seed in (0, 1):
        predictions = random_predictions(28, 2, seed)
        refined.append(align_distribution(predictions.double(), target, 40, 1e-10).float())
        states.append({"predictions": predictions, "refined": refined[-1]})
    merged = algorithm.merge_states(states)
    torch.testing.assert_close(merged["predictions"], (states[0]["predictions"] + states[1]["predictions"]) / 2)
    torch.testing.assert_close(merged["refined"], (refined[0] + refined[1]) / 2)
    torch.testing.assert_close(merged["refined"].sum(dim=1), torch.ones(28), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["refined"].double().sum(dim=0), target, rtol=1e-6, atol=0)
    algorithm.load_state_dict(merged)   # target and keep are derived, not part of the state
    assert set(algorithm.state_dict()) == {"predictions", "refined"}


def test_config_values_are_checked() -> None:
    for key, value in (("alpha", 0.0), ("solver_iterations", 0), ("solver_tol", 0.0), ("refine_every", 0),
                       ("warmup_epochs", -1), ("epoch_length", 1.5), ("threshold", 1.5)):
        with pytest.raises(ValueError, match=f"algorithm.{key}"):
            DARPConfig(**{key: value}).validate()


def test_steps_never_wait_for_the_device() -> None:
    algorithm, model_, teacher = meta_setup(DARP, DARPConfig(epoch_length=1, warmup_epochs=1, refine_every=2))
    steps = [0, 1, 2, 3, 4, 5]   # warm-up 0 and 1; the solver at 2 and 4; refined labels read at 3 and 5
    assert [step for step in steps if algorithm.is_refine_step(step)] == [2, 4]
    assert audit_steps(algorithm, model_, teacher, steps) == {step: ([], [], []) for step in steps}
    assert algorithm.refined.device == torch.device("meta")


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=darp", "train.num_threads=1"])
    assert read_results(run_dir)["final"]["top1"] > 0.3   # 10 classes: chance is 0.1


RUN = ["algorithm=darp", "experiment=quickstart", "train.iterations=30", "train.batch_size=8", "train.mu=2",
       "train.eval_every=10", "train.log_every=5", "algorithm.threshold=0.5", "algorithm.epoch_length=3",
       "algorithm.warmup_epochs=1", "algorithm.refine_every=4", "imwa.k=2", "imwa.episodes=2"]


@pytest.mark.slow
def test_resume_with_imwa_merges_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Solver at 6, 10, 14, 18, 22, 26; the merge after step 14; stopped at 20, between two solves.
    resumed = resumed_bitwise(tmp_path, RUN, stop_at=20, replicas=2)
    for replica in (0, 1):
        state = checkpoint_algorithm_state(resumed, replica)
        assert not torch.allclose(state["refined"], torch.full_like(state["refined"], 0.1))   # refined labels exist
