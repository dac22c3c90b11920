"""Global average pooling as a plain mean over H and W."""
from __future__ import annotations

import torch


def global_average_pool(features: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C].

    Not `nn.AdaptiveAvgPool2d(1)`: its CUDA backward uses atomic adds and is non-deterministic
    (it warns or fails under `torch.use_deterministic_algorithms`), while a mean's backward is a
    broadcast. Same values up to float rounding; works in either memory format.
    """
    return features.mean(dim=(2, 3))
