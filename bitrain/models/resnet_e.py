"""ResNetE (Bi-Real style) as BMXNet v2 ``binary_models/resnet_e.py``: each ResNet block is split in two,
so a full-precision shortcut goes around every binary 3x3 conv.

Options (BMXNet flags): ``fp_downsample_sc`` full-precision 1x1 conv in the downsample shortcut (else binary);
``pool_downsample_sc`` 2x2 average pool then a stride-1 1x1 conv (else a stride-2 1x1 conv);
``downsample_sc_groups`` groups of that 1x1 conv; ``slices`` (1, 2, 4, 8): each conv writes C/slices channels
onto one slice of the shortcut, and there are ``slices`` times more blocks (same weights in total).
The published ResNetE-18 is ``resnet18_e1`` with fp_downsample_sc and pool_downsample_sc.
ResNetE-50 keeps BMXNet's numbers: basic blocks at the bottleneck widths 256-2048 (~336M weights at 1000 classes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.errors import UserError
from bitrain.models._registry import register
from bitrain.models.common import check_groups, head, resnet_features, shortcut_pool, sliced_add


def _downsample(c_in: int, c_out: int, stride: int, fp: bool, pool: bool, groups: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    if pool and stride > 1:
        layers.append(shortcut_pool(stride))
        stride = 1
    conv = nn.Conv2d if fp else QConv2d
    return layers + [conv(c_in, c_out, 1, stride, 0, groups=groups, bias=False)]


class BlockE(nn.Module):
    """One binary 3x3 conv with its own shortcut.

    E1 (post-norm): out = BN(qconv(x)) + shortcut(x), shortcut = downsample + BN when the shape changes.
    E2 (pre-norm): bn = BN(x); out = qconv(bn) + (x or downsample(bn)).
    With ``slices`` > 1 the conv writes C/slices channels, added onto slice ``write_on`` of the shortcut.
    """

    def __init__(
        self,
        version: int,
        c_in: int,
        c_out: int,
        stride: int,
        *,
        fp: bool,
        pool: bool,
        groups: int,
        slices: int = 1,
        write_on: int = 0,
    ):
        super().__init__()
        self.version = version
        self.start = (c_out // slices) * write_on  # first shortcut channel this conv adds onto
        self.sliced = slices > 1
        width = c_out // slices
        self.bn = nn.BatchNorm2d(c_in) if version == 2 else None
        body: list[nn.Module] = [QConv2d(c_in, width, 3, stride, 1)]
        if version == 1:
            body.append(nn.BatchNorm2d(width))
        self.body = nn.Sequential(*body)
        self.downsample = None
        if c_in != c_out or stride != 1:
            ds = _downsample(c_in, c_out, stride, fp, pool, groups)
            self.downsample = nn.Sequential(*(ds + [nn.BatchNorm2d(c_out)] if version == 1 else ds))

    def residual_parts(self) -> tuple[str, str | None] | None:
        """("body", shortcut child or None) when this block computes ``body(x) + shortcut(x)`` (E1, whole
        convs), for the packed model's fused units (``bitrain.deploy.fused``); None otherwise."""
        if self.bn is not None or self.sliced:  # E2's pre-norm, or a slice added onto the shortcut
            return None
        return "body", None if self.downsample is None else "downsample"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = x if self.bn is None else self.bn(x)
        residual = x if self.downsample is None else self.downsample(inp)
        y = self.body(inp)
        return y + residual if y.shape[1] == residual.shape[1] else sliced_add(residual, y, self.start)


