"""Small CNN for CPU runs: three conv-BN-ReLU stages (32/64/128) with max-pooling between."""
from __future__ import annotations

import torch
from torch import nn

from ssl_imwa.models.factory import register_model
from ssl_imwa.models.pooling import MaxPool2x2, global_average_pool


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128), bn_momentum: float = 0.001) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            if index > 0:
                layers.append(MaxPool2x2())
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width, momentum=bn_momentum),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_average_pool(self.features(x))


@register_model("small_cnn")
def small_cnn(in_channels: int = 3, bn_momentum: float = 0.001) -> SmallCNN:
    return SmallCNN(in_channels=in_channels, bn_momentum=bn_momentum)
