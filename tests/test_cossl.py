"""CoSSL: tail-class feature enhancement, the co-learning loss and the teacher classifier's pseudo-labels against
hand computations; the classifier warm-up's pieces (imprinting, TFE as USB's loop computes it, batch order, Adam
and its EMA, the second SGD step); the evaluated head's switch; the engine's one-off dataset pass and
class-balanced labeled batch; no host syncs; exact resume across the warm-up's end; learning."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ssl_imwa.algorithm import DatasetPass
from ssl_imwa.algorithms.cossl import (
    EVAL_HEAD,
    TEACHER_HEAD,
    CoSSL,
    CoSSLConfig,
    TeacherClassifier,
    WarmupDraws,
    enhanced_features,
    feature_batches,
    imprinted_weights,
    mix_features,
    nesterov_step,
    tail_mixing_probability,
    train_classifier,
    warmup_draws,
)
from ssl_imwa.algorithms.fixmatch import FixMatch
from ssl_imwa.builders import (
    build_algorithm,
    build_initial_model,
    build_replica,
    build_replicas,
)
from ssl_imwa.checkpoint import read_checkpoint
from ssl_imwa.config import validate
from ssl_imwa.data import build_data
from ssl_imwa.distributed import Communicator, ProcessLayout
from ssl_imwa.models import create_model
from ssl_imwa.sync_audit import SyncAudit
from ssl_imwa.trainer import Trainer
from tests.test_fixmatch import META, meta_batch, meta_setup
from tests.utils import (
    algorithm_context,
    assert_same_run,
    compose_config,
    launch_jobs,
    read_results,
    train_run,
)


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


# ----- tail-class feature enhancement in co-learning -------------------------------------------------------------

def test_mixing_probability_is_zero_for_the_head_and_grows_toward_the_tail() -> None:
    assert tail_mixing_probability([8, 4, 2, 1]).tolist() == [0.0, 0.5, 0.75, 0.875]


def test_co_learning_mixes_a_row_when_its_draw_is_below_its_class_probability() -> None:
    labeled = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    partners = torch.tensor([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    uniforms = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    lambdas = torch.tensor([0.75, 0.5, 0.9], dtype=torch.float64)
    probability = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)   # per row: its class's
    features, mixed = mix_features(labeled, partners, uniforms, lambdas, probability)
    # Row 0: 0.1 < 0.5, 0.75 x + 0.25 u; row 1: 0.6 >= 0.5; row 2: probability 0 (the head class) never mixes.
    assert torch.equal(features, torch.tensor([[3.25, 6.5], [3.0, 4.0], [5.0, 6.0]]))
    assert mixed.tolist() == [1.0, 0.0, 0.0]


class StubStudent(nn.Module):
    """Preset standard-head logits for the joint forward (x, u_w, u_s) and a real teacher classifier."""

    def __init__(self, logits: list[list[float]], head: TeacherClassifier) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))
        self.heads = nn.ModuleDict({TEACHER_HEAD: head})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.shape[0] == self.logits.shape[0], "CoSSL forwards x, u_w and u_s in one batch"
        features = torch.zeros(x.shape[0], 2)
        return {"features": features, "logits": self.logits * 1.0, TEACHER_HEAD: self.heads[TEACHER_HEAD](features)}


class IdentityTeacher(nn.Module):
    """An EMA 'teacher' whose features are its input rows (so a batch's features are chosen by hand)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x.flatten(1)}


LABELED = [[2.0, 0.0], [0.0, 1.0]]
WEAK = [[5.0, 0.0], [0.2, 0.0], [0.0, 4.0], [1.0, 1.0]]      # confidences 0.9933, 0.5498, 0.9820, 0.5
STRONG = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5], [2.0, 0.0]]
HEAD_WEIGHT, HEAD_BIAS = [[1.0, -1.0], [0.5, 2.0]], [0.1, -0.2]
X_BALANCED = [[1.0, 2.0], [3.0, -1.0]]
U_STRONG_FEATURES = [[4.0, 0.0], [9.0, 9.0], [-2.0, 2.0], [9.0, 9.0]]   # rows 0 and 2 partner labeled rows 0 and 1


def teacher_head() -> TeacherClassifier:
    head = TeacherClassifier(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(HEAD_WEIGHT))
        head.bias.copy_(torch.tensor(HEAD_BIAS))
    return head


