"""SAW on FixMatch (Lai et al., ICML 2022, "Smoothed Adaptive Weighting for Imbalanced Semi-Supervised Learning").

Each sample's loss is weighted by its class's "effective number" weight (Cui et al., CVPR 2019),
smoothed so that rare classes gain without exploding: the labeled loss by weights from the labeled
counts, the unlabeled loss by weights from the class distribution of the pseudo-labels, re-estimated
once per epoch, so the unlabeled weighting follows an unlabeled distribution that is not known.
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
)
from ssl_imwa.validation import expect_choice

ESTIMATES = ("stream", "pass")


@dataclass
class SAWConfig(USBFixMatchConfig):
    name: str = "saw"
    # Steps between re-estimates of the unlabeled weights (USB: one epoch = num_train_iter / epoch
    # = 262144 / 256 = 1024 steps on CIFAR-10-LT; the official code: --val-iteration 500).
    epoch_length: StepCount = 1024
    # Where the unlabeled distribution comes from at each epoch's end. stream: the argmax of the student's
    # weak-view predictions over the epoch's batches (the official code's --distbu weak); pass: the argmax
    # of the EMA teacher over the whole unlabeled set (USB's after_train_epoch), through the engine's
    # unlabeled pass, which reads the images unaugmented (USB's eval_ulb applies the weak crop and flip).
    estimate: str = "stream"

    def validate(self) -> None:
        super().validate()
        expect_choice("algorithm.estimate", self.estimate, ESTIMATES)
        resolve_steps(self.epoch_length, 1, "algorithm.epoch_length", minimum=1)


def effective_number_weights(counts: torch.Tensor) -> torch.Tensor:
    """Class weights (1 - beta) / (1 - beta^n_c), normalised to sum to C, with beta = (N - 1) / N and N the
    mean count (SAW's smoothing: the official code and USB derive beta from the counts this way); in the
    counts' precision (float64 stays float64, anything else is float32)."""
    counts = counts if counts.dtype == torch.float64 else counts.float()
    mean = counts.sum() / counts.numel()
    beta = (mean - 1) / mean
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts))
    return weights / weights.sum() * counts.numel()


@register_algorithm("saw")
class SAW(Algorithm):
    """State: the unlabeled class weights (float32 [C]) and this epoch's pseudo-label counts (float64 [C]).

    The labeled weights come from the exact labeled counts (derived, not checkpointed). Every step adds
    the argmax of the student's weak-view prediction of every unlabeled image of the batch to the counts
    (`batch_group.sum` under data parallelism); after the last step of each epoch the counts, rescaled to
    the unlabeled set's size and clamped at 1, give the new unlabeled weights, and restart. At an IMWA
    merge both are averaged over the replicas.
    """

    Config = SAWConfig
    cfg: SAWConfig

    labeled_weights: torch.Tensor
    unlabeled_weights: torch.Tensor
    pseudo_counts: torch.Tensor

    def __init__(self, cfg: SAWConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.epoch_length = resolve_steps(cfg.epoch_length, self.total_steps, "algorithm.epoch_length", minimum=1)
        counts = torch.tensor(list(context.labeled_counts), dtype=torch.float32).clamp(min=1)
        self.register_buffer("labeled_weights", effective_number_weights(counts).to(self.device), persistent=False)
        # Before the first estimate: the weights of a uniform unlabeled set (all 1 up to rounding), as USB.
        # Computed in float64 as USB does (its counts are a float64 array), stored in float32: USB keeps
        # float64 weights until its first re-estimate, which promotes its unlabeled loss to float64.
        uniform = torch.full((self.num_classes,), context.num_unlabeled / self.num_classes, dtype=torch.float64)
        self.register_buffer("unlabeled_weights", effective_number_weights(uniform).float().to(self.device))
        self.register_buffer("pseudo_counts", torch.zeros(self.num_classes, dtype=torch.float64, device=self.device))

    def refresh_weights(self) -> None:
        """Unlabeled weights from this epoch's counts, rescaled to the unlabeled set's size, then restart."""
        scale = self.context.num_unlabeled / self.pseudo_counts.sum().clamp(min=1)
        counts = (self.pseudo_counts * scale).clamp(min=1)
        self.unlabeled_weights = effective_number_weights(counts).float()
        self.pseudo_counts = torch.zeros_like(self.pseudo_counts)

    def unlabeled_pass_every(self) -> int:
        return self.epoch_length if self.cfg.estimate == "pass" else 0

    def after_unlabeled_pass(self, outputs: dict[str, torch.Tensor], step: int) -> None:
        """USB's re-estimate: the teacher's argmax counts over the unlabeled set, clamped at 1, in float32."""
        counts = F.one_hot(outputs["logits"].argmax(dim=1), self.num_classes).sum(dim=0).clamp(min=1)
        self.unlabeled_weights = effective_number_weights(counts.float())

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        per_sample = F.cross_entropy(labeled["logits"], batch["y"], reduction="none")
        loss_x = (per_sample * self.labeled_weights[batch["y"]]).mean()
        labels, mask, _ = confident_pseudo_labels(weak["logits"], self.cfg.threshold)
        weighted_mask = mask * self.unlabeled_weights[labels]
        loss_u = (F.cross_entropy(strong["logits"], labels, reduction="none") * weighted_mask).mean()
        if self.cfg.estimate == "stream":
            counts = F.one_hot(labels, self.num_classes).sum(dim=0).double()
            self.pseudo_counts = self.pseudo_counts + self.batch_group.sum(counts)
            if (step + 1) % self.epoch_length == 0:
                self.refresh_weights()
        return {
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"]),
        }
