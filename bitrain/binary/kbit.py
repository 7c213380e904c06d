"""k-bit quantizers: BMXNet's ``round`` and ``dorefa``, larq's ``dorefa_quantizer``; n = 2^bits - 1.

BMXNet v2 (``gluon/nn/binary_layers.py``, after ``gradcancel`` for activations):

* ``round``: ``round_ste(clip(x, 0, 1) * n) / n``. Gradient: the clip's, 1 on [0, 1] with both edges
  (MXNet's ``clip_grad``), 0 outside, through ``* n``, ``round_ste`` (identity) and ``/ n``.
* ``dorefa``, one function for activations and weights: ``2 round_ste(v * n) / n - 1`` with
  ``v = 0.5 tanh(x) / max|tanh(x)| + 0.5``, the max over the whole tensor. The gradient also flows
  through the max: MXNet's max passes the full gradient to every element equal to it.
* Rounding is C's ``roundf``, halves away from zero (``round_half_up`` here: p >= 0).

larq 0.14 ``DoReFa`` (registered as ``dorefa_quantizer``), rounding with ``tf.round`` (halves to even):

* activations: ``round(clip(x, 0, 1) * n) / n``; gradient 1 on [0, 1] (``clip_by_value``), else 0.
* weights: ``2 round(tanh(w) / (2 max|tanh(w)|) + 0.5) - 1`` with the max's gradient stopped and an
  identity gradient through the rounding: (1 - tanh(w)^2) / max|tanh(w)|; all-zero weights give 0.
"""

from __future__ import annotations

import torch

from bitrain.binary.ste import INF, grad_cancel


def round_half_up(p: torch.Tensor) -> torch.Tensor:
    """Round p >= 0 to the nearest integer, halves up (BMXNet's roundf), exactly: ``floor(p + 0.5)`` in
    float32 turns 0.49999997 into 1 because p + 0.5 rounds to 1.0; ``p - floor(p)`` is exact."""
    f = torch.floor(p)
    return f + (p - f >= 0.5).to(p.dtype)


class _RoundSte(torch.autograd.Function):
    """round(p) with the gradient passed unchanged; half_even: torch/tf.round, else halves up (roundf)."""

    @staticmethod
    def forward(ctx, p, half_even):
        return torch.round(p) if half_even else round_half_up(p)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _RoundIdentityGrad(torch.autograd.Function):
    """larq's ``_k_bit_with_identity_grad``: round(v * n) / n (half to even), gradient dy exactly."""

    @staticmethod
    def forward(ctx, v, n):
        return torch.round(v * n) / n

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _MaxAbs(torch.autograd.Function):
    """max|x| over the tensor; backward as MXNet's abs and max: the full gradient times sign(x) at every
    element whose |x| equals the max. Clamped at the smallest normal float so that 0 / max stays 0."""

    @staticmethod
    def forward(ctx, x):
        a = x.abs()
        m = a.max()
        ctx.save_for_backward(x, m)
        return m.clamp_min(torch.finfo(x.dtype).tiny)

    @staticmethod
    def backward(ctx, grad):
        x, m = ctx.saved_tensors
        return grad * (x.abs() == m).to(grad.dtype) * torch.sign(x)


def _levels(bits: int) -> float:
    return float(2**bits - 1)


def round_ste(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """BMXNet ``round``: round(clip(x, 0, 1) * n) / n, halves up; gradient 1 on [0, 1], 0 outside."""
    n = _levels(bits)
    return _RoundSte.apply(grad_cancel(x, clip_threshold).clamp(0.0, 1.0) * n, False) / n


def dorefa(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """BMXNet ``dorefa`` (activations and weights): tanh squashed, normalised by max|tanh(x)| over the
    tensor, k-bit rounded on [0, 1], mapped to [-1, 1]; the gradient flows through the max as well."""
    n = _levels(bits)
    th = torch.tanh(grad_cancel(x, clip_threshold))
    v = 0.5 * (th / _MaxAbs.apply(th)) + 0.5
    return 2.0 * (_RoundSte.apply(v * n, False) / n) - 1.0


def dorefa_quantizer(x: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """larq ``DoReFa(mode="activations")``: round(clip(x, 0, 1) * n) / n, halves to even; gradient 1 on [0, 1]."""
    return _RoundIdentityGrad.apply(grad_cancel(x, clip_threshold).clamp(0.0, 1.0), _levels(bits))


def dorefa_quantizer_weights(w: torch.Tensor, clip_threshold: float = INF, bits: int = 1) -> torch.Tensor:
    """larq ``DoReFa(mode="weights")``: tanh(w) / (2 max|tanh(w)|) + 0.5 (max: stop-gradient), k-bit rounded
    (halves to even, identity gradient), mapped to [-1, 1]. Gradient: (1 - tanh(w)^2) / max|tanh(w)|."""
    th = torch.tanh(grad_cancel(w, clip_threshold))
    m = th.detach().abs().max().clamp_min(torch.finfo(th.dtype).tiny)  # tf.math.divide_no_nan: 0 / 0 = 0
    v = th / (2.0 * m) + 0.5
    return 2.0 * _RoundIdentityGrad.apply(v, _levels(bits)) - 1.0
