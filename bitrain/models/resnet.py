"""Binary ResNet v1 / v2 as BMXNet v2 ``binary_models/resnet.py``: every conv in the stages is binary,
the 1x1 downsample shortcut included ("sc_qconv"); stem and classifier full precision.

The blocks have no ReLU: a ReLU before a sign would make every input +1. ResNet-50 uses bottleneck
blocks (1x1 -> 3x3 -> 1x1, width out/4), each conv binary.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.models._registry import register
from bitrain.models.common import head, resnet_features


def _body(kind: str, c_in: int, c_out: int, stride: int, last_bn: bool) -> list[nn.Module]:
    if kind == "basic":
        layers = [QConv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), QConv2d(c_out, c_out, 3, 1, 1)]
    else:
        mid = c_out // 4
        layers = [
            QConv2d(c_in, mid, 1),
            nn.BatchNorm2d(mid),
            QConv2d(mid, mid, 3, stride, 1),
            nn.BatchNorm2d(mid),
            QConv2d(mid, c_out, 1),
        ]
    return layers + [nn.BatchNorm2d(c_out)] if last_bn else layers


class BlockV1(nn.Module):
    """out = body(x) + shortcut(x); body ends with BN (post-norm, v1)."""

    def __init__(self, kind: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_body(kind, c_in, c_out, stride, last_bn=True))
        self.downsample = None
        if c_in != c_out or stride != 1:
            self.downsample = nn.Sequential(QConv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.body(x) + residual


class BlockV2(nn.Module):
    """Pre-norm (v2): bn = BN(x); out = body(bn) + (x or downsample(bn))."""

    def __init__(self, kind: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.body = nn.Sequential(*_body(kind, c_in, c_out, stride, last_bn=False))
        self.downsample = QConv2d(c_in, c_out, 1, stride) if c_in != c_out or stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn(x)
        residual = x if self.downsample is None else self.downsample(bn)
        return self.body(bn) + residual


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
        block = BlockV1 if version == 1 else BlockV2
        stages: list[nn.Module] = []
        for i, n in enumerate(layers):
            stride = 1 if i == 0 else 2
            stage = [block(kind, channels[i], channels[i + 1], stride)]
            stage += [block(kind, channels[i + 1], channels[i + 1], 1) for _ in range(n - 1)]
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
