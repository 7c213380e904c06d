"""The epilogue's arithmetic: a count v mapped per output channel by alpha * v + beta in the float32 form
that gives torch's BatchNorm bit for bit (``batchnorm_affine``): one rounding (an FMA) or two.

``affine`` is what ``conv._conv`` inlines; ``affine_rows`` runs it over a set of values for the check.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.deploy.packing import cached_njit, numba

if numba is not None:
    from bitrain.deploy.intrinsics import fma

    @cached_njit(inline="always")
    def affine(v, a, b, form):
        """The epilogue's per-channel affine map of a count v: FMA (form 1), multiply then add (2), none (0)."""
        if form == 1:
            return fma(v, a, b)
        if form == 2:
            return v * a + b  # fastmath=False: two roundings, never contracted into an FMA
        return v

    @cached_njit()
    def _affine_rows(values, alpha, beta, form, out):
        # out[c, i] = affine(values[i], alpha[c], beta[c], form): the epilogue's arithmetic, for checks
        for c in range(out.shape[0]):
            for i in range(values.shape[0]):
                out[c, i] = affine(values[i], alpha[c], beta[c], form)


def affine_rows(values: np.ndarray, alpha: np.ndarray, beta: np.ndarray, form: int) -> np.ndarray:
    """(channels, len(values)) float32: the epilogue's ``alpha[c] * v + beta[c]`` in the given form, for
    every value v, with the kernel's own arithmetic (to check a form against torch's BatchNorm)."""
    out = np.empty((alpha.shape[0], values.shape[0]), np.float32)
    _affine_rows(values.astype(np.float32), alpha.astype(np.float32), beta.astype(np.float32), form, out)
    return out


AFFINE_FORMS = (1, 2)  # affine_rows: an FMA, then multiply-then-add


def batchnorm_affine(norm: nn.BatchNorm2d, fan_in: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """An eval-mode BatchNorm2d after a plain packed conv as the kernel's epilogue: (alpha, beta, form).

    alpha and beta are torch's own per-channel terms, read back from its BatchNorm (0 maps to beta; 1
    maps to alpha with mean and bias 0). The form (``affine_rows``: 1 an FMA, 2 multiply then
    add) is the one whose outputs equal torch's bit for bit for every count 0..fan_in the layer can
    output, in every channel; None when neither does (the layer then runs torch's BatchNorm after the
    kernel). torch's CPU build decides which: the AVX-512 build here computes an FMA."""

    c = norm.num_features
    counts = torch.arange(fan_in + 1, dtype=torch.float32)
    with torch.no_grad():
        want = norm(counts.expand(c, -1).reshape(1, c, 1, -1).contiguous())[0, :, 0]  # NCHW, like the kernel's
        beta = norm(torch.zeros(1, c, 1, 2))[0, :, 0, 0]
        zero = torch.zeros_like(norm.running_var)
        ones = torch.ones(1, c, 1, 2)
        alpha = F.batch_norm(ones, zero, norm.running_var, norm.weight, None, False, 0.0, norm.eps)[0, :, 0, 0]
    a, b, bits = alpha.numpy().copy(), beta.numpy().copy(), want.numpy().view(np.uint32)
    for form in AFFINE_FORMS:
        if np.array_equal(affine_rows(counts.numpy(), a, b, form).view(np.uint32), bits):
            return a, b, form
    return None
