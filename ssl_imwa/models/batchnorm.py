"""Batch normalisation over a data-parallel group: the statistics of the whole step's batch.

With `imwa.data_parallel=D` each process forwards 1/D of the batch. FixMatch-style algorithms
forward labeled, weak and strong views together so that BN statistics cover the whole step; a
plain BN layer would see only its process's slice. `model.sync_batchnorm=true` converts every BN
layer so that the mean and variance are those of the D slices together, as with D = 1.

On CUDA (and the other devices PyTorch's `SyncBatchNorm` supports) that class is used. It has no
CPU kernel, so on the CPU (gloo) `GroupBatchNorm2d` computes the same statistics from per-channel
sums (float64, one differentiable all-reduce per layer): a CPU run and its tests then behave as a
GPU run does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SYNC_BATCHNORM_DEVICES = ("cuda", "xpu", "hpu")


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) with a gradient: every process's output depends on every input, so the
    gradient reaching an input is the sum of the output gradients of all processes."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch across `process_group`."""

    def __init__(self, *args: object, process_group: dist.ProcessGroup | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        alone = not dist.is_initialized() or dist.get_world_size(self.process_group) == 1
        if alone or not (self.training and self.track_running_stats):
            return super().forward(input)
        channels = input.shape[1]
        values = input.double().transpose(0, 1).reshape(channels, -1)
        local = torch.cat([values.sum(1), values.square().sum(1),
                           values.new_full((1,), float(values.shape[1]))])
        total = _SumOverGroup.apply(local, self.process_group)
        count = total[-1]
        mean = total[:channels] / count
        variance = (total[channels:2 * channels] / count - mean.square()).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
            unbiased = variance * count / (count - 1).clamp_min(1.0)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        shape = (1, channels, 1, 1)
        scale = torch.rsqrt(variance + self.eps).float()
        output = (input.float() - mean.float().view(shape)) * scale.view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)


def _to_group_batchnorm(module: nn.Module, group: dist.ProcessGroup | None) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a GroupBatchNorm2d sharing its parameters and buffers."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GroupBatchNorm2d):
        converted = GroupBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats, process_group=group)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _to_group_batchnorm(child, group))
    return module


def synchronise_batchnorm(model: nn.Module, group: dist.ProcessGroup | None, device_type: str) -> nn.Module:
    """`model` with BN statistics computed over `group` (PyTorch's SyncBatchNorm where it has kernels)."""
    if device_type in SYNC_BATCHNORM_DEVICES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    return _to_group_batchnorm(model, group)