def cossl_batch() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    return {"x": torch.zeros(2, 2), "y": torch.tensor([0, 1]), "u_weak": torch.tensor(WEAK),
            "u_strong": [torch.tensor(U_STRONG_FEATURES)], "u_target": torch.tensor([0, 1, 1, -1]),
            "x_balanced": torch.tensor(X_BALANCED), "y_balanced": torch.tensor([0, 1])}


def head_logits(features: list[float]) -> list[float]:
    return [sum(w * f for w, f in zip(row, features, strict=True)) + b for row, b in zip(HEAD_WEIGHT, HEAD_BIAS,
                                                                                           strict=True)]


def co_learning_algorithm(**options: Any) -> CoSSL:
    algorithm = CoSSL(CoSSLConfig(warmup=2, lambda_u=2.0, **options), algorithm_context([4, 1], 10))
    # Row 0 (class 0, probability 0) keeps its feature; row 1 (class 1, probability 0.75) draws 0.7 and mixes.
    draws = (torch.tensor([0.5, 0.7], dtype=torch.float64), torch.tensor([0.8, 0.6], dtype=torch.float64))
    algorithm.mixing_draws = lambda step, rows: draws   # type: ignore[method-assign]
    return algorithm


def test_losses_match_hand_computation() -> None:
    algorithm = co_learning_algorithm()
    out = algorithm.losses(cossl_batch(), StubStudent(LABELED + WEAK + STRONG, teacher_head()), IdentityTeacher(), 3)
    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 1)) / 2
    loss_u = (ce(STRONG[0], 0) + ce(STRONG[2], 1)) / 4                # FixMatch on the standard head
    mixed = [0.6 * x + 0.4 * u for x, u in zip(X_BALANCED[1], U_STRONG_FEATURES[2], strict=True)]
    loss_teacher = (ce(head_logits(X_BALANCED[0]), 0) + ce(head_logits(mixed), 1)) / 2
    assert math.isclose(out["loss_teacher"].item(), loss_teacher, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u + loss_teacher, rel_tol=1e-6)
    assert math.isclose(out["tfe_mix_rate"].item(), 0.5)
    assert math.isclose(out["mask_rate"].item(), 0.5)


def test_during_the_warm_up_the_teacher_classifier_gets_an_exact_zero_gradient() -> None:
    algorithm = co_learning_algorithm()
    model = StubStudent(LABELED + WEAK + STRONG, TeacherClassifier(2, 2))
    out = algorithm.losses(cossl_batch(), model, IdentityTeacher(), step=1)
    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 1)) / 2
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * (ce(STRONG[0], 0) + ce(STRONG[2], 1)) / 4, rel_tol=1e-6)
    assert out["loss_teacher"].item() == 0.0 and out["tfe_mix_rate"].item() == 0.0
    out["loss"].backward()
    head = model.heads[TEACHER_HEAD]
    assert torch.count_nonzero(head.weight.grad) == 0 and torch.count_nonzero(head.bias.grad) == 0
    assert model.logits.grad is not None and torch.count_nonzero(model.logits.grad) > 0


def test_the_teacher_loss_trains_only_the_teacher_classifier() -> None:
    model = StubStudent(LABELED + WEAK + STRONG, teacher_head())
    algorithm = co_learning_algorithm()
    loss_teacher, _ = algorithm.teacher_loss(cossl_batch(), model, IdentityTeacher(), step=3)
    loss_teacher.backward()
    assert model.logits.grad is None and model.heads[TEACHER_HEAD].weight.grad is not None


def test_pseudo_labels_from_the_teacher_classifier_after_the_warm_up() -> None:
    algorithm = co_learning_algorithm(pseudo_labels="teacher", threshold=0.9)
    model = StubStudent(LABELED + WEAK + STRONG, teacher_head())
    out = algorithm.losses(cossl_batch(), model, IdentityTeacher(), step=3)
    # The teacher classifier on the teacher's weak-view features (here the rows of WEAK themselves).
    probs = [torch.softmax(torch.tensor(head_logits(row)), 0) for row in WEAK]
    kept = [(int(p.argmax()), i) for i, p in enumerate(probs) if p.max() >= 0.9]
    loss_u = sum(ce(STRONG[i], label) for label, i in kept) / 4
    loss_x = (ce(LABELED[0], 0) + ce(LABELED[1], 1)) / 2
    # Three rows pass (the standard head would keep two: rows 0 and 2), row 3 with the teacher classifier's label 1.
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6) and kept == [(0, 0), (1, 2), (1, 3)]
    assert math.isclose(out["loss"].item() - out["loss_teacher"].item(), loss_x + 2.0 * loss_u, rel_tol=1e-6)
    before = algorithm.losses(cossl_batch(), model, IdentityTeacher(), step=1)   # the warm-up: the standard head
    assert math.isclose(before["loss_u"].item(), (ce(STRONG[0], 0) + ce(STRONG[2], 1)) / 4, rel_tol=1e-6)


