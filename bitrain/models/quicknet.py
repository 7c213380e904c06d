"""QuickNet (larq zoo ``QuickNetSmall``, ``QuickNet``, ``QuickNetLarge``; Bannink et al. 2021).

Stem: 3x3/2 conv (filters/4), BN, ReLU, depthwise 3x3/2, BN without scale or shift, 1x1 conv, BN (224 -> 56).
Residual block: binary 3x3 conv, ReLU, BN, + x. Transition: ReLU, 2x2/1 max pool, fixed 3x3/2 blur pool
(depthwise, not trained), full-precision 1x1 conv, BN. Top: ReLU, global pool, linear.

The binary conv is larq's ``QuantConv2D(activation="relu", input_quantizer=SteSign(1.25),
kernel_quantizer=SteSign(1.25), kernel_constraint=WeightClip(1.25), pad_values=1.0)``: sign inputs with
the gradient cancelled past |x| = 1.25, padding +1, latent weights clamped to [-1.25, 1.25] after every
step (``weight_clip``, applied by the trainer), and no xnor offset: the ReLU sees the plain +-1 dot
product, negative where most positions disagree ((dot + fan_in) / 2 would be >= 0 and the ReLU a no-op).
larq fixes 1.25, so ``--clip-threshold`` does not change these layers. The kernel's own gradient cancel
at 1.25 never acts: the weight clip keeps |w| <= 1.25.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary.layers import QConv2d
from bitrain.models._registry import register
from bitrain.models.common import head, make_stem, padded_same_maxpool

CLIP = 1.25  # larq zoo QuickNet: input quantizer clip_value, kernel quantizer clip_value and WeightClip


def quicknet_conv(channels: int) -> QConv2d:
    """larq QuickNet's binary 3x3 conv (see the module docstring); the ReLU and BN follow it."""
    return QConv2d(channels, channels, 3, 1, 1, clip_threshold=CLIP, no_offset=True, pad_value=1.0, weight_clip=CLIP)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(quicknet_conv(channels), nn.ReLU(inplace=True), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: depthwise 3x3 [1 2 1]x[1 2 1]/16 filter, a buffer, not a parameter."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, padding=1, groups=x.shape[1])


class Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.blur = BlurPool(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "same" max pool keeps H, W so tiny inputs (1x1 maps) still work; larq uses "valid" (H-1)
        return self.bn(self.conv(self.blur(padded_same_maxpool(F.relu(x)))))


def _keras_default_bn(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    # Keras' BatchNormalization() defaults, momentum 0.99 (torch's 0.01) and epsilon 1e-3; the block and
    # transition BNs use larq's momentum 0.9, epsilon 1e-5, which are torch's defaults
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01, affine=affine)


def quicknet_stem(in_channels: int, channels: int) -> list[nn.Module]:
    quarter = channels // 4
    return [
        nn.Conv2d(in_channels, quarter, 3, 2, 1, bias=False),
        _keras_default_bn(quarter),
        nn.ReLU(inplace=True),
        nn.Conv2d(quarter, quarter, 3, 2, 1, groups=quarter, bias=False),
        _keras_default_bn(quarter, affine=False),  # larq: BatchNormalization(scale=False, center=False)
        nn.Conv2d(quarter, channels, 1, bias=False),
        _keras_default_bn(channels),
    ]


class QuickNet(nn.Module):
    def __init__(
        self, blocks: list[int], filters: list[int], *, num_classes: int, in_channels: int, initial_layers: str
    ):
        super().__init__()
        if initial_layers == "imagenet":
            feats = quicknet_stem(in_channels, filters[0])
        else:  # thumbnail (small inputs) or grouped_stem
            feats = make_stem(initial_layers, in_channels, filters[0])
            if initial_layers == "thumbnail":
                feats.append(nn.BatchNorm2d(filters[0]))
        for i, (n, f) in enumerate(zip(blocks, filters)):
            feats += [ResidualBlock(f) for _ in range(n)]
            if i < len(blocks) - 1:
                feats.append(Transition(f, filters[i + 1]))
        feats.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*feats)
        self.output = nn.Sequential(*head(filters[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


def _net(kw: dict) -> dict:
    return {k: kw[k] for k in ("num_classes", "in_channels", "initial_layers")}


@register("quicknet_small", family="quicknet")
def quicknet_small(**kw) -> nn.Module:
    """QuickNetSmall: blocks [4, 4, 4, 4], filters [32, 64, 256, 512]."""
    return QuickNet([4, 4, 4, 4], [32, 64, 256, 512], **_net(kw))


@register("quicknet", family="quicknet")
def quicknet(**kw) -> nn.Module:
    """QuickNet: blocks [4, 4, 4, 4], filters [64, 128, 256, 512]."""
    return QuickNet([4, 4, 4, 4], [64, 128, 256, 512], **_net(kw))


@register("quicknet_large", family="quicknet")
def quicknet_large(**kw) -> nn.Module:
    """QuickNetLarge: blocks [6, 8, 12, 6], filters [64, 128, 256, 512]."""
    return QuickNet([6, 8, 12, 6], [64, 128, 256, 512], **_net(kw))
