"""Supervised-only baseline on the labeled split: the reference every SSL method must beat."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import Algorithm, AlgorithmConfig, Batch, register_algorithm


@dataclass
class SupervisedConfig(AlgorithmConfig):
    name: str = "supervised"


@register_algorithm("supervised")
class Supervised(Algorithm):
    Config = SupervisedConfig

    def num_strong_views(self) -> int:
        return 0

    @classmethod
    def uses_unlabeled(cls) -> bool:
        return False

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        logits = model(batch["x"])["logits"].float()
        loss = F.cross_entropy(logits, batch["y"])
        return {"loss": loss, "loss_x": loss.detach()}
