"""Bi-Real Net 18 as larq zoo ``BiRealNet`` (Liu et al. 2018): a shortcut around every binary 3x3 conv.

Stem: 7x7/2 conv, BN, 3x3/2 max pool (no ReLU: the next layer takes the sign). Block: BN(binary 3x3 conv(x))
+ shortcut(x); where the width doubles the conv strides and the shortcut is a 2x2/2 average pool, a float 1x1
conv and BN. Four blocks at 64 channels, then four at each of 128, 256, 512 (16 binary convs). Top: global
average pool, float linear. Inputs: approx_sign (Bi-Real's 2 - 2|x| gradient); weights: magnitude_aware_sign
(sign times mean|W| per output channel). BatchNorm as larq's (Keras momentum 0.8, epsilon 1e-3).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.models._registry import register
from bitrain.models.common import shortcut_pool
from bitrain.models.parts import check_stem, keras_bn, own

MOMENTUM = 0.8  # Keras momentum of every BatchNorm in larq zoo's BiRealNet


class BiRealBlock(nn.Module):
    """out = BN(qconv3x3(x)) + shortcut(x); the shortcut pools and projects (float) when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        stride = 1 if c_in == c_out else 2
        self.body = nn.Sequential(
            QConv2d(
                c_in,
                c_out,
                3,
                stride,
                1,
                activation_method=own("approx_sign"),
                weight_quantization=own("magnitude_aware_sign", "weight"),
                no_offset=True,
                pad_value=0.0,
                weight_clip=1.0,
            ),
            keras_bn(c_out, MOMENTUM),
        )
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out:
            self.shortcut = nn.Sequential(
                shortcut_pool(2), nn.Conv2d(c_in, c_out, 1, bias=False), keras_bn(c_out, MOMENTUM)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class BiRealNet(nn.Module):
    """features (stem, 16 blocks) -> output (global pool, linear)."""

    def __init__(self, *, num_classes: int, in_channels: int, initial_layers: str, filters: int = 64) -> None:
        super().__init__()
        check_stem("birealnet18", initial_layers)
        if initial_layers == "imagenet":
            stem = [nn.Conv2d(in_channels, filters, 7, 2, 3, bias=False), keras_bn(filters, MOMENTUM)]
            stem.append(nn.MaxPool2d(3, 2, 1))
        else:
            stem = [nn.Conv2d(in_channels, filters, 3, 1, 1, bias=False), keras_bn(filters, MOMENTUM)]
        blocks: list[nn.Module] = [BiRealBlock(filters, filters) for _ in range(4)]
        for width in (2 * filters, 4 * filters, 8 * filters):
            blocks += [BiRealBlock(width // 2, width)] + [BiRealBlock(width, width) for _ in range(3)]
        self.features = nn.Sequential(*stem, *blocks)
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * filters, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


@register("birealnet18", family="birealnet")
def birealnet18(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """Bi-Real Net 18 (larq zoo ``BiRealNet``, 11,689,512 trainable parameters at 1000 classes)."""
    return BiRealNet(num_classes=num_classes, in_channels=in_channels, initial_layers=initial_layers)
