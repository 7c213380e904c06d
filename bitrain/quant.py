"""Quantizers: small autograd Functions plus a registry by name (minimal first version)."""

from __future__ import annotations

from typing import Callable

import torch

from bitrain.errors import UserError


class _DetSign(torch.autograd.Function):
    """sign(x) with 0 -> +1; straight-through gradient, cancelled where |x| > clip."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def det_sign(x: torch.Tensor, clip_threshold: float = float("inf")) -> torch.Tensor:
    return _DetSign.apply(x, clip_threshold)


QUANTIZERS: dict[str, Callable] = {"det_sign": det_sign, "ste_sign": det_sign, "sign": det_sign}


def get_quantizer(identifier: str | Callable | None) -> Callable | None:
    """Name, callable or None -> quantizer callable (None passes through)."""
    if identifier is None or callable(identifier):
        return identifier
    try:
        return QUANTIZERS[identifier]
    except KeyError:
        raise UserError(
            f"unknown quantizer {identifier!r}; valid: {', '.join(sorted(QUANTIZERS))}"
        ) from None
