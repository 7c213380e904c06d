"""Binary LeNet (bitorch ``lenet``): full-precision 5x5 conv, binary 5x5 conv, binary hidden linear,
full-precision classifier. For inputs under 28 px both convs are padded ("same") so an 8x8 digit
keeps a 2x2 map; the hidden linear's width follows the final map size.
"""

from __future__ import annotations

import torch.nn as nn

from bitrain.binary.geometry import conv_out_size
from bitrain.binary.layers import QConv2d, QLinear
from bitrain.errors import UserError
from bitrain.models._registry import register

CHANNELS, HIDDEN = 64, 1000


class LeNet(nn.Module):
    def __init__(self, *, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        pad = 2 if image_size < 28 else 0
        side = image_size
        for kernel, stride, padding in ((5, 1, pad), (2, 2, 0), (5, 1, pad), (2, 2, 0)):  # conv5, pool2, conv5, pool2
            side = conv_out_size(side, kernel, stride, padding)
        if side < 1:
            raise UserError(f"model lenet needs inputs of at least 4 px, got --image-size {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, CHANNELS, 5, padding=pad),
            nn.BatchNorm2d(CHANNELS),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
            QConv2d(CHANNELS, CHANNELS, 5, 1, pad),
            nn.BatchNorm2d(CHANNELS),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
        )
        self.output = nn.Sequential(
            QLinear(CHANNELS * side * side, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Linear(HIDDEN, num_classes)
        )

    def forward(self, x):
        return self.output(self.features(x))


@register("lenet", family="lenet", image_size=28)
def lenet(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """Binary LeNet: conv5x5(64) fp -> conv5x5(64) binary -> linear(1000) binary -> linear fp."""
    return LeNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