class ResNetE(nn.Module):
    """features (input BN, stem, 4 stages of BlockE, [BN,] ReLU) -> global pool -> full-precision linear."""

    def __init__(
        self,
        layers: list[int],
        channels: list[int],
        version: int,
        *,
        num_classes: int,
        in_channels: int,
        initial_layers: str,
        fp_downsample_sc: bool,
        pool_downsample_sc: bool,
        downsample_sc_groups: int,
        slices: int,
    ):
        super().__init__()
        if slices not in (1, 2, 4, 8):
            raise UserError(f"--slices {slices}: valid values are 1, 2, 4, 8")
        for i in range(len(layers)):
            check_groups("--downsample-sc-groups", downsample_sc_groups, channels[i], channels[i + 1])
        opts = dict(fp=fp_downsample_sc, pool=pool_downsample_sc, groups=downsample_sc_groups)
        stages: list[nn.Module] = []
        for i, n in enumerate(layers):
            c_in, c_out, stride = channels[i], channels[i + 1], 1 if i == 0 else 2
            convs = 2 * n  # two single-conv blocks per ResNet block
            if c_in == c_out and stride == 1:  # no downsampling: every conv can be sliced
                stage = [
                    BlockE(version, c_in, c_out, 1, slices=slices, write_on=k % slices, **opts)
                    for k in range(convs * slices)
                ]
            else:  # the downsampling conv stays whole
                stage = [BlockE(version, c_in, c_out, stride, **opts)]
                stage += [
                    BlockE(version, c_out, c_out, 1, slices=slices, write_on=k % slices, **opts)
                    for k in range((convs - 1) * slices)
                ]
            stages.append(nn.Sequential(*stage))
        self.features = resnet_features(
            stages, in_channels=in_channels, channels=channels, version=version, initial_layers=initial_layers
        )
        self.output = nn.Sequential(*head(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


_BASIC = [64, 64, 128, 256, 512]  # stem width, then stage widths
_WIDE = [64, 256, 512, 1024, 2048]  # BMXNet's ResNetE-50 widths
# the options every ResNetE takes, with BMXNet's defaults: binary stride-2 1x1 downsample convs, whole convs
ARCH = dict(fp_downsample_sc=False, pool_downsample_sc=False, downsample_sc_groups=1, slices=1)


def _net(layers: list[int], channels: list[int], version: int, kw: dict) -> ResNetE:
    kw.pop("image_size")
    return ResNetE(layers, channels, version, **kw)


@register("resnet18_e1", family="resnet_e", arch=ARCH)
def resnet18_e1(**kw) -> nn.Module:
    """ResNetE-18 (E1, post-norm): [2, 2, 2, 2] blocks = 16 binary 3x3 convs, each with a shortcut."""
    return _net([2, 2, 2, 2], _BASIC, 1, kw)


@register("resnet34_e1", family="resnet_e", arch=ARCH)
def resnet34_e1(**kw) -> nn.Module:
    """ResNetE-34 (E1): [3, 4, 6, 3] blocks = 32 binary 3x3 convs."""
    return _net([3, 4, 6, 3], _BASIC, 1, kw)


@register("resnet50_e1", family="resnet_e", arch=ARCH)
def resnet50_e1(**kw) -> nn.Module:
    """ResNetE-50 (E1): [3, 4, 6, 3] blocks at widths 256-2048 (BMXNet's spec)."""
    return _net([3, 4, 6, 3], _WIDE, 1, kw)


@register("resnet18_e2", family="resnet_e", arch=ARCH)
def resnet18_e2(**kw) -> nn.Module:
    """ResNetE-18 (E2, pre-norm): [2, 2, 2, 2] blocks."""
    return _net([2, 2, 2, 2], _BASIC, 2, kw)


@register("resnet34_e2", family="resnet_e", arch=ARCH)
def resnet34_e2(**kw) -> nn.Module:
    """ResNetE-34 (E2, pre-norm): [3, 4, 6, 3] blocks."""
    return _net([3, 4, 6, 3], _BASIC, 2, kw)


@register("resnet50_e2", family="resnet_e", arch=ARCH)
def resnet50_e2(**kw) -> nn.Module:
    """ResNetE-50 (E2, pre-norm): [3, 4, 6, 3] blocks at widths 256-2048 (BMXNet's spec)."""
    return _net([3, 4, 6, 3], _WIDE, 2, kw)
