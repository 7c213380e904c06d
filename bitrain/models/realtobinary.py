"""Real-to-Binary Net as larq zoo ``RealToBinaryNet`` (Martinez et al. 2020), its BNN variant ``r2b_bnn``.

A ResNet-18 layout of half blocks, each one binary 3x3 conv with its own shortcut:
``out = PReLU(qconv(BN(x)) * gate(BN(x))) + shortcut(x)``. The gate is the paper's data-driven rescaling
(squeeze-and-excitation style): global average pool of the conv's real-valued input, linear to C/8, ReLU,
linear to the conv's width, sigmoid, one factor per output channel and sample. Where the width doubles, the
conv strides and the shortcut is a 2x2/2 average pool, a float 1x1 conv and BN. Stem: 7x7/2 conv, BN, PReLU,
3x3/2 max pool; top: global pool, float linear. Binary layers: ste_sign inputs and weights, no xnor offset.
PReLU slopes start at 0 (Keras' initialiser; torch's is 0.25).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.models._registry import register
from bitrain.models.common import shortcut_pool
from bitrain.models.parts import check_stem, keras_bn, own

SCALING_R = 8  # the gate's reduction: C -> C / 8 -> C_out


class Gate(nn.Module):
    """Per-sample, per-channel scale: sigmoid(W2 relu(W1 mean_hw(x))), shape (N, C_out, 1, 1)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.reduce = nn.Linear(c_in, c_in // SCALING_R, bias=False)
        self.expand = nn.Linear(c_in // SCALING_R, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.reduce(x.mean(dim=(2, 3))))
        return torch.sigmoid(self.expand(z))[:, :, None, None]


class HalfBlock(nn.Module):
    """One binary conv of a Real-to-Binary block: PReLU(qconv(BN(x)) * gate(BN(x))) + shortcut(x)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        stride = 1 if c_in == c_out else 2
        self.bn = keras_bn(c_in)
        self.conv = QConv2d(
            c_in,
            c_out,
            3,
            stride,
            1,
            activation_method=own("det_sign"),
            weight_quantization=own("det_sign", "weight"),
            no_offset=True,
            pad_value=0.0,
            weight_clip=1.0,
        )
        self.gate = Gate(c_in, c_out)
        self.act = nn.PReLU(c_out, init=0.0)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out:
            self.shortcut = nn.Sequential(shortcut_pool(2), nn.Conv2d(c_in, c_out, 1, bias=False), keras_bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = self.bn(x)
        return self.act(self.conv(real) * self.gate(real)) + self.shortcut(x)


class RealToBinaryNet(nn.Module):
    """features (stem, 8 blocks of 2 half blocks) -> output (global pool, linear)."""

    def __init__(self, *, num_classes: int, in_channels: int, initial_layers: str) -> None:
        super().__init__()
        check_stem("realtobinarynet", initial_layers)
        k, s = (7, 2) if initial_layers == "imagenet" else (3, 1)
        feats: list[nn.Module] = [nn.Conv2d(in_channels, 64, k, s, k // 2, bias=False), keras_bn(64)]
        feats.append(nn.PReLU(64, init=0.0))
        if initial_layers == "imagenet":
            feats.append(nn.MaxPool2d(3, 2, 1))
        width = 64
        for block in range(2, 10):  # larq's block numbering: blocks 4, 6 and 8 double the width
            c_out = 2 * width if block % 2 == 0 and block > 3 else width
            feats += [HalfBlock(width, c_out), HalfBlock(c_out, c_out)]
            width = c_out
        self.features = nn.Sequential(*feats)
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


@register("realtobinarynet", family="realtobin")
def realtobinarynet(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """Real-to-Binary Net, BNN variant (larq zoo ``RealToBinaryNet``, 11,986,920 trainable parameters)."""
    return RealToBinaryNet(num_classes=num_classes, in_channels=in_channels, initial_layers=initial_layers)
