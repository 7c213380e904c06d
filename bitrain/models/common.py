"""Pieces shared by the model families: stems, weight init, option parsing, small blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.errors import UserError, parse_list
from bitrain.names import INITIALIZATIONS, STEMS

THUMBNAIL_BELOW = 50  # px: inputs smaller than this get the one-conv stem (BMXNet's cifar/mnist rule)


def resolve_stem(initial_layers: str, image_size: int) -> str:
    """Validate ``--initial-layers``; the default ``imagenet`` becomes ``thumbnail`` below 50 px."""
    if initial_layers not in STEMS:
        raise UserError(f"--initial-layers: unknown value {initial_layers!r}; valid: {', '.join(STEMS)}")
    if initial_layers == "imagenet" and image_size < THUMBNAIL_BELOW:
        return "thumbnail"
    return initial_layers


def make_stem(variant: str, in_channels: int, channels: int) -> list[nn.Module]:
    """Full-precision first layers (BMXNet ``add_initial_layers``).

    imagenet: 7x7/2 conv, BN, ReLU, 3x3/2 max pool (224 -> 56).
    grouped_stem: 3x3/2 conv to channels/2, then 3x3 convs with 4 and 8 groups, BN, ReLU, max pool (224 -> 56).
    thumbnail: one 3x3/1 conv, no pool (for 8-32 px inputs).
    """
    if variant == "thumbnail":
        return [nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)]
    if variant == "imagenet":
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False)]
    elif variant == "grouped_stem":
        if channels % 16:
            raise UserError(f"--initial-layers grouped_stem needs a multiple of 16 stem channels, got {channels}")
        half = channels // 2
        layers = [
            nn.Conv2d(in_channels, half, 3, 2, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, groups=4, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, channels, 3, 1, 1, groups=8, bias=False),
        ]
    else:
        raise UserError(f"--initial-layers: unknown value {variant!r}; valid: {', '.join(STEMS)}")
    return layers + [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]


def resnet_features(
    stages: list[nn.Module], *, in_channels: int, channels: Sequence[int], version: int, initial_layers: str
) -> nn.Sequential:
    """BMXNet's ResNet body around the stages (binary ResNet and ResNetE alike): input BatchNorm
    (no affine: BMXNet's input normaliser), stem, [BN after the stem: v1 with a pooled stem],
    the stages, [BN: v2], ReLU. ``channels``: stem width, then stage widths."""
    feats: list[nn.Module] = [nn.BatchNorm2d(in_channels, affine=False)]
    feats += make_stem(initial_layers, in_channels, channels[0])
    if version == 1 and initial_layers != "thumbnail":
        feats.append(nn.BatchNorm2d(channels[0]))
    feats += stages
    if version == 2:
        feats.append(nn.BatchNorm2d(channels[-1]))
    feats.append(nn.ReLU(inplace=True))
    return nn.Sequential(*feats)


def head(channels: int, num_classes: int) -> list[nn.Module]:
    """Global average pool + full-precision classifier; adaptive, so any final map size works."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: (N, g*c, H, W) -> interleave the g groups."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def sliced_add(residual: torch.Tensor, x: torch.Tensor, start: int) -> torch.Tensor:
    """Add ``x`` (C' channels) onto channels [start, start + C') of ``residual``, keep the rest."""
    end = start + x.shape[1]
    parts = [residual[:, :start], residual[:, start:end] + x, residual[:, end:]]
    return torch.cat([p for p in parts if p.shape[1]], dim=1)


def shortcut_pool(stride: int) -> nn.Module:
    """Average pool for a strided shortcut; ceil mode gives the same size as a padded 3x3/stride conv."""
    return nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)


def check_groups(option: str, groups: int, *channels: int) -> None:
    if groups < 1 or any(c % groups for c in channels):
        raise UserError(f"{option} {groups}: must be >= 1 and divide the channel counts {channels}")


def positive_floats(option: str, value: str | Sequence[float], count: int | None = None) -> list[float]:
    """'2,2.5,3' or [2, 2.5, 3] -> floats > 0 (exactly ``count`` of them if given)."""
    out = parse_list(option, value, float)
    if not out or any(v <= 0 for v in out) or (count is not None and len(out) != count):
        need = f"{count} " if count is not None else ""
        raise UserError(f"{option}: expected {need}numbers > 0 (one per transition), got {value!r}")
    return out


def positive_ints(option: str, value: str | Sequence[int]) -> list[int]:
    """'6,6,6,5' or [6, 6, 6, 5] -> positive ints."""
    out = parse_list(option, value, int)
    if not out or any(v < 1 for v in out):
        raise UserError(f"{option}: expected positive integers, got {value!r}")
    return out


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    # MXNet convention: fan_in = in/groups * kh * kw, fan_out = out * kh * kw
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@torch.no_grad()
def init_weights(model: nn.Module, method: str) -> None:
    """BMXNet ``--initialization`` for every trainable conv / linear weight; biases 0, BN gamma 1 beta 0.

    gaussian: Xavier(gaussian, in, 2) = N(0, 2/fan_in); default: Xavier(uniform, avg, 2);
    msraprelu_avg / msraprelu_in: MSRAPrelu (gaussian, magnitude 2/(1+0.25^2), factor avg / in).
    """
    if method not in INITIALIZATIONS:
        raise UserError(f"--initialization: unknown value {method!r}; valid: {', '.join(INITIALIZATIONS)}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad:
            fan_in, fan_out = _fans(m.weight)
            factor = fan_in if method in ("gaussian", "msraprelu_in") else (fan_in + fan_out) / 2
            magnitude = 2.0 if method in ("gaussian", "default") else 2.0 / (1 + 0.25**2)
            scale = math.sqrt(magnitude / factor)
            if method == "default":
                m.weight.uniform_(-scale, scale)
            else:
                m.weight.normal_(0.0, scale)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.fill_(1.0)
            m.bias.zero_()


def padded_same_maxpool(x: torch.Tensor) -> torch.Tensor:
    """2x2 / stride 1 max pool that keeps H, W (pads right/bottom with -inf, like TF 'same')."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 2, 1)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(binary, float) parameter counts: weights of layers with ``bits == 1`` are binary, the rest float."""
    binary = sum(
        m.weight.numel()
        for m in model.modules()
        if getattr(m, "bits", None) == 1 and isinstance(getattr(m, "weight", None), torch.Tensor)
    )
    return binary, sum(p.numel() for p in model.parameters()) - binary


def model_size_bytes(model: nn.Module) -> float:
    """Stored size: 1 bit per binary weight, 4 bytes per float parameter (BMXNet / larq convention)."""
    binary, floating = param_counts(model)
    return binary / 8 + floating * 4