def test_the_draws_depend_on_seed_and_step_and_slices_keep_their_rows() -> None:
    torch.manual_seed(3)
    algorithm = CoSSL(CoSSLConfig(max_lam=0.6), algorithm_context([4, 1], 10))
    uniforms, lambdas = algorithm.mixing_draws(5, 6)
    again = algorithm.mixing_draws(5, 6)
    assert torch.equal(uniforms, again[0]) and torch.equal(lambdas, again[1])
    assert not torch.equal(uniforms, algorithm.mixing_draws(6, 6)[0])
    assert float(lambdas.min()) >= 0.6 and float(lambdas.max()) < 1.0
    for rank in (0, 1):   # two data-parallel processes: each the rows of the whole batch's draws it holds
        algorithm.batch_group = Communicator(rank=rank, world_size=2)
        half = algorithm.mixing_draws(5, 3)
        algorithm.batch_group = Communicator()
        whole = algorithm.mixing_draws(5, 6)
        # The whole draw of D=2 is 2 x 3 uniforms then 2 x 3 lambdas: the same numbers as D=1 draws for 6 rows.
        assert torch.equal(half[0], whole[0][3 * rank:3 * rank + 3])
        assert torch.equal(half[1], whole[1][3 * rank:3 * rank + 3])


# ----- the classifier warm-up ------------------------------------------------------------------------------------

