"""CDMAD against the official code (LeeHyuck/CDMAD, `fixmatchcdmad.py`), re-implemented line by line in a
test-only oracle and fed the same model and tensors: the bias measurement, the BN statistics it moves, the
debiased targets and mask, the losses and (without BN) the gradients; planted faults that the comparison
catches; the evaluation hook (test-time refinement) by hand and through a real run, `ssl_imwa.evaluate`
and `load_run`; no host syncs; learning and determinism."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import Algorithm
from ssl_imwa.algorithms.cdmad import CDMAD, CDMADConfig
from ssl_imwa.algorithms.common import masked_consistency
from ssl_imwa.algorithms.fixmatch import FixMatch
from ssl_imwa.data.transforms import normalize
from ssl_imwa.evaluator import Evaluator
from ssl_imwa.metrics import class_groups, classification_metrics
from ssl_imwa.models import Classifier, create_model
from tests.test_fixmatch import audit_steps, meta_setup
from tests.utils import algorithm_context, assert_same_run, read_results, train_run

NUM_CLASSES = 5
LABELED, UNLABELED = 4, 8                      # B and U = 2B (official --unlabeledratio 2)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)        # official dataset/fix_cifar10.py lines 11-12
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
# The official epochs, shrunk: 2 steps each, debiased from epoch 2 (`epoch > 1`), i.e. from step 4.
VAL_ITERATION, DEBIASSTART = 2, 1
DEBIAS_START_STEP = (DEBIASSTART + 1) * VAL_ITERATION
# Official SemiLoss takes log(softmax + 1e-8) where we take log_softmax: |log(p + e) - log(p)| <= e / p per
# entry (`eps_bound`), plus float32 rounding of a 5-class softmax, a log and a mean over <= 16 rows: ROUNDING,
# relative to 1 + the loss (observed: at most 4.8e-7 in all, on losses of 1.2 to 2.5, i.e. about 2 ulps).
OFFICIAL_EPS, ROUNDING = 1e-8, 2e-6
# Keeps 5 of the 8 debiased weak views of `make_batch` on `bn_model` (confidences 0.227..0.331), all 8 undebiased.
MASK_THRESHOLD = 0.28


# ----- the oracle: the official code, line by line (CUDA transfers, meters and progress bar left out) --------

class OfficialArgs(NamedTuple):
    """The official argparse defaults the step reads (fixmatchcdmad.py lines 55, 62, 63)."""

    tau: float = 0.0
    unlabeledratio: float = 2
    debiasstart: int = 100


class OfficialInterface(nn.Module):
    """Our model behind the official network's interface: `(c, r)`, `c` squeezed for a batch of one as the
    official `c = self.output(f.squeeze())` gives it (wrn.py line 99). Only the shapes change."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        c = self.model(x)["logits"]
        return (c.squeeze(0) if c.shape[0] == 1 else c), 0


