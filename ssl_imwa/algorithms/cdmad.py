"""CDMAD on FixMatch (Lee & Kim, CVPR 2024, "CDMAD: Class-Distribution-Mismatch-Aware Debiasing for
Class-Imbalanced Semi-Supervised Learning"; official code LeeHyuck/CDMAD, `fixmatchcdmad.py`).

A classifier trained on long-tailed data is biased toward its head classes, and its pseudo-labels carry
that bias into training. CDMAD measures the bias directly: the logits of an image without any pattern
(a solid-colour image, unrelated to every class) should be uniform for a neutral classifier, so whatever
they are is the classifier's bias toward each class. It works whatever the unlabeled set's (unknown,
possibly mismatched) class distribution is, since the measurement is taken from the classifier that
distribution shaped. Each step:

1. b = f(s): the student's logits of the solid image s, forwarded alone, in train mode, without autograd
   (so BN normalises s by its own statistics and updates its running statistics with them), before any view.
2. The weak view's logits are debiased, f(u_w) - b (from `debias_start` on); their softmax is the target of
   the strong views (soft, as official; `soft_targets=false`: FixMatch's argmax), masked by max >= t.
3. L = CE(f(x), y) + lambda_u mean over strong views and images of mask * CE(f(u_s), target).

At test time the evaluated model's own solid-image logits (eval mode) are subtracted from its test logits
before the argmax (the post-hoc refinement): `CDMAD.eval_logit_offset`, applied by the Evaluator.

The solid image is the official one: every entry 1 *after* normalisation (`torch.ones((1, 3, 32, 32))`
fed to the network as is), i.e. per channel the pixel value mean + std: on CIFAR-10 (0.739, 0.726, 0.708),
a light grey, not white; on any dataset the colour one standard deviation above its mean.

Deliberate differences from the official code (each also noted where it is implemented; docs/algorithms.md):
the labeled and strong views share one forward (official: one forward each); the losses use the
log-softmax (official: log(softmax + 1e-8)); SGD with coupled weight decay instead of Adam with the
decoupled decay of its WeightEMA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmContext,
    Batch,
    StepCount,
    forward_concat,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.common import USBFixMatchConfig, consistency_outputs
from ssl_imwa.ema import EMAConfig
from ssl_imwa.validation import expect_range

# Every entry of the solid image, in the model's (normalised) input space: the official
# `torch.ones((1, 3, 32, 32))` (fixmatchcdmad.py lines 232 and 312) goes to the network without
# normalisation. A class constant, not a config key: evaluation (a classmethod) must use the same image.
SOLID_INPUT_VALUE = 1.0


@dataclass
class CDMADConfig(USBFixMatchConfig):
    name: str = "cdmad"
    # Official `--tau` default 0 (fixmatchcdmad.py line 55; the README's command keeps it): every
    # unlabeled image counts. FixMatch's 0.95 is `algorithm.threshold=0.95`.
    threshold: float = 0.0
    # Official: the debiased softmax itself is the target (`all_targets = cat([.., targets_u2, targets_u2])`,
    # line 248; the one-hot `p_hat` of line 241 is unused). false: FixMatch's hard argmax label.
    soft_targets: bool = True
    # Official: two strong views per unlabeled image (`inputs_u2`, `inputs_u3`), L_u the mean over both
    # (lines 251-257). FixMatch: 1.
    strong_views: int = 2
    # *Steps* (int) or a fraction of the run (float) before the pseudo-labels are debiased. Official
    # `epoch > args.debiasstart` with debiasstart 100 and 500-step epochs: from step 101 * 500 = 50,500 of
    # 250,000, i.e. 0.202 of the run. The bias is measured (and BN updated by it) from step 0 either way.
    debias_start: StepCount = 0.202
    # Official: the weak view forwarded alone under no_grad (lines 231-234), so BN normalises it by its own
    # statistics, bitwise as official; the labeled and strong views then share one forward.
    weak_pass: str = "no_grad"
    # Official WeightEMA: decay 0.999 from the first step, over every state tensor (BN statistics included).
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999, warmup=False, buffers="ema"))

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.strong_views", self.strong_views, 1)
        resolve_steps(self.debias_start, 1, "algorithm.debias_start")


def solid_image_logits(model: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The logits ([C], float32) of the solid image shaped, typed and placed like one image of `like`.

    The bias measurement of CDMAD, without autograd (official: under `torch.no_grad()`). The model runs in
    whatever mode it is in: train mode during training (BN uses the one image's statistics and updates its
    running statistics, as official), eval mode at evaluation.
    """
    solid = torch.full_like(like[:1], SOLID_INPUT_VALUE)
    with torch.no_grad():
        (outputs,) = forward_concat(model, [solid])
    return outputs["logits"][0]


