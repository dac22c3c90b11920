"""FixMatch (Sohn et al., 2020), Sohn et al., NeurIPS 2020."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Algorithm, AlgorithmConfig, Batch
from algorithms.registry import register_algorithm
from ssl_imwa.validation import expect_range


@dataclass
class FixMatchConfig(AlgorithmConfig):
    name: str = "fixmatch"
    threshold: float = 0.95     # tau: confidence needed for a pseudo-label to count
    lambda_u: float = 1.0       # weight of the unlabeled consistency loss
    temperature: float = 1.0    # of the weak-view softmax (FixMatch: 1, hard labels)

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.threshold", self.threshold, 0, 1)
        expect_range("algorithm.lambda_u", self.lambda_u, 0)
        expect_range("algorithm.temperature", self.temperature, 0, low_open=True)


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


@register_algorithm("fixmatch")
class FixMatch(Algorithm):
    Config = FixMatchConfig
    cfg: FixMatchConfig

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        labels, mask, _ = confident_pseudo_labels(weak["logits"], self.cfg.threshold, self.cfg.temperature)
        loss_u = masked_consistency(strong["logits"], labels, mask)
        return {
            "loss": loss_x + self.cfg.lambda_u * loss_u,
            "loss_x": loss_x.detach(),
            "loss_u": loss_u.detach(),
            "mask_rate": mask.mean(),
            "pseudo_acc": pseudo_label_accuracy(labels, mask, batch["u_target"]),
        }
