"""Pieces the built-in algorithms share: FixMatch's pseudo-labelling (Sohn et al., NeurIPS 2020) and the
config of the baselines that USB builds on its FixMatch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ssl_imwa.algorithm import AlgorithmConfig
from ssl_imwa.ema import EMAConfig
from ssl_imwa.validation import expect_range


@dataclass
class USBFixMatchConfig(AlgorithmConfig):
    """FixMatch's two keys with USB's defaults and USB's EMA teacher (decay 0.999, no warm-up, BN buffers
    copied: its EMAHook): what DebiasPL, SAW, DARP, ABC, ADSH and TRAS share, as USB mixes each into its
    FixMatch. A subclass redeclares `threshold` where the threshold means more there."""

    threshold: float = 0.95          # FixMatch confidence threshold (USB p_cutoff)
    lambda_u: float = 1.0            # weight of the unlabeled loss (USB ulb_loss_ratio)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999, warmup=False, buffers="copy"))

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.threshold", self.threshold, 0, 1)
        expect_range("algorithm.lambda_u", self.lambda_u, 0)


def confident_pseudo_labels(weak_logits: torch.Tensor, threshold: float, temperature: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pseudo labels, float mask, max probability) from detached weak-view logits."""
    probs = torch.softmax(weak_logits.detach() / temperature, dim=1)
    max_prob, labels = probs.max(dim=1)
    return labels, max_prob.ge(threshold).float(), max_prob


def masked_consistency(strong_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over all unlabeled samples of mask * CE(strong logits, pseudo label)."""
    return (F.cross_entropy(strong_logits, labels, reduction="none") * mask).mean()


def pseudo_label_accuracy(labels: torch.Tensor, mask: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of the masked pseudo-labels where the truth is known (diagnostic only; NaN if none).

    Counts over the whole batch instead of a boolean-indexed subset, so a CUDA step never waits
    for the device. On CPU correct / known is bitwise the subset's mean (both are float32(k) /
    float32(n)); the NaN comes from torch.where because 0 / 0 gives one with the sign bit set.
    """
    known = (true_labels >= 0) & mask.bool()
    known_count = known.sum().float()
    accuracy = (known & (labels == true_labels)).sum().float() / known_count
    return torch.where(known_count > 0, accuracy, float("nan"))


def consistency_outputs(loss_x: torch.Tensor, loss_u: torch.Tensor, lambda_u: float, labels: torch.Tensor,
                        mask: torch.Tensor, true_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a FixMatch-style step returns: the loss to minimise and the logged diagnostics."""
    return {
        "loss": loss_x + lambda_u * loss_u,
        "loss_x": loss_x.detach(),
        "loss_u": loss_u.detach(),
        "mask_rate": mask.mean(),
        "pseudo_acc": pseudo_label_accuracy(labels, mask, true_labels),
    }
