"""``LayerSettings``: what a packed layer needs to be recomputed exactly, frozen; the export's ``layers``
metadata holds one per packed layer as JSON (``to_json`` / ``from_json``, the file format unchanged)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from bitrain.binary.layers import QConv2d

_CONV_ONLY = ("stride", "padding", "dilation", "groups")  # keys a QLinear's JSON does not have


@dataclass(frozen=True)
class LayerSettings:
    """A 1-bit QConv2d / QLinear's quantization settings and geometry (``docs/export.md``'s ``layers``)."""

    type: str  # "QConv2d" or "QLinear"
    shape: tuple[int, ...]  # the float weight's shape
    bits: int
    bits_a: int
    weight_quantization: str
    activation_method: str
    clip_threshold: float
    approximation: str  # "", "xnor" or "binet"
    no_offset: bool
    offset: bool  # the layer applies (dot + fan_in) / 2
    bias: bool
    pad_value: float = -1.0  # QConv2d's pad value (QLinear: -1, unused)
    xnor_inputs: bool = False  # +-1 inputs padded with -1: xnor-popcount takes them as they are
    stride: tuple[int, int] = (1, 1)  # the conv-only fields; a QLinear keeps the defaults
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def is_conv(self) -> bool:
        return self.type == "QConv2d"

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """(kh, kw) of a conv; () for a linear layer."""
        return self.shape[2:]

    @classmethod
    def from_layer(cls, layer: nn.Module) -> LayerSettings:
        """The settings of a binary QConv2d / QLinear as its forward uses them."""
        pad_value = float(getattr(layer, "pad_value", -1.0))  # QConv2d's (default -1); QLinear has no padding
        conv = {}
        if isinstance(layer, QConv2d):
            conv = dict(
                stride=tuple(layer.stride),
                padding=tuple(layer.qpadding),
                dilation=tuple(layer.dilation),
                groups=layer.groups,
            )
        return cls(
            type=type(layer).__name__,
            shape=tuple(layer.weight.shape),
            bits=layer.bits,
            bits_a=layer.bits_a,
            weight_quantization=str(layer.weight_quantization),
            activation_method=str(layer.act.method),
            clip_threshold=float(layer.act.clip_threshold),
            approximation=layer.approximation,
            no_offset=bool(layer.no_offset),
            offset=bool(layer.apply_offset),
            bias=layer.bias is not None,
            pad_value=pad_value,
            # xnor-popcount needs det_sign's +-1 inputs padded with -1 (a +1 pad, QuickNet's, takes the float path)
            xnor_inputs=layer.act.plus_minus_one and pad_value == -1.0,
            **conv,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerSettings:
        """From an export's ``layers`` entry (older files may lack pad_value and groups: their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The export's ``layers`` entry: lists for tuples; the conv-only keys for a conv only."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.is_conv:
            for key in _CONV_ONLY:
                del data[key]
        return data
