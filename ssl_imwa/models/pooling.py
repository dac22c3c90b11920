"""Pooling written for speed on CPU without changing a single bit of the results."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def global_average_pool(features: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C].

    Not `nn.AdaptiveAvgPool2d(1)`: its CUDA backward uses atomic adds and is non-deterministic
    (it warns or fails under `torch.use_deterministic_algorithms`), while a mean's backward is a
    broadcast. Same values up to float rounding; works in either memory format.
    """
    return features.mean(dim=(2, 3))


class _MaxPoolForwardChannelsLast(torch.autograd.Function):
    """2x2 max-pooling (stride 2) whose forward runs PyTorch's channels-last CPU kernel and whose
    backward runs the contiguous one, each the faster of the two for its pass."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor) -> torch.Tensor:
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(
            features.contiguous(memory_format=torch.channels_last), [2, 2], [2, 2])
        indices = indices.contiguous()
        ctx.save_for_backward(features, indices)
        return pooled.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        features, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), features, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


class MaxPool2x2(nn.Module):
    """`nn.MaxPool2d(2)`, bit for bit, faster on CPU.

    PyTorch's CPU forward of a contiguous (NCHW) max-pool over small maps is several times slower than
    its channels-last kernel (7.8 ms against 1.9 ms, conversion included, for the small CNN's first pool
    at 160 images, one thread), while its NCHW backward is the faster one. A maximum is exact and the
    two kernels break ties alike (the first maximum of the window, whose index is the same in either
    layout), so values, indices and gradients are the same bits. On other devices, or for
    input that is already channels-last, the plain call is used.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.device.type != "cpu" or features.dim() != 4 or not features.is_contiguous():
            return F.max_pool2d(features, 2)
        if torch.is_grad_enabled() and features.requires_grad:
            return _MaxPoolForwardChannelsLast.apply(features)
        return F.max_pool2d(features.contiguous(memory_format=torch.channels_last), 2).contiguous()
