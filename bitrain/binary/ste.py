"""Straight-through pieces every quantizer shares: BMXNet's gradient cancel and the never-zero sign.

``clip_threshold`` is BMXNet's ``gradcancel``: the gradient is zero where ``|x| > t``; ``|x| == t``
still passes (BMXNet's ``fabs(x) <= threshold``, larq's ``|x| <= clip_value``).
"""

from __future__ import annotations

import math
import struct

import torch

INF = float("inf")

# Eager: aten.hardtanh_backward is one fused pass, but it zeroes the gradient at x == +-bound
# exactly; we want |x| <= t to pass, so the bound is the next float above t in x's dtype.
# Compiled: inductor fuses the plain where() into the surrounding kernel anyway.
_NEXT_UP: dict[tuple[float, torch.dtype], float] = {}


def _next_up(t: float, dtype: torch.dtype) -> float:
    key = (t, dtype)
    if key not in _NEXT_UP:
        if dtype == torch.float64:
            _NEXT_UP[key] = math.nextafter(t, INF)
        elif t >= torch.finfo(torch.float32).max:
            _NEXT_UP[key] = INF
        else:  # float32: comparisons happen in float32, so step one float32 ulp above fl32(t)
            (i,) = struct.unpack("<I", struct.pack("<f", t))
            _NEXT_UP[key] = struct.unpack("<f", struct.pack("<I", i + 1))[0]
    return _NEXT_UP[key]


def cancel(grad: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """grad where |x| <= t, else 0 (t = inf: grad unchanged). For a backward that has x at hand."""
    if t == INF:
        return grad
    if torch.compiler.is_compiling() or x.dtype not in (torch.float32, torch.float64):
        return torch.where(x.abs() <= t, grad, 0.0)
    up = _next_up(float(t), x.dtype)
    return torch.ops.aten.hardtanh_backward(grad, x, -up, up)


class _GradCancel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x)
        ctx.t = t
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return cancel(grad, x, ctx.t), None


def grad_cancel(x: torch.Tensor, t: float) -> torch.Tensor:
    """BMXNet's ``contrib.gradcancel``: x unchanged, its gradient zeroed where |x| > t."""
    return x if t == INF else _GradCancel.apply(x, t)


def sign(x: torch.Tensor) -> torch.Tensor:
    """+-1 with 0 (and -0.0) -> +1. Eager: copysign of 1 (x + 0.0 turns -0.0 into +0.0)."""
    if torch.compiler.is_compiling():
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return torch.copysign(x.new_ones(()), x + 0.0)
