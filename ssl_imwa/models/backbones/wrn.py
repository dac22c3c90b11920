"""Wide ResNet as used by FixMatch, DASO and ACR (LeakyReLU 0.1, pre-activation blocks).

`wrn28_2` and `wrn28_8` are the papers' networks; `wrn` takes its depth and width as options
(`model=wrn model.depth=16 model.widen=4`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ssl_imwa.models.factory import register_model
from ssl_imwa.models.pooling import global_average_pool


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn_momentum: float, activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=bn_momentum)
        self.relu1 = nn.LeakyReLU(0.1, inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.relu2 = nn.LeakyReLU(0.1, inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal_in_out = cin == cout
        self.shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.conv1(self.relu1(self.bn1(x)))
        else:
            # As in the FixMatch/USB WRN: a down-sampling block pre-activates its input only
            # when it is the first block of the network; otherwise it convolves x as is.
            if self.activate_before_residual:
                x = self.relu1(self.bn1(x))
            out = self.conv1(x)
        out = self.conv2(self.relu2(self.bn2(out)))
        return (x if self.equal_in_out else self.shortcut(x)) + out


class WideResNet(nn.Module):
    """WRN-depth-widen; returns the globally pooled feature (64*widen channels)."""

    def __init__(self, in_channels: int = 3, depth: int = 28, widen: int = 2, bn_momentum: float = 0.001) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        for stage in range(3):
            for i in range(n):
                blocks.append(_Block(
                    channels[stage] if i == 0 else channels[stage + 1], channels[stage + 1],
                    stride=(1 if stage == 0 else 2) if i == 0 else 1, bn_momentum=bn_momentum,
                    activate_before_residual=(stage == 0 and i == 0),
                ))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels[3], momentum=bn_momentum)
        self.relu = nn.LeakyReLU(0.1, inplace=True)
        self.feature_dim = channels[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.blocks(self.conv1(x))))
        return global_average_pool(out)


@dataclass
class WideResNetOptions:
    """`model.depth` (6n+4: 10, 16, 22, 28, ...) and `model.widen` (the width multiplier) of `model=wrn`."""

    depth: int = 28
    widen: int = 2

    def validate(self) -> None:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"model.depth={self.depth}: expected 6n+4 with n >= 1 (10, 16, 22, 28, ...)")
        if self.widen < 1:
            raise ValueError(f"model.widen={self.widen}: expected an integer >= 1")


@register_model("wrn", config=WideResNetOptions)
def wrn(in_channels: int = 3, bn_momentum: float = 0.001, depth: int = 28, widen: int = 2) -> WideResNet:
    return WideResNet(in_channels, depth, widen, bn_momentum)


@register_model("wrn28_2")
def wrn28_2(in_channels: int = 3, bn_momentum: float = 0.001) -> WideResNet:
    return WideResNet(in_channels, 28, 2, bn_momentum)


@register_model("wrn28_8")
def wrn28_8(in_channels: int = 3, bn_momentum: float = 0.001) -> WideResNet:
    return WideResNet(in_channels, 28, 8, bn_momentum)
