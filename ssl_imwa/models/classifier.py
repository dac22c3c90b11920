"""Backbone + named heads; algorithms add heads (ACR's balanced head) by name."""
from __future__ import annotations

import torch
from torch import nn


class DerivedHead(nn.Module):
    """A head computed from the outputs of the heads before it rather than from the features: the Classifier calls
    `forward(outputs)` with the dict built so far ('features' and every earlier head, by name). A switch or a
    combination of heads (CoSSL's evaluated head: the standard head until its classifier warm-up, its teacher
    classifier after); the heads it reads must be added before it."""

    def forward(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class Classifier(nn.Module):
    """`forward(x)` returns {'features': pooled features, <head name>: logits, ...}."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim: int = backbone.feature_dim
        self.num_classes = num_classes
        self.heads = nn.ModuleDict({"logits": nn.Linear(self.feature_dim, num_classes)})
        nn.init.zeros_(self.heads["logits"].bias)

    def add_head(self, name: str, head: nn.Module) -> None:
        if name in self.heads or name == "features":
            raise KeyError(f"head '{name}' already exists (heads: {list(self.heads)})")
        self.heads[name] = head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        out = {"features": features}
        for name, head in self.heads.items():
            out[name] = head(out) if isinstance(head, DerivedHead) else head(features)
        return out
