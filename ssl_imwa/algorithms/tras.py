"""TRAS on FixMatch (Wei, Liu, Shi, Tu & Guo, "Transfer and Share: Semi-Supervised Learning from Long-Tailed
Data", Machine Learning 2022, arXiv 2205.13358).

Two linear classifiers share ("share") the backbone. The standard head is a FixMatch learner whose
pseudo-labels are logit-adjusted by the labeled prior. After a warm-up, a second head, the target model
that is evaluated, learns the labeled batch with the logit-adjusted loss and the unlabeled batch from the
standard head's prediction ("transfer"), adjusted by the prior with a strength that grows toward the tail
classes and softened at temperature 2, so minority classes receive a large share of the unlabeled signal.

Follows the official code (Tong Wei's re-implementation, `train.py`); USB 0.3.2
(semilearn/imb_algorithms/tras/tras.py) differs in two places, both documented below and in
docs/algorithms.md: the sign of its adjustment and the source of the transferred distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmContext,
    Batch,
    StepCount,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.common import (
    USBFixMatchConfig,
    confident_pseudo_labels,
    consistency_outputs,
    masked_consistency,
)
from ssl_imwa.validation import expect_range

# The target head: the one evaluated (USB's key `logits_aux`, its `TRASNet.aux_classifier`).
TARGET_HEAD = "logits_aux"
# Temperature of the transferred distribution: the official KL(outputs, targets, T=1) softens the targets
# at 2T and the student at T (USB: TRASKLLoss, the same).
TARGET_TEMPERATURE = 2.0


@dataclass
class TRASConfig(USBFixMatchConfig):
    name: str = "tras"
    threshold: float = 0.95         # confidence for both heads' masks (USB p_cutoff; official: 0.95 in the code)
    tau: float = 1.0                # adjustment log(pi_l^tau + 1e-12) (USB tras_tro; official --tro_train)
    strength_scale: float = 2.0     # A in the class strength A softmax(-adjustment)_c + B (USB tras_A; official --A)
    strength_offset: float = 2.0    # B (USB tras_B; official --B)
    # Steps (or a fraction of the run) before the target head trains. USB's CIFAR recipe: tras_warmup_epochs 1
    # of its 256 epochs (1,024 of 262,144 steps; scripts/config_generator_classic_cv_imb.py), kept as that
    # fraction; official: epochs 0-10 of 500 steps (5,500 of 250,000).
    warmup: StepCount = 1 / 256

    def validate(self) -> None:
        super().validate()
        for key in ("tau", "strength_scale", "strength_offset"):   # any real; negative values are ablations
            expect_range(f"algorithm.{key}", getattr(self, key))
        resolve_steps(self.warmup, 1, "algorithm.warmup")


def adjusted_pseudo_labels(weak_logits: torch.Tensor, adjustment: torch.Tensor, threshold: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) from softmax(f(u_w) - adjustment): post-hoc logit adjustment of the standard head.

    The adjustment is float64 (as official and USB), so the probabilities and the mask are too; the
    mask keeps their dtype as USB's FixedThresholdingHook does.
    """
    probs = torch.softmax(weak_logits.detach() - adjustment, dim=-1)
    max_prob, labels = probs.max(dim=-1)
    return labels, max_prob.ge(threshold).to(probs.dtype)


def transfer_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, adjustment: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """-mean_i mask_i sum_c q_ic log softmax(student_i)_c, q_i = softmax((teacher_i - adjustment_i) / 2).

    The official `KL` (a cross-entropy to soft targets: the targets' entropy is left out); `adjustment`
    holds one row per sample (the class strength of its pseudo-label times the prior adjustment).
    """
    targets = torch.softmax((teacher_logits.detach() - adjustment) / TARGET_TEMPERATURE, dim=1)
    return -((targets * F.log_softmax(student_logits, dim=1)).sum(dim=1) * mask).mean()


