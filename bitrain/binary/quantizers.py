"""Quantizers: small autograd Functions with hand-written gradients, plus registries by name.

Every registered quantizer has the signature ``fn(x, clip_threshold=inf, bits=1) -> Tensor``.
``clip_threshold`` is BMXNet's gradient cancel: the gradient is zero where ``|x| > t``
(``|x| == t`` still passes, as in larq's ``|x| <= clip_value``). It is folded into the
quantizer's own backward, so a 1-bit activation costs one elementwise pass forward and one
backward. 32-bit activations (``identity``, ``relu``, ``clip``, ``leaky_clip``, the
``approx_sign`` polynomial) are plain float functions: full precision means no gradient cancel.

Names: BMXNet (``det_sign``, ``sign_approx_sign``, ``round``, ``dorefa``), larq (``ste_sign``,
``approx_sign``, ``swish_sign``, ``ste_heaviside``, ``magnitude_aware_sign``, ``ste_tern``) and
bitorch (``sign``, ``approxsign``). ``get_quantizer`` resolves a name for a bit width and a
use (activation or weight). Two stateful quantizers (nn.Modules, in quant_schedule.py) follow bitorch:
``ProgressiveSign`` and ``QuantizerScheduler``; a trainer drives them with
``set_quantizer_epoch(model, epoch)`` at each epoch start (see its docstring).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitrain.errors import UserError
from bitrain.names import BITS

INF = float("inf")
Quantizer = Callable[..., torch.Tensor]


# --- gradient cancel -----------------------------------------------------------------------
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


def _cancel(grad: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """grad where |x| <= t, else 0 (t = inf: grad unchanged)."""
    if t == INF:
        return grad
    if torch.compiler.is_compiling() or x.dtype not in (torch.float32, torch.float64):
        return torch.where(x.abs() <= t, grad, 0.0)
    up = _next_up(float(t), x.dtype)
    return torch.ops.aten.hardtanh_backward(grad, x, -up, up)


def _sign(x: torch.Tensor) -> torch.Tensor:
    """+-1 with 0 (and -0.0) -> +1. Eager: copysign of 1 (x + 0.0 turns -0.0 into +0.0)."""
    if torch.compiler.is_compiling():
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return torch.copysign(x.new_ones(()), x + 0.0)


# --- 1-bit quantizers ------------------------------------------------------------------------


class _SteSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x)
        ctx.t = t
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _cancel(grad, x, ctx.t), None


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x)
        ctx.t = t
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        # Bi-Real: d/dx = 2 - 2|x| inside [-1, 1], 0 outside (clamp makes it 0 at |x| >= 1)
        g = grad * (2.0 - 2.0 * x.abs()).clamp_(min=0.0)
        return _cancel(g, x, ctx.t), None


class _SwishSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, beta):
        ctx.save_for_backward(x)
        ctx.t, ctx.beta = t, beta
        return _sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        b = ctx.beta
        bx = b * x  # BNN+ SignSwish derivative: b (2 - bx tanh(bx/2)) / (1 + cosh(bx))
        g = grad * (b * (2.0 - bx * torch.tanh(0.5 * bx)) / (1.0 + torch.cosh(bx)))
        return _cancel(g, x, ctx.t), None, None


class _SteValue(torch.autograd.Function):
    """Forward: a precomputed value; backward: straight-through with cancel (heaviside, tern)."""

    @staticmethod
    def forward(ctx, x, value, t):
        ctx.save_for_backward(x)
        ctx.t = t
        return value

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _cancel(grad, x, ctx.t), None, None


class _ScaledSign(torch.autograd.Function):
    """scale * sign(w) with the straight-through gradient scale * g (no cancel: weights)."""

    @staticmethod
    def forward(ctx, w, scale):
        ctx.scale = scale
        return torch.copysign(w.new_full((), scale), w + 0.0)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.scale == 1.0 else grad * ctx.scale), None


def scaled_sign(w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * det_sign(w)`` in one pass (the layers fold the offset's 1/2 into it)."""
    if torch.compiler.is_compiling():
        return det_sign(w) * scale
    return _ScaledSign.apply(w, scale)


