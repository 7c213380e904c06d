"""xnor-popcount kernels for packed 1-bit layers, compiled by numba (the optional ``[fast]`` extra).

Bits are little-endian, 1 = +1 and 0 = -1, as in the export (``docs/export.md``). Layouts:

- activations, ``pack_activations``: float32 (N, C, H, W) -> uint64 (N, H + 2 ph, W + 2 pw, groups * wpg),
  wpg = ceil(C / groups / 64) words per pixel and group; channel c of group g is bit c % 64 of word
  g * wpg + c // 64. The border is all zero bits, i.e. -1: BMXNet's -1 padding of a binary input, exact.
- weights, ``pack_weights``: the export's (out, ceil(fan_in / 8)) uint8 rows -> uint64
  (groups, kh * kw * wpg, out / groups): for tap (i, j) and word q, that word of every output channel of
  the group side by side, so the inner loop runs over output channels with the input word held.
- ``xnor_conv`` counts the bits where input and weight disagree, d, over each receptive field. The unused
  high bits of a group's last word are 0 on both sides and never disagree, so over the fan_in real bits
  ``dot = fan_in - 2 d`` and the offset's ``(dot + fan_in) / 2 = fan_in - d``: integers, exact in float32.

The sign is fused into the packing: bit = 1 where ``sign(x) = +1`` as ``quantizers._sign`` defines it,
``copysign(1, x + 0.0)``: the IEEE sign bit clear, or x = -0.0 (which becomes +0.0). NaN keeps its sign bit.
Threads: torch's setting (``torch.get_num_threads()``), passed to numba on every call.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic
except ImportError as e:  # the [fast] extra is not installed: callers use the torch reference
    numba = None
    IMPORT_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    IMPORT_ERROR = None

_MINUS_ZERO = 0x80000000  # float32 -0.0 as uint32

if numba is not None:

    def _jit(fn):
        options = dict(parallel=True, fastmath=False, nogil=True)
        try:  # compiled once, then loaded from numba's cache (__pycache__ or the user's cache folder)
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # no writable cache location: compile at each start instead
            return numba.njit(**options)(fn)

    @intrinsic
    def _popcount(typingctx, x):
        """llvm.ctpop of a uint64 (vpopcntq on CPUs with AVX-512 VPOPCNTDQ, popcnt otherwise)."""
        sig = types.int64(types.uint64)

        def codegen(context, builder, signature, args):
            fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
            return builder.call(fn, args)

        return sig, codegen

    @_jit
    def _pack(xbits, ph, pw, groups, sh, sw, out):
        # xbits: float32 (N, C, H, W) viewed as uint32; out: zeros (N, Ho + 2ph, Wo + 2pw, groups * wpg) with
        # pixel (h, w) of out's interior = pixel (h * sh, w * sw) of x (sh, sw > 1: a 1x1 conv's stride)
        n_, c_ = xbits.shape[0], xbits.shape[1]
        h_, w_ = out.shape[1] - 2 * ph, out.shape[2] - 2 * pw
        cg = c_ // groups
        wpg = out.shape[3] // groups
        for t in prange(n_ * h_):
            n = t // h_
            h = t - n * h_
            hx = h * sh  # the input row
            buf = np.empty(w_, np.uint64)
            for g in range(groups):
                for q in range(wpg):
                    buf[:] = 0
                    c0 = g * cg + 64 * q
                    for c in range(c0, min(c0 + 64, (g + 1) * cg)):
                        shift = np.uint64(c - c0)
                        if sw == 1:  # two loops: the contiguous one vectorises
                            for w in range(w_):
                                u = xbits[n, c, hx, w]
                                buf[w] |= (np.uint64((u >> 31) == 0) | np.uint64(u == _MINUS_ZERO)) << shift
                        else:  # a strided 1x1 conv: every sw-th column
                            for w in range(w_):
                                u = xbits[n, c, hx, w * sw]
                                buf[w] |= (np.uint64((u >> 31) == 0) | np.uint64(u == _MINUS_ZERO)) << shift
                    for w in range(w_):
                        out[n, h + ph, w + pw, g * wpg + q] = buf[w]

    @_jit
    def _conv(xp, wt, out, kh, kw, sh, sw, dh, dw, fan_in, count, oblock):
        # xp (N, Hp, Wp, groups * wpg) uint64, wt (groups, kh * kw * wpg, og) uint64, out (N, O, Ho, Wo) float32.
        # One task per (image, output row, group, block of output channels); its counts (Wo, block) stay in L1.
        # The rows of the weight (tap i, j and word q) go four at a time, two output pixels at once: per
        # output channel one load and store of each pixel's count for four popcounts.
        n_ = xp.shape[0]
        groups, rows, og = wt.shape
        wpg = xp.shape[3] // groups
        ho, wo = out.shape[2], out.shape[3]
        nob = (og + oblock - 1) // oblock
        for t in prange(n_ * ho * groups * nob):
            ob = t % nob
            r = t // nob
            g = r % groups
            r = r // groups
            oh = r % ho
            n = r // ho
            o0 = ob * oblock
            m = min(o0 + oblock, og) - o0
            acc = np.zeros((wo + 1, m), np.int64)  # row wo: scratch for the partner of an odd last pixel
            hs = np.empty(4, np.int64)  # per row of the four: input row, column offset, word
            ws = np.empty(4, np.int64)
            cs = np.empty(4, np.int64)
            for r0 in range(0, rows, 4):
                k = min(4, rows - r0)
                for e in range(4):
                    re = r0 + min(e, k - 1)
                    hs[e] = oh * sh + re // (kw * wpg) * dh
                    ws[e] = re // wpg % kw * dw
                    cs[e] = g * wpg + re % wpg
                wa = wt[g, r0, o0 : o0 + m]  # views: o in the loops below is >= 0, so no wraparound checks
                wb = wt[g, r0 + min(1, k - 1), o0 : o0 + m]
                wc = wt[g, r0 + min(2, k - 1), o0 : o0 + m]
                wd = wt[g, r0 + min(3, k - 1), o0 : o0 + m]
                for ow in range(0, wo, 2):
                    p0 = ow * sw
                    p1 = p0 + sw if ow + 1 < wo else p0
                    a1 = ow + 1  # == wo (scratch) for an odd last pixel
                    xa0, xa1 = xp[n, hs[0], p0 + ws[0], cs[0]], xp[n, hs[0], p1 + ws[0], cs[0]]
                    xb0, xb1 = xp[n, hs[1], p0 + ws[1], cs[1]], xp[n, hs[1], p1 + ws[1], cs[1]]
                    xc0, xc1 = xp[n, hs[2], p0 + ws[2], cs[2]], xp[n, hs[2], p1 + ws[2], cs[2]]
                    xd0, xd1 = xp[n, hs[3], p0 + ws[3], cs[3]], xp[n, hs[3], p1 + ws[3], cs[3]]
                    if k == 4:
                        for o in range(m):
                            va, vb, vc, vd = wa[o], wb[o], wc[o], wd[o]
                            acc[ow, o] += (
                                _popcount(xa0 ^ va) + _popcount(xb0 ^ vb) + _popcount(xc0 ^ vc) + _popcount(xd0 ^ vd)
                            )
                            acc[a1, o] += (
                                _popcount(xa1 ^ va) + _popcount(xb1 ^ vb) + _popcount(xc1 ^ vc) + _popcount(xd1 ^ vd)
                            )
                    else:  # the last 1-3 rows, one at a time
                        for e in range(k):
                            w1 = wt[g, r0 + e, o0 : o0 + m]
                            x0 = xp[n, hs[e], p0 + ws[e], cs[e]]
                            x1 = xp[n, hs[e], p1 + ws[e], cs[e]]
                            for o in range(m):
                                v = w1[o]
                                acc[ow, o] += _popcount(x0 ^ v)
                                acc[a1, o] += _popcount(x1 ^ v)
            scale = 1 if count else 2  # agreeing bits fan_in - d, or the +-1 dot fan_in - 2 d
            for o in range(m):
                for ow in range(wo):
                    out[n, g * og + o0 + o, oh, ow] = np.float32(fan_in - scale * acc[ow, o])


def available() -> bool:
    """True when numba imports (the ``[fast]`` extra is installed)."""
    return numba is not None


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def pack_weights(weight_packed: torch.Tensor, shape: list[int], groups: int = 1) -> np.ndarray:
    """The export's (out, ceil(fan_in / 8)) uint8 sign rows -> (groups, kh * kw * wpg, out / groups) uint64."""
    out, cg = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    fan_in, og, wpg = cg * kh * kw, out // groups, (cg + 63) // 64
    bits = np.unpackbits(weight_packed.cpu().numpy(), axis=1, count=fan_in, bitorder="little")
    bits = bits.reshape(groups, og, cg, kh, kw).transpose(0, 3, 4, 2, 1)  # (groups, kh, kw, cg, og)
    bits = np.pad(bits, ((0, 0), (0, 0), (0, 0), (0, wpg * 64 - cg), (0, 0)))  # pad bits 0
    bits = bits.reshape(groups, kh, kw, wpg, 64, og).transpose(0, 1, 2, 3, 5, 4)  # 64 channels last
    words = np.packbits(np.ascontiguousarray(bits), axis=-1, bitorder="little").view("<u8")
    return np.ascontiguousarray(words.reshape(groups, kh * kw * wpg, og))