def test_imprinted_weights_are_normalised_class_means() -> None:
    features = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 4.0]])
    weights = imprinted_weights(features, torch.tensor([0, 1, 0, 1]), 2)
    assert torch.equal(weights, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def usb_tfe(labeled: torch.Tensor, classes: torch.Tensor, unlabeled: torch.Tensor, counts: list[int],
            draws: WarmupDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """USB's utils.TFE, line for line (its loop over rows), given the draws instead of np.random."""
    num_classes = len(counts)
    weights = torch.zeros(num_classes, labeled.shape[1])
    for i in range(num_classes):
        tmp = labeled[classes == i].mean(0)
        weights[i] = tmp / tmp.norm(p=2)
    labeled_probs = torch.softmax(labeled @ weights.T, dim=1)
    unlabeled_probs = torch.softmax(unlabeled @ weights.T, dim=1)
    index = torch.arange(len(labeled))
    per_class = [index[classes == i] for i in range(num_classes)]
    features, targets = [], []
    for cls in range(num_classes):
        if counts[cls] < max(counts):
            current = labeled[classes == cls]
            other = np.concatenate(per_class[:cls] + per_class[cls + 1:], axis=0)
            other_feats = torch.cat([labeled[other], unlabeled])
            other_probs = torch.cat([labeled_probs[other], unlabeled_probs])
            order = other_probs[:, cls].sort(descending=True)[1]
            other_feats = other_feats[order]
            for lam, a, b in zip(draws.lambdas[cls], draws.partner_rows[cls], range(len(draws.lambdas[cls])),
                                 strict=True):
                features.append((lam * current[a] + (1 - lam) * other_feats[b]).view(1, -1))
                targets.append(cls)
    one_hot = torch.zeros(len(classes) + len(targets), num_classes)
    one_hot[torch.arange(len(one_hot)), torch.cat([classes, torch.tensor(targets)])] = 1
    return torch.cat([labeled, *features]), one_hot


def test_enhanced_features_are_usbs_tfe() -> None:
    counts = [3, 2, 1]
    classes = torch.tensor([0, 1, 0, 2, 0, 1])
    generator = torch.Generator().manual_seed(0)
    labeled, unlabeled = torch.randn(6, 4, generator=generator), torch.randn(5, 4, generator=generator)
    draws = WarmupDraws(partner_rows={1: np.array([1]), 2: np.array([0, 0])},
                        lambdas={1: np.array([0.3]), 2: np.array([0.9, 0.25])},
                        weight=torch.zeros(3, 4), bias=torch.zeros(3), permutations=[])
    features, targets = enhanced_features(labeled, classes, unlabeled, draws, 3)
    expected_features, expected_targets = usb_tfe(labeled, classes, unlabeled, counts, draws)
    assert torch.equal(features, expected_features)   # bitwise: the same float32 arithmetic as USB's
    assert torch.equal(targets, expected_targets)
    assert features.shape == (6 + 1 + 2, 4) == (3 * max(counts), 4)


def test_feature_batches_restart_each_epoch_and_drop_partial_batches() -> None:
    orders = [torch.arange(5) + 10 * k for k in range(4)]   # 5 features, batches of 2: 2 per order
    batches = [batch.tolist() for batch in feature_batches(orders, batch_size=2, epochs=2, steps=3)]
    assert batches == [[0, 1], [2, 3], [10, 11], [20, 21], [22, 23], [30, 31]]


def test_warmup_draws_depend_on_seed_and_step_and_cover_every_adam_step() -> None:
    cfg = CoSSLConfig(classifier_epochs=3, classifier_epoch_steps=5, classifier_batch_size=4)
    draws = warmup_draws(7, 100, [5, 3, 1], feature_dim=6, cfg=cfg)
    assert {cls: len(rows) for cls, rows in draws.partner_rows.items()} == {1: 2, 2: 4}
    assert all(rows.max() < count for rows, count in zip(draws.partner_rows.values(), (3, 1), strict=True))
    # 15 features in batches of 4: 3 per order, so 2 orders per 5-step epoch.
    assert len(draws.permutations) == 6 and all(len(order) == 15 for order in draws.permutations)
    assert float(draws.weight.abs().max()) <= 1 / math.sqrt(6) and float(draws.bias.abs().max()) <= 1 / math.sqrt(6)
    same, other = warmup_draws(7, 100, [5, 3, 1], 6, cfg), warmup_draws(7, 101, [5, 3, 1], 6, cfg)
    assert torch.equal(draws.weight, same.weight) and np.array_equal(draws.lambdas[2], same.lambdas[2])
    assert not torch.equal(draws.weight, other.weight)
    with pytest.raises(ValueError, match="algorithm.classifier_batch_size=64"):
        warmup_draws(7, 100, [5, 3, 1], 6, CoSSLConfig())


def test_classifier_training_first_step_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    draws = WarmupDraws({}, {}, weight=torch.tensor([[0.1, -0.2], [0.3, 0.0]]), bias=torch.tensor([0.05, -0.05]),
                        permutations=[torch.tensor([2, 0, 1])])
    cfg = CoSSLConfig(classifier_epochs=1, classifier_epoch_steps=1, classifier_batch_size=3, classifier_lr=0.01,
                      classifier_weight_decay=0.1, classifier_ema_decay=0.9, classifier_ema_updates=2)
    weight, bias, average_weight, average_bias = train_classifier(features, targets, draws, cfg)
    # Soft-target cross-entropy gradient (softmax - t) x / B; Adam's first step moves by lr g / (|g| + eps),
    # with L2 on the weight only; the EMA applied twice.
    w0, b0 = draws.weight.double(), draws.bias.double()
    x, t = features.double(), targets.double()
    p = torch.softmax(x @ w0.T + b0, dim=1)
    grad_w = (p - t).T @ x / 3 + 0.1 * w0
    grad_b = (p - t).mean(0)
    w1 = w0 - 0.01 * grad_w / (grad_w.abs() + 1e-8)
    b1 = b0 - 0.01 * grad_b / (grad_b.abs() + 1e-8)
    torch.testing.assert_close(weight.double(), w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias.double(), b1, rtol=0, atol=1e-6)
    torch.testing.assert_close(average_weight.double(), 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(average_bias.double(), 0.9 * (0.9 * b0 + 0.1 * b1) + 0.1 * b1, rtol=0, atol=1e-6)


def test_the_second_sgd_step_is_usbs_tfe_optimizer() -> None:
    cfg = CoSSLConfig(teacher_lr=0.02, teacher_momentum=0.9, teacher_weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    ours, theirs = TeacherClassifier(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for param in (*ours.parameters(), *theirs.parameters()):
            param.copy_(torch.arange(param.numel(), dtype=torch.float32).view_as(param) / 7)
    # USB: get_optimizer(teacher_classifier, 'SGD', lr, momentum, wd): biases in a group without decay, Nesterov.
    optimizer = torch.optim.SGD([{"params": [theirs.bias], "weight_decay": 0.0},
                                 {"params": [theirs.weight], "weight_decay": cfg.teacher_weight_decay}],
                                lr=cfg.teacher_lr, momentum=cfg.teacher_momentum, nesterov=True)
    for _ in range(3):
        grads = [torch.randn(param.shape, generator=generator) for param in ours.parameters()]
        for model, (weight_grad, bias_grad) in ((ours, grads), (theirs, grads)):
            model.weight.grad, model.bias.grad = weight_grad.clone(), bias_grad.clone()
        nesterov_step(ours, cfg)
        optimizer.step()
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
        assert torch.equal(ours.momentum_weight, optimizer.state[theirs.weight]["momentum_buffer"])
    before = [tensor.clone() for tensor in (ours.weight, ours.bias, ours.momentum_weight, ours.momentum_bias)]
    ours.weight.grad[0, 0] = float("inf")   # an fp16 step the scaler skips: nothing moves
    nesterov_step(ours, cfg)
    after = (ours.weight, ours.bias, ours.momentum_weight, ours.momentum_bias)
    assert all(torch.equal(old, new) for old, new in zip(before, after, strict=True))


def test_the_evaluated_head_is_the_standard_one_until_the_switch() -> None:
    algorithm = CoSSL(CoSSLConfig(), algorithm_context([4, 1], 10))
    model = create_model("small_cnn", 2, 1, bn_momentum=0.001)
    for name, head in algorithm.build_heads(model.feature_dim, 2).items():
        model.add_head(name, head)
    with torch.no_grad():
        model.heads[TEACHER_HEAD].weight.normal_()
    model.eval()
    images = torch.randn(3, 1, 8, 8)
    out = model(images)
    assert torch.equal(out[EVAL_HEAD], out["logits"]) and not torch.equal(out[TEACHER_HEAD], out["logits"])
    model.heads[EVAL_HEAD].switched.fill_(1)
    out = model(images)
    assert torch.equal(out[EVAL_HEAD], out[TEACHER_HEAD])
    assert set(model.state_dict()) >= {f"heads.{EVAL_HEAD}.switched", f"heads.{TEACHER_HEAD}.momentum_weight"}


def test_config_refuses_out_of_range_values() -> None:
    for key, value in (("max_lam", 1.5), ("tfe_augment", "none"), ("pseudo_labels", "ema"), ("classifier_epochs", 0),
                       ("teacher_momentum", 1.0), ("warmup", -1)):
        with pytest.raises(ValueError, match=f"algorithm.{key}"):
            CoSSLConfig(**{key: value}).validate()
    with pytest.raises(ValueError, match="labeled image of every class"):
        CoSSL(CoSSLConfig(), algorithm_context([4, 0], 10))


# ----- the engine's hooks: a one-off dataset pass, a second optimiser step, a class-balanced labeled batch -------

class HookRecorder(FixMatch):
    """FixMatch that asks for dataset passes at the start of steps 2 and 4, a class-balanced strong labeled
    batch, and records what the engine hands it."""

    def dataset_pass_steps(self) -> tuple[int, ...]:
        return (2, 4)

    def after_dataset_pass(self, outputs: DatasetPass, model: nn.Module, teacher: nn.Module, step: int) -> None:
        self.passes.append((step, outputs, torch.is_grad_enabled(), model, teacher))

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.optimizer_steps.append((step, model.heads["logits"].weight.grad.clone()))

    def balanced_labeled_batch(self) -> str | None:
        return "strong"


def recorder_replica() -> tuple[Any, Trainer, Any]:
    """A replica of the quick start whose algorithm is a HookRecorder, built as a run builds it."""
    cfg = validate(compose_config(["experiment=quickstart", "train.batch_size=8", "train.mu=2", "train.num_threads=1",
                                   "train.eval_batch_size=100"]))
    data, cpu = build_data(cfg.dataset), torch.device("cpu")
    configured = build_algorithm(cfg, data, cpu)
    recorder = HookRecorder(configured.cfg, configured.context)
    recorder.passes, recorder.optimizer_steps = [], []
    replica = build_replica(0, cfg, data, recorder, build_initial_model(cfg, data, recorder, cpu), cpu)
    return replica, Trainer(cfg.train, cpu), data


def by_hand(model: nn.Module, images: torch.Tensor, stream: Any) -> dict[str, torch.Tensor]:
    """The model in eval mode on (x / 255 - mean) / std of every image, in one forward."""
    mean, std = (torch.tensor(values).view(1, -1, 1, 1) for values in (stream.mean, stream.std))
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model((images.float() / 255 - mean) / std)
    model.train(training)
    return out


def test_a_dataset_pass_hands_the_teacher_over_both_sets_at_the_start_of_its_step() -> None:
    replica, trainer, data = recorder_replica()
    recorder = replica.algorithm
    assert replica.stream.balanced == "strong"   # the builder asked the stream for the algorithm's batch
    for step in range(5):
        if step == 2:   # what the teacher gives after step 1, before step 2 changes anything
            expected_labeled = by_hand(replica.teacher.module, data.labeled_images, replica.stream)
            expected_unlabeled = by_hand(replica.teacher.module, data.unlabeled_images, replica.stream)
        trainer.step(replica, step)
    assert [step for step, *_ in recorder.passes] == [2, 4]
    step, outputs, grad_enabled, model, teacher = recorder.passes[0]
    assert grad_enabled and model is replica.model and teacher is replica.teacher.module
    assert outputs.labeled["features"].shape == (len(data.labeled_images), model.feature_dim)
    torch.testing.assert_close(outputs.labeled["logits"], expected_labeled["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs.labeled["features"], expected_labeled["features"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs.unlabeled["logits"], expected_unlabeled["logits"], rtol=1e-4, atol=1e-4)
    assert outputs.labeled_targets.device.type == "cpu" and torch.equal(outputs.labeled_targets, data.labeled_targets)
    assert not torch.equal(recorder.passes[1][1].labeled["logits"], outputs.labeled["logits"])
    # The second optimiser's hook after every step, with that step's gradients still in place.
    assert [step for step, _ in recorder.optimizer_steps] == [0, 1, 2, 3, 4]
    assert all(torch.count_nonzero(grad) > 0 for _, grad in recorder.optimizer_steps)


def stream(data: Any, balanced: str | None, shard: tuple[int, int] = (0, 1)) -> Any:
    return data.make_stream(batch_size=8, mu=2, num_strong=1, seed=4, balanced=balanced, shard=shard)


def test_the_balanced_batch_is_class_balanced_and_leaves_every_other_draw_unchanged() -> None:
    data = build_data(validate(compose_config(["experiment=quickstart"])).dataset)
    plain, balanced = stream(data, None), stream(data, "strong")
    classes = []
    for _ in range(150):
        without, with_balanced = next(plain), next(balanced)
        for key in ("x", "y", "u_weak", "u_index"):
            assert torch.equal(without[key], with_balanced[key]), key
        assert torch.equal(without["u_strong"][0], with_balanced["u_strong"][0])
        assert "x_balanced" not in without and with_balanced["x_balanced"].shape == without["x"].shape
        classes.append(with_balanced["y_balanced"])
    counts = torch.bincount(torch.cat(classes), minlength=data.num_classes).double()
    # 1,200 draws over 10 classes whose labeled counts run from 40 to 4: each class near 120 (uniform sampling
    # would give the head class about 25% and the tail 2.5%).
    assert float(counts.min()) > 80 and float(counts.max()) < 160, counts.tolist()
    # A resume continues the same balanced draws; two data-parallel shards are the whole batch's halves.
    resumed = stream(data, "strong")
    resumed.load_state_dict(balanced.state_dict())
    halves = [stream(data, "strong", (rank, 2)) for rank in (0, 1)]
    for half in halves:
        half.load_state_dict(balanced.state_dict())
    for _ in range(3):
        whole = next(balanced)
        assert torch.equal(next(resumed)["x_balanced"], whole["x_balanced"])
        parts = [next(half) for half in halves]
        assert torch.equal(torch.cat([part["x_balanced"] for part in parts]), whole["x_balanced"])
        assert torch.equal(torch.cat([part["y_balanced"] for part in parts]), whole["y_balanced"])
    with pytest.raises(ValueError, match="balanced='medium'"):
        stream(data, "medium")


# ----- the warm-up in a real run ---------------------------------------------------------------------------------

QUICK = ["experiment=quickstart", "algorithm=cossl", "train.batch_size=8", "train.mu=2", "train.num_threads=1",
         "algorithm.threshold=0.5", "algorithm.warmup=3", "algorithm.classifier_epochs=2",
         "algorithm.classifier_epoch_steps=10", "algorithm.classifier_batch_size=16"]


def cossl_replica(overrides: list[str]) -> tuple[Any, Trainer]:
    cfg = validate(compose_config(overrides))
    single = Communicator()
    (replica,), _, _ = build_replicas(cfg, build_data(cfg.dataset), torch.device("cpu"),
                                      ProcessLayout(single, single, single))
    return replica, Trainer(cfg.train, torch.device("cpu"))


def test_the_classifier_warm_up_writes_both_teacher_classifiers_and_switches_the_evaluated_head() -> None:
    replica, trainer = cossl_replica(QUICK)
    heads = [module.heads for module in (replica.model, replica.teacher.module)]
    for step in range(3):
        trainer.step(replica, step)
    for head in heads:   # zero-initialised, untouched by either optimiser during the warm-up
        assert torch.count_nonzero(head[TEACHER_HEAD].weight) == 0 and int(head[EVAL_HEAD].switched) == 0
    assert torch.count_nonzero(replica.optimizer.state[heads[0][TEACHER_HEAD].weight]["momentum_buffer"]) == 0
    teacher_before = copy.deepcopy(replica.teacher.module)
    trainer.step(replica, 3)   # the warm-up at its start, then a co-learning step
    assert all(int(head[EVAL_HEAD].switched) == 1 for head in heads)
    assert torch.count_nonzero(heads[0][TEACHER_HEAD].momentum_weight) > 0
    # The student's classifier is the warm-up's trained one after a co-learning step; the EMA teacher's is what the
    # warm-up's EMA left, moved by the step's EMA update toward the student's.
    algorithm, stream = replica.algorithm, replica.stream
    labeled = trainer.predict(teacher_before, stream.labeled_batches(trainer.cfg.eval_batch_size))["features"]
    unlabeled = trainer.predict_unlabeled(teacher_before, stream)["features"]
    draws = warmup_draws(algorithm.key, 3, algorithm.context.labeled_counts, labeled.shape[1], algorithm.cfg)
    features, targets = enhanced_features(labeled, stream.labeled_classes_on_host(), unlabeled, draws, 10)
    _, _, average_weight, _ = train_classifier(features, targets, draws, algorithm.cfg)
    student_weight = heads[0][TEACHER_HEAD].weight.detach()
    assert torch.equal(heads[1][TEACHER_HEAD].weight, torch.lerp(average_weight, student_weight, 1 - 0.999))


def test_co_learning_steps_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(CoSSL, CoSSLConfig(warmup=2))
    batch = meta_batch(1) | {"x_balanced": torch.empty(8, 3, 32, 32, device=META),
                             "y_balanced": torch.empty(8, dtype=torch.long, device=META)}
    for step in (1, 2, 3):
        with SyncAudit(META, tolerate=True) as audit:
            outputs = algorithm.losses(batch, model, teacher, step)
            outputs["loss"].backward()
            algorithm.after_optimizer_step(model, step)
        assert (audit.syncs, audit.copies_to_device) == ([], []), step
        assert all(value.device == META for value in outputs.values())


# ----- whole runs ------------------------------------------------------------------------------------------------

RUN = ["experiment=quickstart", "algorithm=cossl", "train.iterations=24", "train.batch_size=8", "train.mu=2",
       "train.eval_every=6", "train.log_every=6", "train.num_threads=1", "algorithm.threshold=0.5",
       "algorithm.warmup=12", "algorithm.classifier_epochs=2", "algorithm.classifier_epoch_steps=10",
       "algorithm.classifier_batch_size=16", "imwa.k=2", "imwa.episodes=2"]


def switched(run_dir: Path, replica: int) -> int:
    state = read_checkpoint(run_dir / "checkpoints" / "latest.pt")["replicas"][replica]
    return int(state["model"][f"heads.{EVAL_HEAD}.switched"])


@pytest.mark.slow
def test_runs_stopped_before_at_and_after_the_warm_up_end_resume_bitwise(tmp_path: Path) -> None:
    # The classifier warm-up runs at the start of step 12, right after the episode's merge (step 12's checkpoint);
    # stopped at 8 (before), 12 (the checkpoint before the warm-up: the resume runs it) and 18 (replica 0 after its
    # warm-up, replica 1, trained after it in the episode, still before its own).
    full = train_run(tmp_path, RUN, "full")
    for stop_at, switched_at_stop in ((8, (0, 0)), (12, (0, 0)), (18, (1, 0))):
        name = f"stopped_{stop_at}"
        stopped = train_run(tmp_path, [*RUN, f"train.stop_at={stop_at}", "train.checkpoint_every=1"], name)
        assert (switched(stopped, 0), switched(stopped, 1)) == switched_at_stop
        train_run(tmp_path, [*RUN, "resume=true"], name)
        assert_same_run(full, stopped, f"stopped at {stop_at}")
    assert switched(full, 0) == 1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["average", "keep", "reset"])
def test_the_second_optimisers_momentum_follows_imwa_momentum(tmp_path: Path, policy: str) -> None:
    """The teacher classifier's momentum (built from the warm-up's end at step 12 to the last merge at 24)
    merges as `imwa.momentum` says, like the main optimiser's; the weights merge whatever it says."""
    run_dir = train_run(tmp_path, [*RUN, f"imwa.momentum={policy}"])
    replicas = [replica["model"] for replica in read_checkpoint(run_dir / "checkpoints" / "latest.pt")["replicas"]]
    momentum = [f"heads.{TEACHER_HEAD}.momentum_weight", f"heads.{TEACHER_HEAD}.momentum_bias"]
    for key in replicas[0].keys() - set(momentum):
        assert torch.equal(replicas[0][key], replicas[1][key]), key
    for key in momentum:
        first, second = replicas[0][key], replicas[1][key]
        if policy == "reset":
            assert not first.any() and not second.any(), key
        else:
            assert first.any() and second.any(), key
            assert torch.equal(first, second) == (policy == "average"), key


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=cossl", "train.num_threads=1",
                                   "algorithm.warmup=0.5", "algorithm.classifier_epoch_steps=200"])
    assert read_results(run_dir)["final"]["top1"] > 0.5   # 10 classes: chance is 0.1


DATA_PARALLEL = ["experiment=quickstart", "algorithm=cossl", "train.iterations=8", "train.eval_every=8",
                 "train.log_every=4", "train.batch_size=16", "train.mu=2", "train.num_threads=1", "train.lr=0.01",
                 "algorithm.threshold=0.5", "algorithm.warmup=4", "algorithm.classifier_epochs=1",
                 "algorithm.classifier_epoch_steps=20", "algorithm.classifier_batch_size=16",
                 "model.sync_batchnorm=true", "imwa.timeout_s=120"]


def relative_distance(left: torch.Tensor, right: torch.Tensor) -> float:
    return float((left.double() - right.double()).norm() / left.double().norm())


@pytest.mark.slow
def test_two_processes_per_replica_train_what_one_does(tmp_path: Path) -> None:
    """imwa.data_parallel=2 against 1: the warm-up (every process runs it, rank 0's result broadcast) and four
    co-learning steps whose slices pair each labeled row with the unlabeled row one process pairs it with and
    keep their rows of the step's draws. Measured: relative distances 1e-8 to 2e-7 (summation order); a planted
    pairing of each slice's first unlabeled rows moves the teacher classifier's momentum by 3e-2."""
    two = tmp_path / "d2"
    launch_jobs(2, [[*DATA_PARALLEL, "imwa.data_parallel=2", f"run_dir={two}"]])
    one = train_run(tmp_path, [*DATA_PARALLEL, "imwa.data_parallel=1"], "d1")
    states = [read_checkpoint(run_dir / "checkpoints" / "latest.pt")["replicas"][0] for run_dir in (one, two)]
    for part in ("model", "teacher"):
        for name in (f"heads.{TEACHER_HEAD}.weight", f"heads.{TEACHER_HEAD}.momentum_weight", "heads.logits.weight"):
            distance = relative_distance(states[0][part][name], states[1][part][name])
            assert distance < 1e-5, f"{part} {name}: relative distance {distance:.2e}"
        assert int(states[1][part][f"heads.{EVAL_HEAD}.switched"]) == 1