def debiased_targets(weak_logits: torch.Tensor, bias: torch.Tensor | None, threshold: float, soft: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets, argmax labels, float mask) from softmax(f(u_w) - b); no subtraction where `bias` is None.

    `targets` are the probabilities themselves (`soft`) or the argmax labels.
    """
    logits = weak_logits.detach() if bias is None else weak_logits.detach() - bias
    probs = torch.softmax(logits, dim=1)
    max_prob, labels = probs.max(dim=1)
    return (probs if soft else labels), labels, max_prob.ge(threshold).float()


def strong_consistency(strong_logits: list[torch.Tensor], targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over views and images of mask * CE(f(u_s), target): the official loss over the concatenated
    views (`logits_u = cat([logits_u2, logits_u3])`, the mask repeated), with soft or hard targets."""
    views = len(strong_logits)
    per_image = F.cross_entropy(torch.cat(strong_logits), torch.cat([targets] * views), reduction="none")
    return (per_image * torch.cat([mask] * views)).mean()


@register_algorithm("cdmad")
class CDMAD(Algorithm):
    """No state: the bias is measured again at every step and every evaluation. Nothing to checkpoint,
    merge or reduce under `imwa.data_parallel` (every process measures it with the same model).

    With `imwa.data_parallel=D` and `model.sync_batchnorm=true` each process forwards its own copy of the
    solid image, so group BN sees D identical images: the same batch statistics, but the running variance's
    unbiasing factor n / (n - 1) counts D times the values (D = 1: H * W per channel).
    """

    Config = CDMADConfig
    cfg: CDMADConfig

    def __init__(self, cfg: CDMADConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.debias_start = resolve_steps(cfg.debias_start, self.total_steps, "algorithm.debias_start")

    def num_strong_views(self) -> int:
        return self.cfg.strong_views

    @classmethod
    def eval_logit_offset(cls, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The test-time refinement: the evaluated model's own solid-image logits (it is in eval mode there,
        official `validate`: `model.eval()`, then `biaseddegree` once per evaluation, lines 302-321)."""
        return solid_image_logits(model, inputs)

    def measure_bias(self, model: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """b from the student, in train mode, before the views' forwards (official lines 231-233)."""
        return solid_image_logits(model, like)

    def pseudo_targets(self, weak_logits: torch.Tensor, bias: torch.Tensor, step: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets, labels and mask from the weak view, debiased from `debias_start` on (official lines 234-242)."""
        debias = step >= self.debias_start
        return debiased_targets(weak_logits, bias if debias else None, self.cfg.threshold, self.cfg.soft_targets)

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        # Measured at every step, also before debias_start: official (line 233 runs whatever the epoch),
        # and the forward moves the BN running statistics, so skipping it would change the model.
        bias = self.measure_bias(model, batch["u_weak"])
        # Official: one forward per view (weak under no_grad first, then labeled, strong 1, strong 2). Here the
        # weak view per `weak_pass` (the recipe: no_grad, alone, as official) and the others in one forward.
        labeled, weak, strong = self.forward_views(model, batch)
        # Cross-entropies from the log-softmax; official SemiLoss (lines 409-413) takes log(softmax + 1e-8),
        # which differs by at most 1e-8 / p per term (tests/test_cdmad.py bounds the difference).
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        targets, labels, mask = self.pseudo_targets(weak["logits"], bias, step)
        loss_u = strong_consistency([view["logits"] for view in strong], targets, mask)
        return {
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"]),
            "bias_range": bias.max() - bias.min(),
        }
