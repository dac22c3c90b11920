"""Typed model configuration: the keys every backbone shares; a backbone's own options are typed by its dataclass."""
from __future__ import annotations

from dataclasses import dataclass

# Keys of `model` that describe the run, not the backbone: everything else is a keyword option of the backbone.
ENGINE_KEYS = ("name", "sync_batchnorm")


@dataclass
class ModelConfig:
    name: str = "wrn28_2"  # a registered backbone (ssl_imwa/models/backbones/, or a plugin's)
    bn_momentum: float = 0.001  # PyTorch convention; DASO 0.1, FixMatch/ACR 0.001; passed to every backbone
    # imwa.data_parallel > 1: BN statistics over the whole step's batch across the replica's D processes,
    # as with D = 1 (false: each process normalises its own slice; docs/imwa.md)
    sync_batchnorm: bool = False
