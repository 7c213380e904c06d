"""ReActNet (Liu et al., ECCV 2020) as its authors' PyTorch code: ``reactnet_a`` (MobileNet-v1 layout) and
``reactnet18`` (Bi-Real ResNet-18 layout).

Every binary conv takes ``sign(x + b)`` (RSign: a learnt per-channel threshold, ``LearnableBias`` in front of
a ``QConv2d`` whose approx_sign input quantizer takes the sign with Bi-Real's 2 - 2|x| gradient) and every
shortcut add is followed by RPReLU (``PReLU(x + b1) + b2``, per channel). Weights: sign times mean|W| per
output channel, the gradient passed where |W| <= 1 and not scaled (``reactnet_sign``, the authors'
HardBinaryConv). Shortcuts and stem are float.

ReActNet-A block (MobileNet's depthwise 3x3 + pointwise 1x1, made dense): x1 = RPReLU(BN(qconv3x3(x)) +
pool(x)); out = RPReLU(BN(qconv1x1(x1)) + x1). Where the width doubles, two 1x1 convs each add x1 and their
outputs are concatenated. Stem: 3x3/2 conv to 32, BN; widths 64, 128 x2, 256 x2, 512 x6, 1024 x2; each width
change (but 32 -> 64) strides by 2 with a 2x2/2 average pool on the shortcut.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.binary.react import LearnableBias, RPReLU
from bitrain.models._registry import register
from bitrain.models.common import shortcut_pool
from bitrain.models.parts import ZooQuantizer, check_stem, own

STAGES_A = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]  # stem width, then blocks


class _ReActWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * scale

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return torch.where(w.abs() <= 1.0, grad, 0.0)


#: ReActNet's weights: mean|W| per output channel (stop-gradient) times sign(W) (0 -> +1), gradient 1 where
#: |W| <= 1, else 0 (the authors' clamp(W, -1, 1) straight-through)
reactnet_sign = ZooQuantizer("reactnet_sign", _ReActWeight.apply)


def _binary(c_in: int, c_out: int, kernel: int, stride: int = 1) -> QConv2d:
    # approx_sign inputs (the sign of RSign), reactnet_sign weights, the plain +-1 dot product
    return QConv2d(
        c_in,
        c_out,
        kernel,
        stride,
        kernel // 2,
        activation_method=own("approx_sign"),
        weight_quantization=own(reactnet_sign, "weight"),
        no_offset=True,
        pad_value=0.0,  # the authors' F.conv2d(padding=...) pads the signs with zeros
    )


class BlockA(nn.Module):
    """ReActNet-A block: 3x3 binary conv with shortcut, RPReLU, 1x1 binary conv(s) with shortcut, RPReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv3 = nn.Sequential(LearnableBias(c_in), _binary(c_in, c_in, 3, stride), nn.BatchNorm2d(c_in))
        self.pool = shortcut_pool(2) if stride == 2 else nn.Identity()
        self.act1 = RPReLU(c_in)
        # one 1x1 conv at equal widths; two (each c_in -> c_in, concatenated) where the width doubles
        if c_out not in (c_in, 2 * c_in):
            raise ValueError(f"ReActNet-A block: width {c_in} -> {c_out} (only equal or doubled)")
        self.shift = LearnableBias(c_in)  # the 1x1 convs' RSign threshold, shared where there are two
        self.pointwise = nn.ModuleList(
            nn.Sequential(_binary(c_in, c_in, 1), nn.BatchNorm2d(c_in)) for _ in range(c_out // c_in)
        )
        self.act2 = RPReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.act1(self.conv3(x) + self.pool(x))
        shifted = self.shift(x1)
        return self.act2(torch.cat([pw(shifted) + x1 for pw in self.pointwise], dim=1))


class ReActNetA(nn.Module):
    """features (stem, 13 blocks) -> output (global pool, linear)."""

    def __init__(self, *, num_classes: int, in_channels: int, initial_layers: str) -> None:
        super().__init__()
        check_stem("reactnet_a", initial_layers)
        stride = 2 if initial_layers == "imagenet" else 1
        feats: list[nn.Module] = [nn.Conv2d(in_channels, STAGES_A[0], 3, stride, 1, bias=False)]
        feats.append(nn.BatchNorm2d(STAGES_A[0]))
        for c_in, c_out in zip(STAGES_A, STAGES_A[1:]):
            feats.append(BlockA(c_in, c_out, 2 if c_out != c_in and c_out != 64 else 1))
        self.features = nn.Sequential(*feats)
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(STAGES_A[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


class Block18(nn.Module):
    """ReActNet-18 block: RPReLU(BN(qconv3x3(x)) + shortcut(x)); shortcut: 2x2/2 average pool, float 1x1
    conv and BN where the width doubles."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        stride = 1 if c_in == c_out else 2
        self.body = nn.Sequential(LearnableBias(c_in), _binary(c_in, c_out, 3, stride), nn.BatchNorm2d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out:
            self.shortcut = nn.Sequential(
                shortcut_pool(2), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
            )
        self.act = RPReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ReActNet18(nn.Module):
    """features (7x7/2 stem, BN, max pool; 4 x 4 blocks at 64-512) -> output (global pool, linear)."""

    def __init__(self, *, num_classes: int, in_channels: int, initial_layers: str) -> None:
        super().__init__()
        check_stem("reactnet18", initial_layers)
        if initial_layers == "imagenet":
            feats: list[nn.Module] = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
            feats.append(nn.MaxPool2d(3, 2, 1))
        else:
            feats = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)]
        width = 64
        for c_out in (64, 128, 256, 512):
            feats += [Block18(width, c_out)] + [Block18(c_out, c_out) for _ in range(3)]
            width = c_out
        self.features = nn.Sequential(*feats)
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


@register("reactnet_a", family="reactnet")
def reactnet_a(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """ReActNet-A (the authors' ``mobilenet/reactnet.py``): 69.4 % ImageNet top-1 in the paper."""
    return ReActNetA(num_classes=num_classes, in_channels=in_channels, initial_layers=initial_layers)


@register("reactnet18", family="reactnet")
def reactnet18(*, num_classes: int, in_channels: int, image_size: int, initial_layers: str) -> nn.Module:
    """ReActNet-18 (the authors' ``resnet/birealnet.py``, Bi-Real based): 65.9 % ImageNet top-1 (their README)."""
    return ReActNet18(num_classes=num_classes, in_channels=in_channels, initial_layers=initial_layers)
