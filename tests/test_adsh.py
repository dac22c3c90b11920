"""ADSH: the per-epoch score re-estimate and the class-wise mask against hand computations (USB's edge
cases included); the pass in a real run at each epoch end; no communication under data parallelism;
merge; no host syncs in a step or a pass; learning and exact resume across an epoch end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssl_imwa.algorithms.adsh import ADSH, ADSHConfig, adaptive_scores
from ssl_imwa.builders import build_replicas
from ssl_imwa.config import validate
from ssl_imwa.data import build_data
from ssl_imwa.distributed import Communicator, ProcessLayout
from ssl_imwa.sync_audit import SyncAudit
from ssl_imwa.trainer import Trainer
from tests.test_fixmatch import META, FixedLogits, audit_steps, meta_setup
from tests.utils import (
    algorithm_context,
    checkpoint_algorithm_state,
    compose_config,
    read_results,
    resumed_bitwise,
    train_run,
)


def rows(confidences: dict[int, list[float]], num_classes: int) -> tuple[torch.Tensor, dict[int, list[float]]]:
    """Logits whose softmax predicts class k with each of `confidences[k]` (rows shuffled), and the
    confidences as float32 softmax actually gives them, per class, in the order listed."""
    logits = []
    for k, values in confidences.items():
        for p in values:
            row = [math.log((1 - p) / (num_classes - 1))] * num_classes
            row[k] = math.log(p)
            logits.append(row)
    logits = torch.tensor(logits)
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0))
    actual = torch.softmax(logits, dim=-1).max(dim=-1).values
    given, start = {}, 0
    for k, values in confidences.items():
        given[k] = actual[start:start + len(values)].tolist()
        start += len(values)
    return logits[order], given


def score(confidence: float) -> float:
    return -math.log(confidence)


# Head class 0 has 5 predictions, 3 of them >= tau_1 = 0.95: USB's loop leaves rho = 2 / 5 (the index of
# the last one over the count). Ranks int(n_k * 0.4) - 1: class 0 -> 1, class 1 -> 1, class 2 -> -1 (two
# predictions: int(0.8) = 0), class 3 predicted by no image keeps its score.
SCORES = {0: [0.99, 0.97, 0.96, 0.90, 0.80], 1: [0.90, 0.85, 0.70, 0.60, 0.50], 2: [0.80, 0.60]}
KEPT = [0.1, 0.2, 0.3, 0.4]


def test_scores_match_hand_computation() -> None:
    logits, conf = rows(SCORES, 4)
    s = adaptive_scores(logits, torch.tensor(KEPT), head=0, threshold=0.95, wrap_rank=True)
    # Class 0 keeps its 2 most confident (0.97, not the third one >= tau_1: USB's rho is one short).
    # Class 2's rank -1 reads its LEAST confident prediction (Python's negative index), as USB.
    expected = [score(conf[0][1]), score(conf[1][1]), score(conf[2][1]), KEPT[3]]
    torch.testing.assert_close(s, torch.tensor(expected), rtol=0, atol=0)
    clamped = adaptive_scores(logits, torch.tensor(KEPT), head=0, threshold=0.95, wrap_rank=False)
    expected[2] = score(conf[2][0])   # the official max(0, .): its MOST confident prediction
    torch.testing.assert_close(clamped, torch.tensor(expected), rtol=0, atol=0)


def test_rho_when_at_most_one_head_prediction_reaches_the_threshold() -> None:
    s = torch.tensor(KEPT)
    # None >= 0.995: rho stays 1.0 and every class's threshold falls to its least confident prediction.
    logits, conf = rows(SCORES, 4)
    none = adaptive_scores(logits, s, head=0, threshold=0.995, wrap_rank=True)
    torch.testing.assert_close(none, torch.tensor([score(conf[0][4]), score(conf[1][4]), score(conf[2][1]), KEPT[3]]))
    # One (0.99 >= 0.98): rho = 0 / 5, every rank is -1: USB wraps to the least confident, the clamp keeps the most.
    wrapped = adaptive_scores(logits, s, head=0, threshold=0.98, wrap_rank=True)
    torch.testing.assert_close(wrapped, none, rtol=0, atol=0)
    clamped = adaptive_scores(logits, s, head=0, threshold=0.98, wrap_rank=False)
    torch.testing.assert_close(clamped, torch.tensor([score(conf[0][0]), score(conf[1][0]), score(conf[2][0]), KEPT[3]]))


def test_rho_comes_from_the_class_with_the_most_labeled_images() -> None:
    algorithm = ADSH(ADSHConfig(threshold=0.88), algorithm_context([2, 9, 9, 1], 100))
    assert algorithm.head == 1   # the first of the two largest
    assert ADSH(ADSHConfig(), algorithm_context([5, 3, 2, 1], 100)).head == 0
    # Class 1 as the head: 1 of its 5 predictions >= 0.88, rho = 0, every rank -1 (the least confident);
    # class 0 as the head would give 4 of 5, rho = 3 / 5, ranks 2, 2, 0.
    logits, conf = rows(SCORES, 4)
    algorithm.after_unlabeled_pass({"logits": logits}, step=0)
    expected = [score(conf[0][4]), score(conf[1][4]), score(conf[2][1]), 0.88]
    torch.testing.assert_close(algorithm.s, torch.tensor(expected))
    as_usb = adaptive_scores(logits, torch.full((4,), 0.88), head=0, threshold=0.88, wrap_rank=True)
    torch.testing.assert_close(as_usb, torch.tensor([score(conf[0][2]), score(conf[1][2]), score(conf[2][0]), 0.88]))


LABELED = [[2.0, 0.0], [0.0, 1.0]]
WEAK = [[5.0, 0.0], [0.2, 0.0], [0.0, 1.0], [0.0, 0.2]]   # confidences 0.9933, 0.5498, 0.7311, 0.5498
STRONG = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5], [2.0, 1.0]]


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_mask_and_losses_match_hand_computation() -> None:
    algorithm = ADSH(ADSHConfig(lambda_u=2.0), algorithm_context([3, 1], 100))
    torch.testing.assert_close(algorithm.s, torch.tensor([0.95, 0.95]))   # USB: every class starts at s = tau_1
    algorithm.s = torch.tensor([score(0.99), score(0.6)])                   # thresholds 0.99 (head), 0.6 (tail)
    batch = {"x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([0, 1]), "u_weak": torch.zeros(4, 1, 2, 2),
             "u_strong": [torch.zeros(4, 1, 2, 2)], "u_target": torch.tensor([0, 0, 1, -1])}
    out = algorithm.losses(batch, FixedLogits(torch.tensor(LABELED + WEAK + STRONG)), None, step=0)
    # Pseudo-labels 0, 0, 1, 1; kept: 0.9933 >= 0.99 and 0.7311 >= 0.6; dropped: 0.5498 < 0.99 and < 0.6.
    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 1)) / 2
    loss_u = (ce(STRONG[0], 0) + ce(STRONG[2], 1)) / 4
    assert math.isclose(out["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u, rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), 0.5)
    assert math.isclose(out["pseudo_acc"].item(), 1.0)
    assert math.isclose(out["threshold_min"].item(), 0.6, rel_tol=1e-6)


def test_config_refuses_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="algorithm.threshold"):
        ADSHConfig(threshold=1.5).validate()
    with pytest.raises(ValueError, match="algorithm.epoch_length"):
        ADSHConfig(epoch_length=0).validate()


def test_the_pass_runs_after_each_epoch_end_of_a_real_run() -> None:
    cfg = validate(compose_config(["experiment=quickstart", "algorithm=adsh", "algorithm.epoch_length=3",
                                   "algorithm.threshold=0.5", "train.batch_size=8", "train.num_threads=1",
                                   "train.eval_batch_size=10000"]))
    single = Communicator()
    (replica,), _, _ = build_replicas(cfg, build_data(cfg.dataset), torch.device("cpu"),
                                      ProcessLayout(single, single, single))
    trainer = Trainer(cfg.train, torch.device("cpu"))
    assert replica.algorithm.unlabeled_pass_every() == 3
    states = []
    for step in range(7):
        trainer.step(replica, step)
        states.append(replica.algorithm.s.clone())
        if step == 5:   # by hand: the teacher in eval mode over every unlabeled image, unaugmented
            stream, teacher = replica.stream, replica.teacher.module
            mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (stream.mean, stream.std))
            teacher.eval()
            with torch.no_grad():
                logits = teacher((stream.unlabeled_images.float() / 255 - mean) / std)["logits"]
            teacher.train()
            expected = adaptive_scores(logits, states[2], replica.algorithm.head, 0.5, wrap_rank=True)
    assert torch.equal(states[0], torch.full((10,), 0.5)) and torch.equal(states[1], states[0])
    changed = [step for step in range(1, 7) if not torch.equal(states[step], states[step - 1])]
    assert changed == [2, 5]
    torch.testing.assert_close(states[5], expected, rtol=1e-4, atol=1e-4)


class NoGroup:
    """A data-parallel group that fails on use: ADSH's state comes from the pass, which every process runs whole."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("ADSH reduces nothing over the batch")

    gather = sum