def pack_activations(
    x: torch.Tensor, padding: tuple[int, int] = (0, 0), groups: int = 1, subsample: tuple[int, int] = (1, 1)
) -> np.ndarray:
    """sign(x) of float (N, C, H, W) bit-packed per pixel, with a -1 border (see the module docstring);
    ``subsample`` (sh, sw) keeps every sh-th row and sw-th column only (a 1x1 conv's stride)."""
    x = x.detach().float().contiguous()
    n, c, h, w = x.shape
    (ph, pw), (sh, sw) = padding, subsample
    hs, ws = (h + sh - 1) // sh, (w + sw - 1) // sw
    out = np.zeros((n, hs + 2 * ph, ws + 2 * pw, groups * ((c // groups + 63) // 64)), np.uint64)
    _threads()
    _pack(x.numpy().view(np.uint32), ph, pw, groups, sh, sw, out)
    return out


def xnor_conv(
    x: torch.Tensor,
    weights: np.ndarray,
    *,
    kernel_size: tuple[int, int] = (1, 1),
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    fan_in: int,
    count: bool,
) -> torch.Tensor:
    """The binary conv of sign(x) (N, C, H, W) with ``pack_weights``' words, -1 padded: float32 NCHW
    holding the +-1 dot products, or with ``count`` the agreeing bits ``(dot + fan_in) / 2``."""
    groups, _, og = weights.shape
    (kh, kw), (sh, sw), (dh, dw), padding = kernel_size, stride, dilation, tuple(padding)
    if (kh, kw) == (1, 1) and padding == (0, 0):  # a strided 1x1 conv reads every sh-th pixel only: pack those
        xp, sh, sw = pack_activations(x, (0, 0), groups, (sh, sw)), 1, 1
    else:
        xp = pack_activations(x, padding, groups)
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty((x.shape[0], groups * og, ho, wo), dtype=torch.float32)
    oblock, rows = og, x.shape[0] * ho * groups
    while oblock > 32 and rows * ((og + oblock - 1) // oblock) < 8 * torch.get_num_threads():
        oblock //= 2  # few rows (small maps, batch 1): split the output channels too, for the threads
    _conv(xp, weights, out.numpy(), kh, kw, sh, sw, dh, dw, fan_in, count, oblock)
    return out
