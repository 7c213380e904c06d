"""BinaryDenseNet as BMXNet v2 ``binary_models/densenet.py`` / ``basenet_dense.py`` (Bethge et al. 2019).

Dense layer: BN -> binary 3x3 conv (growth_rate channels), concatenated to its input.
Transition (``downsample_structure``, comma list): bn, relu, max_pool, pool (2x2 avg), fp_conv[:groups]
(full-precision 1x1), q_conv (binary 1x1), cs[:groups] (channel shuffle); the 1x1 conv divides the
channels by ``reduction`` and rounds to a multiple of 32. ``dilated``: stages 3, 4 use dilation 2, 4
instead of pooling. The base class is shared with MeliusNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.errors import UserError
from bitrain.models._registry import register
from bitrain.models.common import (
    ChannelShuffle,
    check_groups,
    head,
    make_stem,
    positive_floats,
    positive_ints,
)

DOWNSAMPLE = "bn,max_pool,relu,fp_conv"
TRANSITION_TOKENS = ("bn", "relu", "max_pool", "pool", "fp_conv[:groups]", "q_conv", "cs[:groups]")
DILATIONS = (1, 1, 2, 4)


class DenseLayer(nn.Module):
    """x -> cat([x, binary_conv(BN(x))]): adds ``growth`` channels."""

    def __init__(self, c_in: int, growth: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c_in), QConv2d(c_in, growth, 3, 1, dilation, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def transition(structure: str, c_in: int, c_out: int, dilation: int) -> nn.Sequential:
    """Build the downsampling block from its comma-separated description."""
    layers: list[nn.Module] = []
    for token in structure.split(","):
        kind, _, arg = token.strip().partition(":")
        try:
            groups = int(arg) if arg else None
        except ValueError:
            groups = -1
        if kind not in ("fp_conv", "cs") and arg or groups == -1:
            raise UserError(f"--downsample-structure: bad entry {token!r}; valid: {', '.join(TRANSITION_TOKENS)}")
        if kind == "bn":
            layers.append(nn.BatchNorm2d(c_in))
        elif kind == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif kind in ("max_pool", "pool"):
            if dilation == 1:  # dilated stages keep their resolution
                pool = nn.MaxPool2d if kind == "max_pool" else nn.AvgPool2d
                layers.append(pool(2, 2, ceil_mode=True))
        elif kind == "fp_conv":
            check_groups("--downsample-structure fp_conv", groups or 1, c_in, c_out)
            layers.append(nn.Conv2d(c_in, c_out, 1, groups=groups or 1, bias=False))
        elif kind == "q_conv":
            layers.append(QConv2d(c_in, c_out, 1))
        elif kind == "cs":
            check_groups("--downsample-structure cs", groups or 16, c_in)
            layers.append(ChannelShuffle(groups or 16))
        else:
            raise UserError(f"--downsample-structure: bad entry {token!r}; valid: {', '.join(TRANSITION_TOKENS)}")
    if not any(isinstance(m, nn.Conv2d) for m in layers):
        raise UserError(f"--downsample-structure {structure!r}: needs a 1x1 conv (fp_conv or q_conv)")
    return nn.Sequential(*layers)


class DenseNetBase(nn.Module):
    """stem -> [stage of base blocks, transition]* -> BN, ReLU -> global pool -> full-precision linear."""

    def __init__(
        self,
        block_config: Sequence[int],
        reduction: Sequence[float],
        downsample: str,
        *,
        num_classes: int,
        in_channels: int,
        initial_layers: str,
        init_features: int,
        growth_rate: int,
        dilated: bool,
    ):
        super().__init__()
        if len(reduction) != len(block_config) - 1:
            raise UserError(
                f"--reduction: need {len(block_config) - 1} values (one per transition), got {len(reduction)}"
            )
        if dilated and len(block_config) > len(DILATIONS):
            raise UserError(f"--dilated supports at most {len(DILATIONS)} stages, got --block-config {block_config}")
        if init_features < 1 or growth_rate < 1:
            raise UserError(f"--init-features and --growth-rate must be >= 1, got {init_features}, {growth_rate}")
        self.growth = growth_rate
        self.channels = init_features
        feats: list[nn.Module] = make_stem(initial_layers, in_channels, init_features)
        for i, n in enumerate(block_config):
            dilation = DILATIONS[i] if dilated else 1
            feats.append(nn.Sequential(*[m for _ in range(n) for m in self.base_block(dilation)]))
            if i < len(block_config) - 1:
                # BMXNet: floor-divide, then round to a multiple of 32 channels (at least 32)
                c_out = max(32, int(round((self.channels // reduction[i]) / 32)) * 32)
                next_dilation = DILATIONS[i + 1] if dilated else 1
                feats.append(transition(downsample, self.channels, c_out, next_dilation))
                self.channels = c_out
        feats += [nn.BatchNorm2d(self.channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*feats)
        self.output = nn.Sequential(*head(self.channels, num_classes))

    def base_block(self, dilation: int) -> list[nn.Module]:
        layer = DenseLayer(self.channels, self.growth, dilation)
        self.channels += self.growth
        return [layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


def dense_arch(reduction, downsample_structure: str = DOWNSAMPLE, **more) -> dict:
    """The options a DenseNet / MeliusNet takes, with their defaults: BMXNet's growth rate and stem width 64,
    strided transitions, and the model's own channel divisor per transition and transition structure."""
    return dict(
        reduction=reduction,
        growth_rate=64,
        init_features=64,
        downsample_structure=downsample_structure,
        dilated=False,
        **more,
    )


def dense_net(cls, block_config: list[int], kw: dict) -> nn.Module:
    """``cls`` (DenseNetBase or MeliusNet) with ``block_config`` and the options in ``kw`` (a reduction of
    None: 2 per transition)."""
    kw.pop("image_size")
    n = len(block_config) - 1
    reduction = kw.pop("reduction")
    reduction = [2.0] * n if reduction is None else positive_floats("--reduction", reduction, n)
    return cls(block_config, reduction, str(kw.pop("downsample_structure")), **kw)


def flex_blocks(model: str, block_config, example: str) -> list[int]:
    """A ``*_flex`` model's required ``--block-config``."""
    if block_config is None:
        raise UserError(f"model {model} needs --block-config, e.g. {example}")
    return positive_ints("--block-config", block_config)


@register("densenet28", family="densenet", arch=dense_arch(reduction=(2.7, 2.7, 2.2)))
def densenet28(**kw) -> nn.Module:
    """BinaryDenseNet-28."""
    return dense_net(DenseNetBase, [6, 6, 6, 5], kw)


@register("densenet37", family="densenet", arch=dense_arch(reduction=(3.3, 3.3, 4.0)))
def densenet37(**kw) -> nn.Module:
    """BinaryDenseNet-37."""
    return dense_net(DenseNetBase, [6, 8, 12, 6], kw)


@register("densenet45", family="densenet", arch=dense_arch(reduction=(2.7, 3.3, 4.0)))
def densenet45(**kw) -> nn.Module:
    """BinaryDenseNet-45."""
    return dense_net(DenseNetBase, [6, 12, 14, 8], kw)


@register("densenet_flex", family="densenet", arch=dense_arch(reduction=None, block_config=None))
def densenet_flex(*, block_config, **kw) -> nn.Module:
    """BinaryDenseNet with ``block_config`` (required); reduction 2 per transition unless given."""
    return dense_net(DenseNetBase, flex_blocks("densenet_flex", block_config, "6,6,6,5"), kw)
