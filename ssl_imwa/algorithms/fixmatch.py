"""FixMatch (Sohn et al., NeurIPS 2020): hard pseudo-labels from a weak view, kept above a confidence threshold, train a strong view."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import Algorithm, AlgorithmConfig, Batch, register_algorithm
from ssl_imwa.algorithms.common import (
    confident_pseudo_labels,
    consistency_outputs,
    masked_consistency,
)
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
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"]),
        }