def official_semi_loss(outputs_x: torch.Tensor, targets_x: torch.Tensor, outputs_u: torch.Tensor,
                       targets_u: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`SemiLoss.__call__` (lines 409-413)."""
    Lx = -torch.mean(torch.sum(torch.log(F.softmax(outputs_x, dim=1) + 1e-8) * targets_x, dim=1))
    Lu = -torch.mean(torch.sum(torch.log(F.softmax(outputs_u, dim=1) + 1e-8) * targets_u, dim=1) * mask)
    return Lx, Lu


def official_train_step(model: nn.Module, inputs_x: torch.Tensor, targets_x: torch.Tensor, inputs_u: torch.Tensor,
                        inputs_u2: torch.Tensor, inputs_u3: torch.Tensor, epoch: int, args: OfficialArgs,
                        num_class: int) -> dict[str, torch.Tensor]:
    """One iteration of the official `train` (lines 224-259) on the official interface of `model`."""
    batch_size = inputs_x.size(0)
    targets_x2 = torch.zeros(batch_size, num_class).scatter_(1, targets_x.view(-1, 1), 1)
    with torch.no_grad():
        white = torch.ones((1, 3, 32, 32))
        biaseddegree, _ = model(white)
        outputs_u, _ = model(inputs_u)
        if epoch > args.debiasstart:
            outputs_u = outputs_u - biaseddegree.detach()
        targets_u2 = F.softmax(outputs_u, dim=1).detach()   # official F.softmax(outputs_u): dim 1 for a 2-D input
    max_p, p_hat = torch.max(targets_u2, dim=1)
    p_hat = torch.zeros(int(args.unlabeledratio * batch_size), num_class).scatter_(1, p_hat.view(-1, 1), 1)
    select_mask = max_p.ge(args.tau)
    select_mask = torch.cat([select_mask, select_mask], 0).float()
    all_targets = torch.cat([targets_x2, targets_u2, targets_u2], dim=0)
    logits_x, _ = model(inputs_x)
    logits_u2, _ = model(inputs_u2)
    logits_u3, _ = model(inputs_u3)
    logits_u = torch.cat([logits_u2, logits_u3], dim=0)
    Lx, Lu = official_semi_loss(logits_x, all_targets[:batch_size], logits_u, all_targets[batch_size:], select_mask)
    loss = Lx + Lu
    return {"biaseddegree": biaseddegree, "targets_x2": targets_x2, "targets_u2": targets_u2,
            "select_mask": select_mask, "Lx": Lx, "Lu": Lu, "loss": loss}


def official_test_predictions(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official `validate` (lines 302-328): predictions without and with the test-time debiasing."""
    model.eval()
    with torch.no_grad():
        white = torch.ones(1, 3, 32, 32)
        biaseddegree, _ = model(white)
        outputs, _ = model(inputs)
        outputs2 = outputs - biaseddegree
        score = F.softmax(outputs, dim=1)
        score2 = F.softmax(outputs2, dim=1)
        prediction = torch.argmax(score, dim=1)
        prediction2 = torch.argmax(score2, dim=1)
    return prediction, prediction2


# ----- running both sides on the same model and tensors -------------------------------------------------

class ForwardRecorder:
    """Each forward of a model: its input, its logits and every buffer (BN statistics) right after it."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = model.register_forward_hook(self.record)

    def record(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: dict[str, torch.Tensor]) -> None:
        self.calls.append({"input": args[0].detach().clone(), "logits": output["logits"].detach().clone(),
                           "buffers": {name: value.clone() for name, value in module.named_buffers()}})

    def call(self, index: int) -> dict[str, Any]:
        return self.calls[index] if index < len(self.calls) else {"input": None, "logits": None, "buffers": {}}


def spy_on_targets(algorithm: CDMAD) -> dict[str, torch.Tensor]:
    """What `pseudo_targets` is given and returns inside `losses` (the method is called through unchanged)."""
    record: dict[str, torch.Tensor] = {}
    original = algorithm.pseudo_targets

    def recording(weak_logits: torch.Tensor, bias: torch.Tensor, step: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        result = original(weak_logits, bias, step)
        record.update(weak=weak_logits.clone(), bias=bias.clone(), targets=result[0].clone(), mask=result[2].clone())
        return result

    algorithm.pseudo_targets = recording   # type: ignore[method-assign]
    return record


def bn_model(seed: int = 0) -> nn.Module:
    """The small CNN with BN (momentum 0.1, the recipe's), a head bias toward class 0, a head weight scaled up
    (so that MASK_THRESHOLD splits the debiased confidences) and running statistics already moved, in train mode."""
    torch.manual_seed(seed)
    model = create_model("small_cnn", NUM_CLASSES, 3, bn_momentum=0.1)
    with torch.no_grad():
        model.heads["logits"].bias.copy_(torch.linspace(1.5, -1.5, NUM_CLASSES))
        model.heads["logits"].weight.mul_(8.0)
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.train()


class PerImageBackbone(nn.Module):
    """No BN: an image's features never depend on the rest of its batch, so the official one-forward-per-view
    and our joint forward compute the same logits (up to rounding)."""

    feature_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.feature_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), 0.1).mean(dim=(2, 3))


def bn_free_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Classifier(PerImageBackbone(), NUM_CLASSES)
    with torch.no_grad():
        model.heads["logits"].bias.copy_(torch.linspace(1.5, -1.5, NUM_CLASSES))
    return model.train()


def make_batch(seed: int = 1) -> dict[str, Any]:
    """Normalised images as the stream yields them (CIFAR-shaped: the official solid image is 3x32x32)."""
    generator = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randn(n, 3, 32, 32, generator=generator)
    return {"x": images(LABELED), "y": torch.randint(0, NUM_CLASSES, (LABELED,), generator=generator),
            "u_weak": images(UNLABELED), "u_strong": [images(UNLABELED), images(UNLABELED)],
            "u_index": torch.arange(UNLABELED), "u_is_labeled": torch.zeros(UNLABELED, dtype=torch.bool),
            "u_target": torch.randint(0, NUM_CLASSES, (UNLABELED,), generator=generator)}


def run_ours(algorithm_cls: type[CDMAD], model: nn.Module, batch: dict[str, Any], step: int, threshold: float
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], ForwardRecorder]:
    config = CDMADConfig(threshold=threshold, debias_start=DEBIAS_START_STEP)
    algorithm = algorithm_cls(config, algorithm_context([9, 5, 3, 2, 1], 100))
    record = spy_on_targets(algorithm)
    recorder = ForwardRecorder(model)
    outputs = algorithm.losses(batch, model, copy.deepcopy(model), step)
    recorder.handle.remove()
    return outputs, record, recorder


def run_official(model: nn.Module, batch: dict[str, Any], step: int, threshold: float
                 ) -> tuple[dict[str, torch.Tensor], ForwardRecorder]:
    recorder = ForwardRecorder(model)
    strong1, strong2 = batch["u_strong"]
    result = official_train_step(OfficialInterface(model), batch["x"], batch["y"], batch["u_weak"], strong1, strong2,
                                 step // VAL_ITERATION, OfficialArgs(tau=threshold, debiasstart=DEBIASSTART),
                                 NUM_CLASSES)
    recorder.handle.remove()
    return result, recorder


def eps_bound(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """Upper bound of |official SemiLoss term - cross-entropy| from the official `+ 1e-8` inside the log."""
    return float((OFFICIAL_EPS * (targets / torch.softmax(logits.double(), dim=1)).sum(dim=1) * mask).mean())


def within(ours: torch.Tensor, official: torch.Tensor, bound: float) -> bool:
    ours, official = float(ours.detach()), float(official.detach())
    return abs(ours - official) <= bound + ROUNDING * (1.0 + abs(official))


def same(left: torch.Tensor | None, right: torch.Tensor | None) -> bool:
    return left is not None and right is not None and left.shape == right.shape and torch.equal(left, right)


def same_buffers(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return bool(left) and left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def differential_check(algorithm_cls: type[CDMAD], step: int, threshold: float) -> dict[str, bool]:
    """Every quantity of one step, ours against the official code's, from one model (with BN) and one batch:
    True where they agree (bitwise, or within the bound of the official `+ 1e-8` for the losses).

    Our labeled and strong views share one forward (the official code: one each), so their logits differ
    through BN's batch statistics: the official loss lines are fed our logits, with the official targets.
    """
    model, batch = bn_model(), make_batch()
    ours, record, our_forwards = run_ours(algorithm_cls, copy.deepcopy(model), batch, step, threshold)
    official, official_forwards = run_official(copy.deepcopy(model), batch, step, threshold)
    solid, weak = (our_forwards.call(0), official_forwards.call(0)), (our_forwards.call(1), official_forwards.call(1))
    labeled, strong1, strong2 = our_forwards.calls[-1]["logits"].split([LABELED, UNLABELED, UNLABELED])
    strong, targets_u = torch.cat([strong1, strong2]), torch.cat([official["targets_u2"]] * 2)
    mask = official["select_mask"]
    Lx, Lu = official_semi_loss(labeled, official["targets_x2"], strong, targets_u, mask)
    bound_x = eps_bound(labeled, official["targets_x2"], torch.ones(LABELED))
    bound_u = eps_bound(strong, targets_u, mask)
    return {
        "solid image": same(solid[0]["input"], solid[1]["input"]),
        "bias": same(record.get("bias"), official["biaseddegree"]),
        "BN after the solid image": same_buffers(solid[0]["buffers"], solid[1]["buffers"]),
        "weak logits": same(record.get("weak"), weak[1]["logits"]),
        "BN after the weak view": same_buffers(weak[0]["buffers"], weak[1]["buffers"]),
        "targets": same(record.get("targets"), official["targets_u2"]),
        "mask": same(record.get("mask"), mask[:UNLABELED]),
        "mask_rate": same(ours["mask_rate"], mask.mean()),
        "loss_x": within(ours["loss_x"], Lx, bound_x),
        "loss_u": within(ours["loss_u"], Lu, bound_u),
        "loss": within(ours["loss"], Lx + Lu, bound_x + bound_u),
    }


def mismatches(algorithm_cls: type[CDMAD], step: int, threshold: float = MASK_THRESHOLD) -> list[str]:
    return [name for name, agrees in differential_check(algorithm_cls, step, threshold).items() if not agrees]


# ----- (a) the differential check ------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.0, MASK_THRESHOLD])   # the official default; one that masks some
@pytest.mark.parametrize("step", [DEBIAS_START_STEP - 1, DEBIAS_START_STEP, DEBIAS_START_STEP + 3])
def test_every_quantity_matches_the_official_step(step: int, threshold: float) -> None:
    assert mismatches(CDMAD, step, threshold) == []


def test_the_check_has_something_to_compare() -> None:
    """The debiasing changes the targets and some labels, and MASK_THRESHOLD masks some debiased images but
    not all: otherwise a fault in them could go unseen."""
    model, batch = bn_model(), make_batch()
    debiased, _ = run_official(copy.deepcopy(model), batch, DEBIAS_START_STEP, MASK_THRESHOLD)
    plain, _ = run_official(copy.deepcopy(model), batch, DEBIAS_START_STEP - 1, MASK_THRESHOLD)
    assert not torch.equal(debiased["targets_u2"].argmax(dim=1), plain["targets_u2"].argmax(dim=1))
    assert 0.0 < float(debiased["select_mask"].mean()) < 1.0
    assert float(debiased["biaseddegree"].max() - debiased["biaseddegree"].min()) > 0.5


def test_without_batchnorm_the_whole_official_step_matches_with_its_own_forwards_and_gradients() -> None:
    """The oracle runs every forward itself (one per view, as official) and is differentiated: losses and
    every parameter's gradient agree with ours to the bound of the official `+ 1e-8` plus float32 rounding."""
    model, batch = bn_free_model(), make_batch()
    ours_model, official_model = copy.deepcopy(model), copy.deepcopy(model)
    ours, _, _ = run_ours(CDMAD, ours_model, batch, DEBIAS_START_STEP, MASK_THRESHOLD)
    official, _ = run_official(official_model, batch, DEBIAS_START_STEP, MASK_THRESHOLD)
    torch.testing.assert_close(ours["loss_x"], official["Lx"].detach(), rtol=ROUNDING, atol=1e-6)
    torch.testing.assert_close(ours["loss_u"], official["Lu"].detach(), rtol=ROUNDING, atol=1e-6)
    ours["loss"].backward()
    official["loss"].backward()
    for (name, mine), theirs in zip(ours_model.named_parameters(), official_model.parameters(), strict=True):
        # d log(p + e) = (p / (p + e)) d log p: relative 1e-8 / p, far below the tolerance. The absolute
        # part scales with the tensor's gradient: a bias's is a sum over every position, whose order
        # (one joint forward against one per view, and the thread count's reduction) moves it by up to
        # 5e-5 of the largest entry with 2 threads (cancellation over the positions).
        scale = theirs.grad.abs().max().item()
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-4 * scale, msg=name)


def test_debias_start_is_the_official_epoch_100_of_500_step_epochs() -> None:
    algorithm = CDMAD(CDMADConfig(), algorithm_context([9, 1], 250_000))
    assert algorithm.debias_start == 50_500
    for step in (50_499, 50_500):   # official: epoch = step // 500, debiased when epoch > 100
        assert (step // 500 > 100) == (step >= algorithm.debias_start)


# ----- (b) planted faults, each caught by the comparison -------------------------------------------------

class BiasInEvalMode(CDMAD):
    """Fault: the solid image through the model in eval mode (running statistics used, none updated)."""

    def measure_bias(self, model: nn.Module, like: torch.Tensor) -> torch.Tensor:
        model.eval()
        try:
            return super().measure_bias(model, like)
        finally:
            model.train()


class BiasOfNormalisedWhite(CDMAD):
    """Fault: a white *pixel* image normalised by the CIFAR-10 statistics, not the official ones after normalisation."""

    def measure_bias(self, model: nn.Module, like: torch.Tensor) -> torch.Tensor:
        white = torch.tensor([(1 - m) / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)])
        with torch.no_grad():
            return model(white.view(1, 3, 1, 1).expand_as(like[:1]).contiguous())["logits"][0]


class BiasAdded(CDMAD):
    """Fault: the bias added to the weak logits instead of subtracted."""

    def pseudo_targets(self, weak_logits: torch.Tensor, bias: torch.Tensor, step: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().pseudo_targets(weak_logits, -bias, step)


class DebiasedOneStepLate(CDMAD):
    """Fault: `step > debias_start`, the official `epoch > debiasstart` carried over to steps."""

    def pseudo_targets(self, weak_logits: torch.Tensor, bias: torch.Tensor, step: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return super().pseudo_targets(weak_logits, bias, step - 1)


class NoSolidImageBeforeDebiasing(CDMAD):
    """Fault: the solid image skipped while its logits are unused (it still moves BN's running statistics)."""

    def losses(self, batch: dict[str, Any], model: nn.Module, teacher: nn.Module, step: int
               ) -> dict[str, torch.Tensor]:
        self.skip_bias = step < self.debias_start
        return super().losses(batch, model, teacher, step)

    def measure_bias(self, model: nn.Module, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(self.num_classes) if self.skip_bias else super().measure_bias(model, like)


@pytest.mark.parametrize("fault, step, caught", [
    (BiasInEvalMode, DEBIAS_START_STEP, {"bias", "BN after the solid image", "targets", "loss_u"}),
    # Not yet debiased: the targets do not see it, the running statistics do (train-mode forwards do not read them).
    (BiasInEvalMode, DEBIAS_START_STEP - 1, {"bias", "BN after the solid image", "BN after the weak view"}),
    (BiasOfNormalisedWhite, DEBIAS_START_STEP, {"solid image", "bias", "targets", "loss_u"}),
    (BiasAdded, DEBIAS_START_STEP, {"targets", "mask", "loss_u"}),
    (DebiasedOneStepLate, DEBIAS_START_STEP, {"targets", "loss_u"}),
    (NoSolidImageBeforeDebiasing, DEBIAS_START_STEP - 1, {"solid image", "BN after the solid image",
                                                           "BN after the weak view"}),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_a_planted_fault_is_caught(fault: type[CDMAD], step: int, caught: set[str]) -> None:
    assert caught <= set(mismatches(fault, step))


# ----- (c) evaluation applies the refinement -------------------------------------------------------------

class NoTestRefinement(CDMAD):
    """Fault: the bias subtracted during training only."""

    @classmethod
    def eval_logit_offset(cls, model: nn.Module, inputs: torch.Tensor) -> None:
        return None


class EvalBiasInTrainMode(CDMAD):
    """Fault: the test-time bias measured in train mode (batch statistics of the one image)."""

    @classmethod
    def eval_logit_offset(cls, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        model.train()
        try:
            return super().eval_logit_offset(model, inputs)
        finally:
            model.eval()


def labeled_test_images(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 CIFAR-shaped images, each a random colour with noise (on `bn_model` pure noise gets one class)."""
    generator = torch.Generator().manual_seed(2)
    colours = torch.randint(0, 256, (count, 3, 1, 1), generator=generator)
    noise = torch.randint(-40, 40, (count, 3, 32, 32), generator=generator)
    return ((colours + noise).clamp(0, 255).to(torch.uint8),
            torch.randint(0, NUM_CLASSES, (count,), generator=generator))


def evaluate_with(algorithm_cls: type[Algorithm], model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                  ) -> dict[str, Any]:
    evaluator = Evaluator({"test": (images, targets)}, NUM_CLASSES, [9, 5, 3, 2, 1], list(CIFAR10_MEAN),
                          list(CIFAR10_STD), algorithm_cls.eval_head, 256, torch.device("cpu"), False,
                          logit_offset=algorithm_cls.eval_logit_offset)
    return evaluator.evaluate(model, "test")


def official_metrics(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict, dict]:
    """Metrics of the official predictions without and with the test-time debiasing. (The official argmax
    of the softmax equals ours of the logits unless rounding makes a tie: none on these images.)"""
    raw, debiased = official_test_predictions(OfficialInterface(model),
                                              normalize(images, CIFAR10_MEAN, CIFAR10_STD))
    return tuple(classification_metrics(p, targets, NUM_CLASSES, {}) for p in (raw, debiased))


def without_groups(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key in ("top1", "confusion")}


def test_evaluation_gives_the_official_debiased_predictions() -> None:
    model, (images, targets) = bn_model(), labeled_test_images()
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    raw, debiased = official_metrics(copy.deepcopy(model), images, targets)
    assert raw["confusion"] != debiased["confusion"]   # the refinement changes predictions here
    assert without_groups(evaluate_with(CDMAD, model, images, targets)) == without_groups(debiased)
    assert model.training and all(torch.equal(value, buffers[name]) for name, value in model.named_buffers())


@pytest.mark.parametrize("fault", [NoTestRefinement, EvalBiasInTrainMode], ids=lambda cls: cls.__name__)
def test_a_planted_evaluation_fault_is_caught(fault: type[CDMAD]) -> None:
    model, (images, targets) = bn_model(), labeled_test_images()
    _, debiased = official_metrics(copy.deepcopy(model), images, targets)
    assert without_groups(evaluate_with(fault, model, images, targets)) != without_groups(debiased)


class Shifted(FixMatch):
    """An algorithm whose evaluation subtracts a fixed offset: the hook on its own."""

    @classmethod
    def eval_logit_offset(cls, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        assert not model.training and not torch.is_grad_enabled() and inputs.shape == (1, 1, 2, 2)
        return torch.tensor([-2.0, 0.0, 1.0])


class MeanPixelLogits(nn.Module):
    """Logits (x, 2x + 1, 1 - x) of an image's mean normalised value x."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = x.mean(dim=(1, 2, 3))
        return {"logits": torch.stack([mean, 2 * mean + 1, 1 - mean], dim=1)}


def test_the_evaluator_subtracts_the_hook_s_offset_and_is_unchanged_without_one() -> None:
    # Pixels 0, 64, 128, 192, 255 normalise ((p / 255 - 0.5) / 0.25) to x = -2, -0.996, 0.008, 1.012, 2.
    # Logits (x, 2x + 1, 1 - x) predict 2, 2, 1 (0.008, 1.016, 0.992), 1, 1; minus (-2, 0, 1), i.e.
    # (x + 2, 2x + 1, -x): 2 (0, -3, 2), 0 (1.004, -0.992, 0.996), 0 (2.008, 1.016, -0.008), 1, 1.
    images = torch.tensor([0, 64, 128, 192, 255], dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    targets = torch.tensor([0, 1, 2, 0, 1])
    counts = [3, 2, 1]

    def evaluate(offset_of: Any) -> dict[str, Any]:
        return Evaluator({"test": (images, targets)}, 3, counts, [0.5], [0.25], "logits", 2, torch.device("cpu"),
                         False, logit_offset=offset_of).evaluate(MeanPixelLogits(), "test")

    def metrics_of(predicted: list[int]) -> dict[str, Any]:
        return classification_metrics(torch.tensor(predicted), targets, 3, class_groups(counts))

    assert evaluate(None) == metrics_of([2, 2, 1, 1, 1])
    assert evaluate(FixMatch.eval_logit_offset) == metrics_of([2, 2, 1, 1, 1])   # the default hook: no offset
    assert evaluate(Shifted.eval_logit_offset) == metrics_of([2, 0, 0, 1, 1])


# ----- the recipe's other options, the contract ------------------------------------------------------

def test_hard_targets_with_one_strong_view_are_fixmatch_on_the_debiased_argmax() -> None:
    model, batch = bn_free_model(), make_batch()
    config = CDMADConfig(threshold=0.0, soft_targets=False, strong_views=1, debias_start=0)
    algorithm = CDMAD(config, algorithm_context([9, 5, 3, 2, 1], 100))
    record, recorder = spy_on_targets(algorithm), ForwardRecorder(model)
    outputs = algorithm.losses(batch, model, model, step=0)
    _, strong = recorder.calls[-1]["logits"].split([LABELED, UNLABELED])
    labels = (record["weak"] - record["bias"]).argmax(dim=1)
    assert torch.equal(record["targets"], labels) and not torch.equal(labels, record["weak"].argmax(dim=1))
    torch.testing.assert_close(outputs["loss_u"], masked_consistency(strong, labels, torch.ones(UNLABELED)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("key, value", [("strong_views", 0), ("debias_start", -1), ("debias_start", 1.5),
                                        ("threshold", 1.5), ("lambda_u", -1.0)])
def test_out_of_range_values_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        CDMADConfig(**{key: value}).validate()


def test_there_is_no_state_to_checkpoint_or_merge() -> None:
    algorithm = CDMAD(CDMADConfig(), algorithm_context([9, 1], 100))
    assert dict(algorithm.state_dict()) == {} and algorithm.merge_states([{}, {}]) == {}


def test_steps_never_wait_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(CDMAD, CDMADConfig(debias_start=1))
    steps = [0, 1, 2]   # before and after the debiasing starts
    assert audit_steps(algorithm, model, teacher, steps) == {step: ([], [], []) for step in steps}


# ----- a real run: logged, re-evaluated and predicted with the refinement; learning; determinism ------------

SHORT = ["experiment=quickstart", "algorithm=cdmad", "train.iterations=20", "train.eval_every=10",
         "train.batch_size=16", "train.num_threads=1", "algorithm.debias_start=5"]


@pytest.fixture(scope="module")
def cdmad_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("cdmad"), SHORT)


def predictions_by_hand(model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float],
                        batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, refined) predictions of `model` in eval mode: argmax of the logits, and of the logits minus
    those of an input that is 1 everywhere (in batches of `batch_size`, as the evaluation forwards them)."""
    model.eval()
    plain, refined = [], []
    with torch.no_grad():
        bias = model(torch.ones(1, *images.shape[1:]))["logits"][0]
        for start in range(0, len(images), batch_size):
            logits = model(normalize(images[start:start + batch_size], mean, std))["logits"]
            plain.append(logits.argmax(dim=1))
            refined.append((logits - bias).argmax(dim=1))
    return torch.cat(plain), torch.cat(refined)


def test_the_run_logs_reevaluates_and_predicts_the_refined_predictions(cdmad_run: Path) -> None:
    from ssl_imwa.api import load_run
    from ssl_imwa.evaluate import evaluate_checkpoint

    final = read_results(cdmad_run)["final"]
    run = load_run(cdmad_run)
    images, targets = run.data.test_images, run.data.test_targets
    plain, refined = predictions_by_hand(run.teacher, images, run.data.mean, run.data.std,
                                         run.config.train.eval_batch_size)
    assert not torch.equal(plain, refined)   # the refinement changes predictions of this teacher
    assert (refined == targets).sum().item() / len(targets) == final["top1"]
    assert torch.equal(run.predict(images), refined)
    again = evaluate_checkpoint(cdmad_run)["logits"]
    for key in ("top1", "balanced_acc", "macro_f1", "per_class"):
        assert again[key] == final[key], key


@pytest.mark.slow
def test_a_run_is_deterministic(tmp_path: Path, cdmad_run: Path) -> None:
    assert_same_run(cdmad_run, train_run(tmp_path, SHORT))


@pytest.mark.slow
def test_quickstart_learns(tmp_path: Path) -> None:
    run_dir = train_run(tmp_path, ["experiment=quickstart", "algorithm=cdmad", "train.num_threads=1"])
    assert read_results(run_dir)["final"]["top1"] > 0.5   # 0.70 measured (10 classes: chance is 0.1)
