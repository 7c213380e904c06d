"""MeliusNet as BMXNet v2 ``binary_models/meliusnet.py`` (Bethge et al. 2020).

Each base block is a dense layer (adds ``growth_rate`` channels) followed by an improvement block:
BN -> binary 3x3 conv (all channels -> growth_rate) added onto the newest ``growth_rate`` channels.
Transitions as BinaryDenseNet; here ``reduction`` values are the published channel ratios
(e.g. 320 -> 160 channels is 2.0). MeliusNet-A/B/C use a channel shuffle and a grouped 1x1 conv.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d
from bitrain.errors import UserError
from bitrain.models._registry import register
from bitrain.models.common import positive_ints, sliced_add
from bitrain.models.densenet import DOWNSAMPLE, DenseLayer, DenseNetBase, _densenet


class ImprovementBlock(nn.Module):
    """x -> x with its last ``growth`` channels plus binary_conv(BN(x))."""

    def __init__(self, c_in: int, growth: int, dilation: int):
        super().__init__()
        self.start = c_in - growth
        self.body = nn.Sequential(nn.BatchNorm2d(c_in), QConv2d(c_in, growth, 3, 1, dilation, dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sliced_add(x, self.body(x), self.start)


class MeliusNet(DenseNetBase):
    def base_block(self, dilation: int) -> list[nn.Module]:
        dense = DenseLayer(self.channels, self.growth, dilation)
        self.channels += self.growth
        return [dense, ImprovementBlock(self.channels, self.growth, dilation)]


def _ratios(*pairs: tuple[int, int]) -> list[float]:
    # (channels out, channels in) of each transition -> divisor
    return [c_in / c_out for c_out, c_in in pairs]


def _melius(blocks, default_reduction, default_downsample, **kw):
    return _densenet(MeliusNet, blocks, default_reduction, default_downsample, **kw)


@register("meliusnet22", family="meliusnet")
def meliusnet22(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-22: blocks [4, 5, 4, 4], transitions 320->160, 480->224, 480->256."""
    return _melius(
        [4, 5, 4, 4],
        _ratios((160, 320), (224, 480), (256, 480)),
        DOWNSAMPLE,
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet29", family="meliusnet")
def meliusnet29(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-29: blocks [4, 6, 8, 6], transitions 320->128, 512->192, 704->256."""
    return _melius(
        [4, 6, 8, 6],
        _ratios((128, 320), (192, 512), (256, 704)),
        DOWNSAMPLE,
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet42", family="meliusnet")
def meliusnet42(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-42: blocks [5, 8, 14, 10], transitions 384->160, 672->256, 1152->416."""
    return _melius(
        [5, 8, 14, 10],
        _ratios((160, 384), (256, 672), (416, 1152)),
        DOWNSAMPLE,
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet59", family="meliusnet")
def meliusnet59(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-59: blocks [6, 12, 24, 12], transitions 448->192, 960->320, 1856->544."""
    return _melius(
        [6, 12, 24, 12],
        _ratios((192, 448), (320, 960), (544, 1856)),
        DOWNSAMPLE,
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet_a", family="meliusnet")
def meliusnet_a(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-A: blocks [4, 5, 5, 6], transitions 320->160, 480->256, 576->288, shuffle + 1x1 conv in 4 groups."""
    return _melius(
        [4, 5, 5, 6],
        _ratios((160, 320), (256, 480), (288, 576)),
        "bn,max_pool,relu,cs,fp_conv:4",
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet_b", family="meliusnet")
def meliusnet_b(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-B: blocks [4, 6, 8, 6], transitions 320->160, 544->224, 736->320, shuffle + 1x1 conv in 2 groups."""
    return _melius(
        [4, 6, 8, 6],
        _ratios((160, 320), (224, 544), (320, 736)),
        "bn,max_pool,relu,cs,fp_conv:2",
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet_c", family="meliusnet")
def meliusnet_c(*, reduction=None, growth_rate=64, init_features=64, downsample_structure=None, dilated=False, **kw):
    """MeliusNet-C: blocks [3, 5, 10, 6], transitions 256->128, 448->192, 832->288, shuffle + 1x1 conv in 4 groups."""
    return _melius(
        [3, 5, 10, 6],
        _ratios((128, 256), (192, 448), (288, 832)),
        "bn,max_pool,relu,cs,fp_conv:4",
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )


@register("meliusnet_flex", family="meliusnet")
def meliusnet_flex(
    *,
    block_config=None,
    reduction=None,
    growth_rate=64,
    init_features=64,
    downsample_structure=None,
    dilated=False,
    **kw,
):
    """MeliusNet with ``block_config`` (required) and reduction 2 per transition unless given."""
    if block_config is None:
        raise UserError("model meliusnet_flex needs --block-config, e.g. 4,5,4,4")
    blocks = positive_ints("--block-config", block_config)
    return _melius(
        blocks,
        [2.0] * (len(blocks) - 1),
        DOWNSAMPLE,
        reduction=reduction,
        downsample_structure=downsample_structure,
        growth_rate=growth_rate,
        init_features=init_features,
        dilated=dilated,
        **kw,
    )