@register_algorithm("tras")
class TRAS(Algorithm):
    """No state beyond the labeled prior: the adjustment and the class strengths are derived from the
    labeled counts (not checkpointed), so resumes and IMWA merges have nothing to carry and
    `imwa.data_parallel` nothing to reduce.
    """

    Config = TRASConfig
    cfg: TRASConfig
    # Always the target head: USB reads the standard head until the warm-up ends (its evaluate() switches
    # on the epoch); the engine fixes one head per run, so an evaluation during the warm-up reads a head
    # not yet trained. Results after the warm-up are the same.
    eval_head = TARGET_HEAD

    adjustment: torch.Tensor
    class_strength: torch.Tensor

    def __init__(self, cfg: TRASConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.warmup = resolve_steps(cfg.warmup, self.total_steps, "algorithm.warmup")
        # log(pi_l^tau + 1e-12) in float64: the official compute_adjustment (normalised label frequencies).
        # USB builds it from min(n) / n_c, i.e. log pi_l with the sign reversed (plus a constant, which no
        # softmax sees): its adjustment pushes toward the head classes where the official one pushes away.
        # Not copied (the oracle's `prior_sign` item, docs/results/parity_usb.md).
        adjustment = torch.log(self.labeled_prior ** cfg.tau + 1e-12)
        self.register_buffer("adjustment", adjustment, persistent=False)
        # Class strength A softmax(-adjustment) + B: larger for rarer classes (official T_logit, USB T_logit).
        strength = cfg.strength_scale * torch.softmax(-adjustment, dim=0) + cfg.strength_offset
        self.register_buffer("class_strength", strength, persistent=False)

    def build_heads(self, feature_dim: int, num_classes: int) -> dict[str, nn.Module]:
        # Applied to the whole batch in the joint forward, as the standard head; USB applies its aux_classifier
        # again per slice of the features: the same values, its weight's gradient summed in another order
        # (rounding; the oracle's `joint_head` item). Bias 0 as the standard head's (USB: nn.Linear's default).
        head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(head.bias)
        return {TARGET_HEAD: head}

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        threshold = self.cfg.threshold
        # The standard head: FixMatch with logit-adjusted pseudo-labels (official and USB), labeled loss plain CE.
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        labels, mask = adjusted_pseudo_labels(weak["logits"], self.adjustment, threshold)
        loss_u = masked_consistency(strong["logits"], labels, mask)
        outputs = consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"])

        # The target head: logit-adjusted labeled loss (Menon et al.'s CE(f(x) + log pi_l), in float64 as USB).
        loss_x_target = F.cross_entropy(labeled[TARGET_HEAD] + self.adjustment, batch["y"])
        # Its own confident weak-view predictions choose which samples transfer and each one's strength.
        target_labels, target_mask, _ = confident_pseudo_labels(weak[TARGET_HEAD], threshold)
        strengths = self.class_strength[target_labels][:, None] * self.adjustment
        # The transferred distribution is the standard head's on the same strong view (official: `logits_u`,
        # the standard head on both strong views). USB transfers the target head's own weak-view prediction
        # (its `logits_x_ulb_w` is `aux_classifier(feats_x_ulb_w)`), i.e. no transfer between the heads. Not
        # copied (the oracle's `teacher_target` item). One strong view, as USB's FixMatch (official: two).
        loss_transfer = transfer_loss(strong[TARGET_HEAD], strong["logits"], strengths, target_mask)

        # Warm-up: official and USB leave the target head out of the loss (no gradient at all). Here it stays
        # in the loss with weight 0, so that DistributedDataParallel (imwa.data_parallel > 1) sees every
        # parameter used; its gradient is then 0, not None, and SGD's weight decay and momentum shrink the
        # still untrained head slightly during the warm-up (about 14% over 1,024 steps at lr 0.03; the
        # oracle's `warmup_zero` item).
        weight = 1.0 if step >= self.warmup else 0.0
        outputs["loss"] = outputs["loss"] + weight * (loss_x_target + loss_transfer)
        outputs.update({
            "loss_x_target": weight * loss_x_target.detach(),
            "loss_transfer": weight * loss_transfer.detach(),
            "mask_rate_target": target_mask.mean(),
        })
        return outputs