def test_processes_given_the_same_pass_keep_the_same_state_without_communicating() -> None:
    logits, _ = rows(SCORES, 4)
    states = []
    for slice_scale in (1.0, -3.0):   # two processes' different slices of a step, then the same pass
        algorithm = ADSH(ADSHConfig(), algorithm_context([5, 3, 2, 1], 100))
        algorithm.batch_group = NoGroup()
        batch = {"x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([0, 1]), "u_weak": torch.zeros(2, 1, 2, 2),
                 "u_strong": [torch.zeros(2, 1, 2, 2)], "u_target": torch.tensor([0, 1])}
        model = FixedLogits(slice_scale * torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))
        algorithm.losses(batch, model, None, step=0)
        algorithm.after_unlabeled_pass({"logits": logits}, step=0)
        states.append(algorithm.state_dict())
    assert states[0].keys() == {"s"} and torch.equal(states[0]["s"], states[1]["s"])


def test_merge_averages_the_scores() -> None:
    algorithm = ADSH(ADSHConfig(), algorithm_context([3, 1], 100))
    merged = algorithm.merge_states([{"s": torch.tensor([0.1, 0.5])}, {"s": torch.tensor([0.3, 1.5])}])
    torch.testing.assert_close(merged["s"], torch.tensor([0.2, 1.0]))
    algorithm.load_state_dict(merged)
    assert torch.equal(algorithm.s, torch.tensor([0.2, 1.0]))


