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
from bitrain.models._registry import register
from bitrain.models.common import sliced_add
from bitrain.models.densenet import DenseLayer, DenseNetBase, dense_arch, dense_net, flex_blocks


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


def _ratios(*pairs: tuple[int, int]) -> tuple[float, ...]:
    # (channels out, channels in) of each transition -> divisor
    return tuple(c_in / c_out for c_out, c_in in pairs)


_SHUFFLE4 = "bn,max_pool,relu,cs,fp_conv:4"  # MeliusNet-A and -C: channel shuffle + 1x1 conv in 4 groups (-B: 2)


@register("meliusnet22", family="meliusnet", arch=dense_arch(_ratios((160, 320), (224, 480), (256, 480))))
def meliusnet22(**kw) -> nn.Module:
    """MeliusNet-22."""
    return dense_net(MeliusNet, [4, 5, 4, 4], kw)


@register("meliusnet29", family="meliusnet", arch=dense_arch(_ratios((128, 320), (192, 512), (256, 704))))
def meliusnet29(**kw) -> nn.Module:
    """MeliusNet-29."""
    return dense_net(MeliusNet, [4, 6, 8, 6], kw)


@register("meliusnet42", family="meliusnet", arch=dense_arch(_ratios((160, 384), (256, 672), (416, 1152))))
def meliusnet42(**kw) -> nn.Module:
    """MeliusNet-42."""
    return dense_net(MeliusNet, [5, 8, 14, 10], kw)


@register("meliusnet59", family="meliusnet", arch=dense_arch(_ratios((192, 448), (320, 960), (544, 1856))))
def meliusnet59(**kw) -> nn.Module:
    """MeliusNet-59."""
    return dense_net(MeliusNet, [6, 12, 24, 12], kw)


@register("meliusnet_a", family="meliusnet", arch=dense_arch(_ratios((160, 320), (256, 480), (288, 576)), _SHUFFLE4))
def meliusnet_a(**kw) -> nn.Module:
    """MeliusNet-A."""
    return dense_net(MeliusNet, [4, 5, 5, 6], kw)


@register(
    "meliusnet_b",
    family="meliusnet",
    arch=dense_arch(_ratios((160, 320), (224, 544), (320, 736)), "bn,max_pool,relu,cs,fp_conv:2"),
)
def meliusnet_b(**kw) -> nn.Module:
    """MeliusNet-B."""
    return dense_net(MeliusNet, [4, 6, 8, 6], kw)


@register("meliusnet_c", family="meliusnet", arch=dense_arch(_ratios((128, 256), (192, 448), (288, 832)), _SHUFFLE4))
def meliusnet_c(**kw) -> nn.Module:
    """MeliusNet-C."""
    return dense_net(MeliusNet, [3, 5, 10, 6], kw)


@register("meliusnet_flex", family="meliusnet", arch=dense_arch(reduction=None, block_config=None))
def meliusnet_flex(*, block_config, **kw) -> nn.Module:
    """MeliusNet with ``block_config`` (required); reduction 2 per transition unless given."""
    return dense_net(MeliusNet, flex_blocks("meliusnet_flex", block_config, "4,5,4,4"), kw)
