"""Binary ResNet v1 / v2 as BMXNet v2 ``binary_models/resnet.py``; stem and classifier full precision.

Basic blocks (ResNet-18/34): every conv is BMXNet's ``activated_conv``, a binarised input (QActivation)
into a binary conv, the 1x1 downsample shortcut included ("sc_qconv"). No ReLU in them: a ReLU before
a sign would make every input +1.

Bottleneck blocks (ResNet-50/152, width out/4): BMXNet's bare ``nn.QConv2D`` (binary weights, no
activation quantizer: the conv sees the real ReLU output, padded with -1, xnor offset, never scaled by
``--approximation``), with the ReLUs of the float ResNet. v1: 1x1 (stride) -> BN -> ReLU -> 3x3 -> BN ->
ReLU -> 1x1 -> BN, then ReLU(body + shortcut), the shortcut a 1x1 (stride) conv + BN. v2 (pre-activation):
BN -> ReLU -> 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1, + x or the 1x1 (stride) shortcut
of the first ReLU's output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.models._registry import register
from bitrain.models.common import head, resnet_features


def _weight_only_conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0) -> QConv2d:
    # BMXNet's nn.QConv2D without an activation: binary weights (--bits), the input as it comes
    return QConv2d(c_in, c_out, kernel, stride, padding, bits_a=32, activation_method="identity", approximation="")


class BlockV1(nn.Module):
    """Basic block: out = body(x) + shortcut(x); body ends with BN (post-norm, v1)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            QConv2d(c_in, c_out, 3, stride, 1),
            nn.BatchNorm2d(c_out),
            QConv2d(c_out, c_out, 3, 1, 1),
            nn.BatchNorm2d(c_out),
        )
        self.downsample = None
        if c_in != c_out or stride != 1:
            self.downsample = nn.Sequential(QConv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.body(x) + residual


class BlockV2(nn.Module):
    """Basic block, pre-norm (v2): bn = BN(x); out = body(bn) + (x or downsample(bn))."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.body = nn.Sequential(
            QConv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), QConv2d(c_out, c_out, 3, 1, 1)
        )
        self.downsample = QConv2d(c_in, c_out, 1, stride) if c_in != c_out or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn(x)
        residual = x if self.downsample is None else self.downsample(bn)
        return self.body(bn) + residual


class BottleneckV1(nn.Module):
    """BMXNet BottleneckV1: ReLU(body(x) + shortcut(x)), the stride on the first 1x1."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = c_out // 4
        self.body = nn.Sequential(
            _weight_only_conv(c_in, mid, 1, stride),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            _weight_only_conv(mid, mid, 3, 1, 1),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            _weight_only_conv(mid, c_out, 1),
            nn.BatchNorm2d(c_out),
        )
        self.downsample = None
        if c_in != c_out or stride != 1:
            self.downsample = nn.Sequential(_weight_only_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.body(x) + residual
        return torch.where(out > 0, out, 0.0)  # ReLU that keeps no output for backward: an in-place ReLU may follow


class BottleneckV2(nn.Module):
    """BMXNet BottleneckV2 (pre-activation): the stride on the 3x3, the shortcut from ReLU(BN(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = c_out // 4
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(mid), nn.BatchNorm2d(mid)
        self.conv1 = _weight_only_conv(c_in, mid, 1)
        self.conv2 = _weight_only_conv(mid, mid, 3, stride, 1)
        self.conv3 = _weight_only_conv(mid, c_out, 1)
        self.downsample = _weight_only_conv(c_in, c_out, 1, stride) if c_in != c_out or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = torch.relu(self.bn1(x))
        if self.downsample is not None:
            residual = self.downsample(x)
        x = self.conv1(x)
        x = self.conv2(torch.relu(self.bn2(x)))
        x = self.conv3(torch.relu(self.bn3(x)))
        return x + residual


_BLOCKS = {
    ("basic", 1): BlockV1,
    ("basic", 2): BlockV2,
    ("bottleneck", 1): BottleneckV1,
    ("bottleneck", 2): BottleneckV2,
}


class BinaryResNet(nn.Module):
    """features (input BN, stem, 4 stages, [BN,] ReLU) -> global pool -> full-precision linear."""

    def __init__(
        self,
        layers: list[int],
        channels: list[int],
        kind: str,
        version: int,
        *,
        num_classes: int,
        in_channels: int,
        initial_layers: str,
    ):
        super().__init__()
        block = _BLOCKS[kind, version]
        stages: list[nn.Module] = []
        for i, n in enumerate(layers):
            stride = 1 if i == 0 else 2
            stage = [block(channels[i], channels[i + 1], stride)]
            stage += [block(channels[i + 1], channels[i + 1], 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
        self.features = resnet_features(
            stages, in_channels=in_channels, channels=channels, version=version, initial_layers=initial_layers
        )
        self.output = nn.Sequential(*head(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


_BASIC = [64, 64, 128, 256, 512]  # stem width, then stage widths
_BOTTLENECK = [64, 256, 512, 1024, 2048]


@register("resnet18_v1", family="resnet")
def resnet18_v1(**kw) -> nn.Module:
    """Binary ResNet-18 v1: basic blocks [2, 2, 2, 2]."""
    return BinaryResNet([2, 2, 2, 2], _BASIC, "basic", 1, **_net(kw))


@register("resnet34_v1", family="resnet")
def resnet34_v1(**kw) -> nn.Module:
    """Binary ResNet-34 v1: basic blocks [3, 4, 6, 3]."""
    return BinaryResNet([3, 4, 6, 3], _BASIC, "basic", 1, **_net(kw))


@register("resnet50_v1", family="resnet")
def resnet50_v1(**kw) -> nn.Module:
    """Binary ResNet-50 v1: bottleneck blocks [3, 4, 6, 3]."""
    return BinaryResNet([3, 4, 6, 3], _BOTTLENECK, "bottleneck", 1, **_net(kw))


@register("resnet18_v2", family="resnet")
def resnet18_v2(**kw) -> nn.Module:
    """Binary ResNet-18 v2 (pre-norm): basic blocks [2, 2, 2, 2]."""
    return BinaryResNet([2, 2, 2, 2], _BASIC, "basic", 2, **_net(kw))


@register("resnet34_v2", family="resnet")
def resnet34_v2(**kw) -> nn.Module:
    """Binary ResNet-34 v2 (pre-norm): basic blocks [3, 4, 6, 3]."""
    return BinaryResNet([3, 4, 6, 3], _BASIC, "basic", 2, **_net(kw))


@register("resnet50_v2", family="resnet")
def resnet50_v2(**kw) -> nn.Module:
    """Binary ResNet-50 v2 (pre-norm): bottleneck blocks [3, 4, 6, 3]."""
    return BinaryResNet([3, 4, 6, 3], _BOTTLENECK, "bottleneck", 2, **_net(kw))


@register("resnet152_v1", family="resnet")
def resnet152_v1(**kw) -> nn.Module:
    """Binary ResNet-152 v1 (bitorch ``Resnet152V1``): bottleneck blocks [3, 8, 36, 3]."""
    return BinaryResNet([3, 8, 36, 3], _BOTTLENECK, "bottleneck", 1, **_net(kw))


@register("resnet152_v2", family="resnet")
def resnet152_v2(**kw) -> nn.Module:
    """Binary ResNet-152 v2 (bitorch ``Resnet152V2``, pre-norm): bottleneck blocks [3, 8, 36, 3]."""
    return BinaryResNet([3, 8, 36, 3], _BOTTLENECK, "bottleneck", 2, **_net(kw))


def _net(kw: dict) -> dict:
    # builders get num_classes, in_channels, image_size, initial_layers; the net ignores image_size
    return {k: kw[k] for k in ("num_classes", "in_channels", "initial_layers")}
