"""Nets for small inputs: ``tiny_resnet_e`` (digits 8x8, the default run) and ``small_resnet_e``
(28-32 px: MNIST, Fashion-MNIST; the fashion_mnist recipe).

A ResNetE / Bi-Real-style net in miniature: a full-precision 3x3 stem, binary 3x3 convs each
wrapped by a full-precision shortcut, BatchNorm after every conv, one downsampling stage with a
full-precision (avg-pool + 1x1 conv) shortcut, global average pool and a full-precision
classifier. About 0.2 M parameters, nearly all of them binary. ``small_resnet_e`` is the same design
at 64/128/256 channels in three stages of two blocks (the first stage strided): 1.2 M parameters,
95 % of its multiply-accumulates binary at 28 px.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.geometry import conv_out_size
from bitrain.binary.layers import QConv2d
from bitrain.binary.react import LearnableBias, RPReLU
from bitrain.models._registry import register


class BasicBlockE(nn.Module):
    """y = BN(QConv3x3(x)) + shortcut(x): every binary conv has a full-precision shortcut.

    ``react``: ReActNet's block, y = RPReLU(BN(QConv3x3(x + b)) + shortcut(x)): a learnt threshold per
    input channel for the conv's sign (RSign) and a learnt nonlinearity after the add (RPReLU).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, react: bool = False) -> None:
        super().__init__()
        conv = [QConv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(LearnableBias(c_in), *conv) if react else nn.Sequential(*conv)
        self.act: nn.Module = RPReLU(c_out) if react else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def residual_parts(self) -> tuple[str, str | None] | None:
        """("body", "shortcut" or None for the identity) without ``react``: then the block is ``body(x) +
        shortcut(x)``, for the packed model's fused units (``bitrain.deploy.fused``); None with RPReLU."""
        if not isinstance(self.act, nn.Identity):
            return None
        return "body", None if isinstance(self.shortcut, nn.Identity) else "shortcut"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@register("tiny_resnet_e", family="small", image_size=8)
def tiny_resnet_e(
    *, num_classes: int, in_channels: int, image_size: int, initial_layers: str = "thumbnail", width: int = 32
) -> nn.Module:
    """Stem 3x3 -> 2 blocks at ``width`` -> 2 blocks at 2*width (stride 2) -> pool -> linear."""
    w = width
    stride = 2 if image_size >= 8 else 1
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        BasicBlockE(w, w),
        BasicBlockE(w, w),
        BasicBlockE(w, 2 * w, stride),
        BasicBlockE(2 * w, 2 * w),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )


@register("small_resnet_e", family="small", image_size=28)
def small_resnet_e(
    *, num_classes: int, in_channels: int, image_size: int, initial_layers: str = "thumbnail", width: int = 64
) -> nn.Module:
    """Stem 3x3 -> 2 blocks at ``width`` (the first with stride 2) -> 2 at 2*width (stride 2) -> 2 at 4*width
    (stride 2) -> ReLU -> pool -> linear. 28 px: 14, 7, 4 px maps."""
    return _small(num_classes, in_channels, image_size, width, react=False)


@register("small_reactnet", family="small", image_size=28)
def small_reactnet(
    *, num_classes: int, in_channels: int, image_size: int, initial_layers: str = "thumbnail", width: int = 64
) -> nn.Module:
    """``small_resnet_e`` with ReActNet's blocks (RSign thresholds, RPReLU after each shortcut add)."""
    return _small(num_classes, in_channels, image_size, width, react=True)


def _small(num_classes: int, in_channels: int, image_size: int, w: int, react: bool) -> nn.Module:
    blocks: list[nn.Module] = []
    c, size = w, image_size
    for c_out in (w, 2 * w, 4 * w):
        stride = 2 if size >= 4 else 1  # no stride once a map would drop below 2 px
        blocks += [BasicBlockE(c, c_out, stride, react), BasicBlockE(c_out, c_out, react=react)]
        c, size = c_out, conv_out_size(size, 3, stride, 1)  # the block's first conv: 3x3, padding 1
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        *blocks,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, num_classes),
    )