def det_sign(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """sign(x) in {-1, +1} (0 -> +1); gradient: identity where |x| <= clip_threshold, else 0."""
    return _SteSign.apply(x, clip_threshold)


def approx_sign(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """sign(x); gradient 2 - 2|x| inside [-1, 1], 0 outside (Bi-Real ApproxSign)."""
    return _ApproxSign.apply(x, clip_threshold)


def swish_sign(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1, beta: float = 5.0) -> torch.Tensor:
    """sign(x); gradient of the SignSwish 2*sigmoid(bx)(1 + bx(1 - sigmoid(bx))) - 1 (BNN+, beta 5)."""
    return _SwishSign.apply(x, clip_threshold, beta)


def ste_heaviside(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """1 where x > 0, else 0 (larq); straight-through gradient with cancel."""
    return _SteValue.apply(x, (x > 0).to(x.dtype), clip_threshold)


def ste_tern(x: torch.Tensor, clip_threshold: float = INF, bits: int = 2, threshold: float = 0.05) -> torch.Tensor:
    """Ternary: sign(x) where |x| >= threshold (0.05 as larq), else 0; straight-through gradient."""
    value = torch.where(x.abs() >= threshold, _sign(x), torch.zeros((), dtype=x.dtype, device=x.device))
    return _SteValue.apply(x, value, clip_threshold)


def magnitude_aware_sign(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """alpha * sign(x), alpha = mean|x| per output channel (dim 0), stop-gradient on alpha.

    Gradient: alpha * grad where |x| <= clip_threshold (Bi-Real's magnitude-aware gradient).
    """
    alpha = (
        x.detach().abs().mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x.detach().abs().mean()
    )
    return det_sign(x, clip_threshold) * alpha


def round_half_up(p: torch.Tensor) -> torch.Tensor:
    """Round p >= 0 to the nearest integer, halves up (BMXNet's round), exactly: ``floor(p + 0.5)`` in
    float32 turns 0.49999997 into 1 because p + 0.5 rounds to 1.0; ``p - floor(p)`` is exact."""
    f = torch.floor(p)
    return f + (p - f >= 0.5).to(p.dtype)


# --- k-bit quantizers ------------------------------------------------------------------------


class _RoundSte(torch.autograd.Function):
    """round(clamp(x, 0, 1) * n) / n, n = 2^bits - 1, half away from zero (BMXNet round_ste)."""

    @staticmethod
    def forward(ctx, x, bits, t, clip_grad_to_unit):
        ctx.save_for_backward(x)
        ctx.t, ctx.unit = t, clip_grad_to_unit
        n = float(2**bits - 1)
        return round_half_up(x.clamp(0.0, 1.0) * n) / n

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ctx.unit:  # DoReFa / larq: the clip's own gradient, 1 inside [0, 1] only
            grad = torch.where((x >= 0) & (x <= 1), grad, 0.0)
        return _cancel(grad, x, ctx.t), None, None, None


def round_ste(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """k-bit round of clamp(x, 0, 1) with a straight-through gradient (bitorch Round)."""
    return _RoundSte.apply(x, bits, clip_threshold, False)


def dorefa(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """DoReFa activation: round(clip(x, 0, 1) * (2^k - 1)) / (2^k - 1); gradient 1 in [0, 1], else 0."""
    return _RoundSte.apply(x, bits, clip_threshold, True)


def dorefa_weight(w: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """DoReFa weight: tanh(w) / max|tanh(w)| mapped to [0, 1], k-bit rounded, mapped to [-1, 1].

    Gradient: (1 - tanh(w)^2) / max|tanh(w)| (straight through the rounding; the max is
    treated as a constant, as bitorch does).
    """
    n = float(2**bits - 1)
    th = torch.tanh(w)
    v = th / (2.0 * th.detach().abs().max()) + 0.5
    q = v + (round_half_up(v.detach() * n) / n - v.detach())
    return _cancel_closed(2.0 * q - 1.0, w, clip_threshold)


def _cancel_closed(y: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    # closed-form gradient cancel for composite quantizers: value of y, gradient masked
    if t == INF:
        return y
    keep = (x.detach().abs() <= t).to(y.dtype)
    return y * keep + (y * (1 - keep)).detach()


# --- 32-bit activations (BMXNet bits_a = 32) ---------------------------------------------------


def identity(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """x unchanged (full precision)."""
    return x


def relu(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """max(x, 0)."""
    return torch.relu(x)


def clip(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """hardtanh: clamp to [-1, 1]."""
    return torch.nn.functional.hardtanh(x)


def leaky_clip(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32, slope: float = 0.1) -> torch.Tensor:
    """x inside [-1, 1], slope * x outside (BMXNet's form: it jumps from 1 to 0.1 at |x| = 1)."""
    return torch.where(x.abs() <= 1.0, x, slope * x)


def approx_sign_poly(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """Bi-Real polynomial: 2x + x^2 on [-1, 0), 2x - x^2 on [0, 1), +-1 outside; grad 2 - 2|x|."""
    y = x.clamp(-1.0, 1.0)
    return 2.0 * y - y * y.abs()


# --- the registry: one record per quantizer ---------------------------------------------------

ONE_BIT, K_BIT, FULL = (1,), (1, 2, 3, 4, 5, 6, 7, 8), (32,)


@dataclass(frozen=True)
class QuantizerSpec:
    """Everything bitrain knows about one quantizer; every other module asks this record."""

    name: str
    fn: Quantizer  # the form below 32 bits (at 32 bits when ``bits`` is FULL only)
    bits: tuple[int, ...]  # the widths it accepts
    aliases: tuple[str, ...] = ()  # larq / bitorch / BMXNet names for the same function
    fp_fn: Quantizer | None = None  # the full-precision (32-bit activation) form, when it has one
    weight_fn: Quantizer | None = None  # the form for weights, when it differs (DoReFa's tanh form)
    plus_minus_one: bool = False  # output exactly {-1, +1}: pad with -1, xnor offset, packable to 1 bit
    ste_sign: bool = False  # the plain straight-through sign: weights take one fused scaled_sign pass
    scaled: bool = False  # output carries a magnitude (an export stores it as weight_scale)

    def resolve(self, bits: int, kind: str = "activation") -> Quantizer | None:
        """The function for ``bits`` and ``kind`` (activation or weight), or None when it does not fit."""
        if bits == 32:
            if 32 not in self.bits and self.fp_fn is None:
                return None
            if kind == "weight" and self.name != "identity":  # full-precision weights are the weights
                return None
            return self.fp_fn or self.fn
        if bits not in self.bits:
            return None
        return self.weight_fn if kind == "weight" and self.weight_fn is not None else self.fn


SPECS: tuple[QuantizerSpec, ...] = (
    QuantizerSpec("det_sign", det_sign, ONE_BIT, ("ste_sign", "sign"), plus_minus_one=True, ste_sign=True),
    QuantizerSpec(
        "approx_sign",
        approx_sign,
        ONE_BIT,
        ("sign_approx_sign", "approxsign"),
        fp_fn=approx_sign_poly,
        plus_minus_one=True,
    ),
    QuantizerSpec("swish_sign", swish_sign, ONE_BIT, ("swishsign",), plus_minus_one=True),
    QuantizerSpec("ste_heaviside", ste_heaviside, ONE_BIT, ("steheaviside",)),
    QuantizerSpec("magnitude_aware_sign", magnitude_aware_sign, ONE_BIT, scaled=True),
    QuantizerSpec("round", round_ste, K_BIT),
    QuantizerSpec("dorefa", dorefa, K_BIT, weight_fn=dorefa_weight),
    QuantizerSpec("ste_tern", ste_tern, (2,)),
    QuantizerSpec("identity", identity, FULL),
    QuantizerSpec("relu", relu, FULL),
    QuantizerSpec("clip", clip, FULL),
    QuantizerSpec("leaky_clip", leaky_clip, FULL),
)
#: every name (aliases included) -> its record
QUANTIZERS: dict[str, QuantizerSpec] = {n: q for q in SPECS for n in (q.name, *q.aliases)}
ALL_NAMES = frozenset(QUANTIZERS)
VALID_BITS = BITS


def spec(name: str) -> QuantizerSpec | None:
    """The record of a quantizer name (None for a callable or an unknown name)."""
    return QUANTIZERS.get(name) if isinstance(name, str) else None


def default_method(bits: int, kind: str = "activation") -> str:
    """BMXNet's default quantizer for a bit width: det_sign (1), round/dorefa (2-8), identity (32)."""
    if bits == 1:
        return "det_sign"
    if bits == 32:
        return "identity"
    return "round" if kind == "activation" else "dorefa"


def valid_methods(bits: int, kind: str = "activation") -> list[str]:
    """Names accepted for this bit width and use (activation or weight)."""
    return sorted(n for n, q in QUANTIZERS.items() if q.resolve(bits, kind) is not None)


def check_bits(bits: int, option: str = "bits") -> int:
    """bits in 1..8 or 32, else UserError naming the option."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise UserError(f"{option}={bits!r} is not supported; use 1..8 or 32 (32 = full precision)")
    return bits


def get_quantizer(identifier: str | Quantizer | None, bits: int = 1, kind: str = "activation") -> Quantizer | None:
    """Name, callable/module or None -> quantizer (None and callables pass through unchanged).

    A name resolves for ``bits`` and ``kind``: at 32 bits ``approx_sign`` is the polynomial
    activation, at 1 bit the sign with the Bi-Real gradient; ``dorefa`` for ``kind="weight"``
    is the tanh-normalised weight form. A k-bit quantizer comes back with ``bits`` as its default,
    so ``get_quantizer("dorefa", 2, "weight")(w)`` is 2-bit. Unknown names or a name that does not
    fit the bit width raise UserError listing the valid names.
    """
    if identifier is None or callable(identifier):
        return identifier
    if not isinstance(identifier, str) or identifier not in ALL_NAMES:
        raise UserError(f"unknown quantizer {identifier!r}; valid: {', '.join(sorted(ALL_NAMES))}")
    check_bits(bits)
    if identifier not in valid_methods(bits, kind):
        raise UserError(
            f"quantizer {identifier!r} does not fit {bits}-bit {kind}s; valid: {', '.join(valid_methods(bits, kind))}"
        )
    fn = QUANTIZERS[identifier].resolve(bits, kind)
    if 1 < bits < 32:  # the width asked for becomes the default, not the function's own bits=1
        return _with_default_bits(fn, bits)
    return fn


def _with_default_bits(fn: Quantizer, default: int) -> Quantizer:
    def quantizer(x: torch.Tensor, clip_threshold: float = INF, bits: int = default) -> torch.Tensor:
        return fn(x, clip_threshold, bits)

    quantizer.__name__ = quantizer.__qualname__ = f"{fn.__name__}_{default}bit"
    quantizer.__doc__ = fn.__doc__
    return quantizer
