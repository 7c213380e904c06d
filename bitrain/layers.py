"""Quantized layers: QActivation, QConv2d, QLinear and the layer-config context (minimal first version)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.quant import get_quantizer


@dataclass(frozen=True)
class LayerConfig:
    bits: int = 1
    bits_a: int = 1
    activation_method: str = "det_sign"
    weight_quantization: str = "det_sign"
    clip_threshold: float = 1.0
    approximation: str = ""
    no_offset: bool = False


_CONFIG = [LayerConfig()]


def get_layer_config() -> LayerConfig:
    return _CONFIG[-1]


@contextlib.contextmanager
def binary_layer_config(**overrides) -> Iterator[LayerConfig]:
    """Layers built inside the block take these defaults (BMXNet set_binary_layer_config)."""
    cfg = dataclasses.replace(get_layer_config(), **{k: v for k, v in overrides.items() if v is not None})
    _CONFIG.append(cfg)
    try:
        yield cfg
    finally:
        _CONFIG.pop()


class QActivation(nn.Module):
    def __init__(self, bits: int | None = None, clip_threshold: float | None = None, method: str | None = None):
        super().__init__()
        cfg = get_layer_config()
        self.bits = cfg.bits_a if bits is None else bits
        self.clip_threshold = cfg.clip_threshold if clip_threshold is None else clip_threshold
        self.method = cfg.activation_method if method is None else method
        self._q = get_quantizer(self.method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 32:
            return x
        return self._q(x, self.clip_threshold)


class QConv2d(nn.Conv2d):
    """nn.Conv2d whose forward quantizes input (bits_a) and weight (bits)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, *, bits=None, bits_a=None, weight_quantization=None, activation_method=None,
                 clip_threshold=None, approximation=None, no_offset=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        cfg = get_layer_config()
        self.bits = cfg.bits if bits is None else bits
        self.bits_a = cfg.bits_a if bits_a is None else bits_a
        self.weight_quantization = cfg.weight_quantization if weight_quantization is None else weight_quantization
        self.approximation = cfg.approximation if approximation is None else approximation
        self.no_offset = cfg.no_offset if no_offset is None else no_offset
        self.qpadding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.act = QActivation(self.bits_a, clip_threshold, activation_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        pad_value = -1.0 if self.bits_a == 1 else 0.0
        if any(self.qpadding):
            ph, pw = self.qpadding
            x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
        w = self.weight if self.bits == 32 else get_quantizer(self.weight_quantization)(self.weight, float("inf"))
        return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)


class QLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=False, *, bits=None, bits_a=None, weight_quantization=None,
                 activation_method=None, clip_threshold=None, approximation=None, no_offset=None):
        super().__init__(in_features, out_features, bias)
        cfg = get_layer_config()
        self.bits = cfg.bits if bits is None else bits
        self.bits_a = cfg.bits_a if bits_a is None else bits_a
        self.weight_quantization = cfg.weight_quantization if weight_quantization is None else weight_quantization
        self.approximation = cfg.approximation if approximation is None else approximation
        self.no_offset = cfg.no_offset if no_offset is None else no_offset
        self.act = QActivation(self.bits_a, clip_threshold, activation_method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        w = self.weight if self.bits == 32 else get_quantizer(self.weight_quantization)(self.weight, float("inf"))
        return F.linear(x, w, self.bias)
