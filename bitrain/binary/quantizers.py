"""Quantizers: small autograd Functions with hand-written gradients, plus registries by name.

Every registered quantizer has the signature ``fn(x, clip_threshold=inf, bits=1) -> Tensor``.
``clip_threshold`` is BMXNet's gradient cancel (``ste.py``): the gradient is zero where ``|x| > t``.
It is folded into the 1-bit quantizers' own backward, so a 1-bit activation costs one elementwise
pass forward and one backward. 32-bit activations (``identity``, ``relu``, ``clip``, ``leaky_clip``,
the ``approx_sign`` polynomial) are plain float functions: full precision means no gradient cancel.
The k-bit quantizers live in ``kbit.py``.

Each name has its own library's semantics (``docs/parity.md`` lists what is checked and every
deliberate difference): BMXNet (``det_sign``, ``sign_approx_sign``, ``round``, ``dorefa``, and the
32-bit ``clip``, ``leaky_clip``, ``approx_sign``), larq (``ste_sign``, ``approx_sign``, ``swish_sign``,
``ste_heaviside`` 0/1, ``magnitude_aware_sign``, ``ste_tern``, ``dorefa_quantizer``) and bitorch
(``sign``, ``approxsign``, ``swishsign``, ``steheaviside`` -1/+1). ``get_quantizer`` resolves a name
for a bit width and a use (activation or weight). Two stateful quantizers (nn.Modules, in
``schedule.py``) follow bitorch: ``ProgressiveSign`` and ``QuantizerScheduler``; a trainer drives them
with ``set_quantizer_epoch(model, epoch)`` at each epoch start (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bitrain.binary.kbit import dorefa, dorefa_quantizer, dorefa_quantizer_weights, round_half_up, round_ste
from bitrain.binary.layer_config import check_bits
from bitrain.binary.ste import INF, grad_cancel
from bitrain.binary.ste import cancel as _cancel
from bitrain.binary.ste import sign as _sign
from bitrain.errors import UserError
from bitrain.names import BITS, QUANTIZER_NAMES, QUANTIZERS_BY_NAME, default_quantizer, fits, quantizers_for

__all__ = ["INF", "check_bits", "dorefa", "dorefa_quantizer", "dorefa_quantizer_weights", "round_half_up", "round_ste"]
Quantizer = Callable[..., torch.Tensor]


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
    """larq ``ste_heaviside``: 1 where x > 0, else 0; straight-through gradient with cancel."""
    return _SteValue.apply(x, (x > 0).to(x.dtype), clip_threshold)


def steheaviside(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """bitorch ``steheaviside``: +1 where x > 0, else -1 (0 -> -1); gradient passed where |x| <= 1
    (bitorch's own bound) and |x| <= clip_threshold."""
    value = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    return _SteValue.apply(x, value, min(float(clip_threshold), 1.0))


def ste_tern(x: torch.Tensor, clip_threshold: float = INF, bits: int = 2, threshold: float = 0.05) -> torch.Tensor:
    """Ternary: sign(x) where |x| >= threshold (0.05 as larq), else 0; straight-through gradient."""
    value = torch.where(x.abs() >= threshold, _sign(x), torch.zeros((), dtype=x.dtype, device=x.device))
    return _SteValue.apply(x, value, clip_threshold)


def _mean_abs_per_channel(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    # larq: mean |x| over every axis but the channel axis (its last); a 1-D tensor is all channel axis
    if x.dim() < 2:
        return x.detach().abs()
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    return x.detach().abs().mean(dim=dims, keepdim=True)


def magnitude_aware_sign(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """larq ``MagnitudeAwareSign`` on an activation: alpha * sign(x), alpha = mean|x| per channel (dim 1 of
    NCHW / NC: over the batch and the positions, as larq's NHWC mean over all axes but the last),
    stop-gradient on alpha. Gradient: alpha * grad where |x| <= clip_threshold."""
    return det_sign(x, clip_threshold) * _mean_abs_per_channel(x, 1)


def magnitude_aware_sign_weight(w: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """``magnitude_aware_sign`` on a weight: alpha = mean|W| per output channel (dim 0), stop-gradient
    (larq's kernel mean over all axes but the output channel; Bi-Real's magnitude-aware sign)."""
    return det_sign(w, clip_threshold) * _mean_abs_per_channel(w, 0)


# --- 32-bit activations (BMXNet bits_a = 32) ---------------------------------------------------
# BMXNet's QActivation cancels the gradient before every activation, 32-bit ones included; so do these,
# but ``identity``: the full-precision pass-through, so that bits = bits_a = 32 is exactly nn.Conv2d.


def identity(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """x unchanged (full precision, no gradient cancel)."""
    return x


def relu(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """max(x, 0) after the gradient cancel."""
    return torch.relu(grad_cancel(x, clip_threshold))


def clip(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """BMXNet ``clip``: clamp to [-1, 1], gradient 1 on [-1, 1] with both edges (MXNet's clip_grad)."""
    return grad_cancel(x, clip_threshold).clamp(-1.0, 1.0)


def leaky_clip(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32, slope: float = 0.1) -> torch.Tensor:
    """x inside [-1, 1], slope * x outside (BMXNet's form: it jumps from 1 to 0.1 at |x| = 1)."""
    x = grad_cancel(x, clip_threshold)
    return torch.where(x.abs() <= 1.0, x, slope * x)


def approx_sign_poly(x: torch.Tensor, clip_threshold: float = INF, bits: int = 32) -> torch.Tensor:
    """Bi-Real polynomial: 2x + x^2 on [-1, 0), 2x - x^2 on [0, 1), +-1 outside; grad 2 - 2|x|."""
    y = grad_cancel(x, clip_threshold).clamp(-1.0, 1.0)
    return 2.0 * y - y * y.abs()


# --- the registry: one record per quantizer ---------------------------------------------------


@dataclass(frozen=True)
class QuantizerSpec:
    """Everything bitrain knows about one quantizer; every other module asks this record. Its names and
    widths are its row in ``bitrain.names.QUANTIZER_NAMES`` (torch-free, so the command line reads them)."""

    name: str
    fn: Quantizer  # the form below 32 bits (at 32 bits when 32 is its only width)
    fp_fn: Quantizer | None = None  # the full-precision (32-bit activation) form, when it also takes 32
    weight_fn: Quantizer | None = None  # the form for weights, when it differs (per output channel, larq's DoReFa)
    # det_sign's +-1 (0 -> +1): the xnor offset on weights; an input the export packs as sign bits
    plus_minus_one: bool = False
    ste_sign: bool = False  # the plain straight-through sign: weights take one fused scaled_sign pass
    scaled: bool = False  # output carries a magnitude (an export stores it as weight_scale)
    sign_forward: bool = False  # forward is exactly _sign (0, -0.0 -> +1): the packed kernel signs while packing

    @property
    def bits(self) -> tuple[int, ...]:
        """The widths it accepts (``bitrain.names``)."""
        return QUANTIZERS_BY_NAME[self.name].bits

    @property
    def aliases(self) -> tuple[str, ...]:
        """larq / bitorch / BMXNet names for the same function (``bitrain.names``)."""
        return QUANTIZERS_BY_NAME[self.name].aliases

    def resolve(self, bits: int, kind: str = "activation") -> Quantizer | None:
        """The function for ``bits`` and ``kind`` (activation or weight), or None when it does not fit."""
        if not fits(self.name, bits, kind):
            return None
        if bits == 32:
            return self.fp_fn or self.fn
        return self.weight_fn if kind == "weight" and self.weight_fn is not None else self.fn


SPECS: tuple[QuantizerSpec, ...] = (
    QuantizerSpec("det_sign", det_sign, plus_minus_one=True, ste_sign=True, sign_forward=True),
    QuantizerSpec("approx_sign", approx_sign, fp_fn=approx_sign_poly, plus_minus_one=True, sign_forward=True),
    QuantizerSpec("swish_sign", swish_sign, plus_minus_one=True, sign_forward=True),
    QuantizerSpec("ste_heaviside", ste_heaviside),
    QuantizerSpec("steheaviside", steheaviside),  # +-1, but 0 -> -1: not det_sign's
    QuantizerSpec("magnitude_aware_sign", magnitude_aware_sign, weight_fn=magnitude_aware_sign_weight, scaled=True),
    QuantizerSpec("round", round_ste),
    QuantizerSpec("dorefa", dorefa),
    QuantizerSpec("dorefa_quantizer", dorefa_quantizer, weight_fn=dorefa_quantizer_weights),
    QuantizerSpec("ste_tern", ste_tern),
    QuantizerSpec("identity", identity),
    QuantizerSpec("relu", relu),
    QuantizerSpec("clip", clip),
    QuantizerSpec("leaky_clip", leaky_clip),
)
if [q.name for q in SPECS] != [q.name for q in QUANTIZER_NAMES]:  # one spec per row of the names, in order
    raise RuntimeError("bitrain.binary.quantizers.SPECS and bitrain.names.QUANTIZER_NAMES list different quantizers")
#: every name (aliases included) -> its record
QUANTIZERS: dict[str, QuantizerSpec] = {n: q for q in SPECS for n in (q.name, *q.aliases)}
ALL_NAMES = frozenset(QUANTIZERS)
VALID_BITS = BITS
default_method = default_quantizer  # BMXNet's default for a width (bitrain.names)
valid_methods = quantizers_for  # the names that fit a width and a use (bitrain.names)


def spec(name: str) -> QuantizerSpec | None:
    """The record of a quantizer name (None for a callable or an unknown name)."""
    return QUANTIZERS.get(name) if isinstance(name, str) else None


def get_quantizer(identifier: str | Quantizer | None, bits: int = 1, kind: str = "activation") -> Quantizer | None:
    """Name, callable/module or None -> quantizer (None and callables pass through unchanged).

    A name resolves for ``bits`` and ``kind``: at 32 bits ``approx_sign`` is the polynomial
    activation, at 1 bit the sign with the Bi-Real gradient; ``dorefa_quantizer`` and
    ``magnitude_aware_sign`` have a weight form for ``kind="weight"``. A k-bit quantizer comes back with ``bits`` as its default,
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