def test_steps_and_passes_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(ADSH, ADSHConfig(epoch_length=2))
    steps = [0, 1, 2]
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}
    with SyncAudit(META) as audit:
        algorithm.after_unlabeled_pass({"logits": torch.empty(500, 4, device=META)}, step=1)
    assert (audit.syncs, audit.copies_to_device) == ([], [])
    assert algorithm.s.device == META and algorithm.s.shape == (4,)


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=adsh", "train.num_threads=1"])
    assert read_results(run_dir)["final"]["top1"] > 0.3   # 10 classes: chance is 0.1


RUN = ["algorithm=adsh", "experiment=quickstart", "train.iterations=30", "train.batch_size=8", "train.mu=2",
       "train.eval_every=10", "train.log_every=5", "train.num_threads=1", "algorithm.threshold=0.5",
       "algorithm.epoch_length=6", "imwa.k=2", "imwa.episodes=2"]


@pytest.mark.slow
def test_resume_mid_epoch_across_epoch_ends_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Stops at 20, mid-epoch (passes after steps 5, 11, 17, 23, 29; the merge after step 14).
    resumed = resumed_bitwise(tmp_path, RUN, stop_at=20, replicas=2)
    for replica in (0, 1):
        state = checkpoint_algorithm_state(resumed, replica)
        assert not torch.allclose(state["s"], torch.full((10,), 0.5))   # re-estimated
