"""Pieces the literature models share (larq zoo's Bi-Real, XNOR, DoReFa, AlexNet, Real-to-Binary; ReActNet).

These models fix their own quantizers (Bi-Real: approx_sign inputs, magnitude-aware weights; ...). ``own``
gives a layer its model's quantizer while the configured width takes it, and the configured default
otherwise, so ``bits=32, bits_a=32`` still builds the float twin. ``keras_bn`` is Keras' BatchNormalization
with its momentum, epsilon and ``scale`` option; ``ZooQuantizer`` names a weight quantizer a model defines for
itself; ``max_pool`` is TF's 3x3/2 pool, padded once a map is too
small for it so that 8 px inputs build.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.geometry import conv_out_size
from bitrain.binary.layers import get_layer_config
from bitrain.binary.quantizers import Quantizer, valid_methods
from bitrain.binary.react import LearnableBias
from bitrain.errors import UserError


def own(method: str | Quantizer, kind: str = "activation") -> str | Quantizer | None:
    """``method`` for a layer built now if the configured width of ``kind`` (bits_a for activations, bits for
    weights) is below 32 and takes it (a callable weight quantizer: 1-bit weights only), else None."""
    cfg = get_layer_config()
    bits = cfg.bits_a if kind == "activation" else cfg.bits
    if bits == 32:
        return None
    if callable(method):
        return method if bits == 1 else None
    return method if method in valid_methods(bits, kind) else None


class BatchNormNoScale(nn.Module):
    """Keras ``BatchNormalization(scale=False)``: normalise, then add a learnt per-channel beta (no gamma).

    State dict keys: ``norm.running_mean``, ``norm.running_var``, ``norm.num_batches_tracked``, ``shift.bias``.
    """

    def __init__(self, channels: int, *, eps: float, momentum: float, dim: int = 2) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        self.norm = norm(channels, eps=eps, momentum=momentum, affine=False)
        self.shift = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(self.norm(x))


def keras_bn(channels: int, momentum: float = 0.99, eps: float = 1e-3, *, scale: bool = True, dim: int = 2):
    """Keras ``BatchNormalization(momentum, epsilon, scale)`` (defaults 0.99, 1e-3): torch's momentum is 1 - Keras'."""
    torch_momentum = round(1.0 - momentum, 6)
    if not scale:
        return BatchNormNoScale(channels, eps=eps, momentum=torch_momentum, dim=dim)
    norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    return norm(channels, eps=eps, momentum=torch_momentum)


def max_pool(size: int, same: bool) -> tuple[nn.Module, int]:
    """TF's 3x3/2 max pool on a ``size`` px map, 'same' (pad 1) or 'valid' (no pad), and the size after it.

    A 'valid' pool on a map under 3 px would leave nothing: it pads instead (only below the published input
    sizes). 'same' pads both sides where TF pads right/bottom on even maps: same sizes, windows one pixel over.
    """
    pad = 1 if same or size < 3 else 0
    return nn.MaxPool2d(3, 2, pad), conv_out_size(size, 3, 2, pad)


class ZooQuantizer:
    """A weight quantizer one model defines for itself (as larq zoo does), called as ``fn(w)`` and shown by name."""

    def __init__(self, name: str, fn: Quantizer) -> None:
        self.name, self.fn = name, fn

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return self.fn(w)

    def __repr__(self) -> str:
        return self.name


def check_stem(model: str, initial_layers: str) -> None:
    """These models have their own stem (``imagenet``) and the one-conv stem for small inputs (``thumbnail``)."""
    if initial_layers not in ("imagenet", "thumbnail"):
        raise UserError(f"--initial-layers {initial_layers}: {model} takes imagenet or thumbnail (below 50 px)")
