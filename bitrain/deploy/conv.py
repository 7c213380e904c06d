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
As one unsigned compare of the float's bits u: ``u <= 0x80000000`` (the bits of -0.0).
Threads: torch's setting (``torch.get_num_threads()``), passed to numba on every call. The LLVM pieces
the loops call (popcount, FMA, the 4 x 16 count block, the epilogue's 8 x 8 transpose, prefetch, sign
words) are in ``bitrain.deploy.intrinsics``. ``xnor_conv``'s unit arguments (a residual, a 1x1 shortcut,
the output's signs packed for the next conv) serve ``bitrain.deploy.fused``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

try:
    import numba
    from numba import prange

    from bitrain.deploy.intrinsics import (
        dot4x16,
        fma,
        popcount,
        prefetch,
        signword64,
        signwords8,
        signwords16,
        transpose8,
        transpose8_residual,
        transpose8_residual_signs,
        transpose8_signs,
    )
except ImportError as e:  # the [fast] extra is not installed: callers use the torch reference
    numba = None
    IMPORT_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    IMPORT_ERROR = None

_MINUS_ZERO = np.uint32(0x80000000)  # float32 -0.0 as uint32: bits u <= it are the x with sign(x) = +1

if numba is not None:

    def _jit(fn):
        options = dict(parallel=True, fastmath=False, nogil=True)
        try:  # compiled once, then loaded from numba's cache (__pycache__ or the user's cache folder)
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # no writable cache location: compile at each start instead
            return numba.njit(**options)(fn)

    @numba.njit(inline="always", cache=True)
    def _affine(v, a, b, form):
        """The epilogue's per-channel affine map of a count v: FMA (form 1), multiply then add (2), none (0)."""
        if form == 1:
            return fma(v, a, b)
        if form == 2:
            return v * a + b  # fastmath=False: two roundings, never contracted into an FMA
        return v

    @numba.njit(cache=True)
    def _affine_rows(values, alpha, beta, form, out):
        # out[c, i] = _affine(values[i], alpha[c], beta[c], form): the epilogue's arithmetic, for checks
        for c in range(out.shape[0]):
            for i in range(values.shape[0]):
                out[c, i] = _affine(values[i], alpha[c], beta[c], form)

    @_jit
    def _pack(xbits, ph, pw, groups, sh, sw, rblock, out):
        # xbits: float32 (N, C, H, W) viewed as uint32; out: zeros (N, Ho + 2ph, Wo + 2pw, groups * wpg) with
        # pixel (h, w) of out's interior = pixel (h * sh, w * sw) of x (sh, sw > 1: a 1x1 conv's stride).
        # One task per (image, block of rblock output rows): each channel's rows are read in turn, and 32
        # channels go into each of two uint32 halves of the word (16 lanes per vector instead of 8).
        n_, c_ = xbits.shape[0], xbits.shape[1]
        h_, w_ = out.shape[1] - 2 * ph, out.shape[2] - 2 * pw
        cg = c_ // groups
        wpg = out.shape[3] // groups
        nrb = (h_ + rblock - 1) // rblock
        for t in prange(n_ * nrb):
            n = t // nrb
            h0 = (t - n * nrb) * rblock
            rows = min(rblock, h_ - h0)
            buf = np.empty((2, rows, w_), np.uint32)  # channels c0 + 0..31 and c0 + 32..63
            for g in range(groups):
                for q in range(wpg):
                    c0 = g * cg + 64 * q
                    if sw == 1 and w_ >= 8 and c0 + 64 <= (g + 1) * cg:  # a whole word: 64 channels in registers
                        lanes = 16 if w_ >= 16 else 8
                        cstride, dstride = xbits.strides[1], out.strides[2]
                        for r in range(rows):
                            src = xbits[n, c0, (h0 + r) * sh].ctypes.data
                            dst = out[n, h0 + r + ph, pw].ctypes.data + (g * wpg + q) * 8
                            for w0 in range(0, w_, lanes):
                                w0 = min(w0, w_ - lanes)  # the last block overlaps the one before: same words
                                if lanes == 16:
                                    signwords16(src + w0 * 4, cstride, dst + w0 * dstride, dstride)
                                else:
                                    signwords8(src + w0 * 4, cstride, dst + w0 * dstride, dstride)
                        continue
                    buf[:] = 0
                    for c in range(c0, min(c0 + 64, (g + 1) * cg)):
                        if c + 1 < c_:  # the next channel's rows, while this one is read: 25 % faster from DRAM
                            for r in range(rows):
                                row = xbits[n, c + 1, (h0 + r) * sh].ctypes.data
                                for b in range(0, xbits.shape[3] * 4, 64):
                                    prefetch(row + b)
                        half = (c - c0) >> 5
                        shift = np.uint32((c - c0) & 31)
                        for r in range(rows):
                            hx = (h0 + r) * sh  # the input row
                            b = buf[half, r]
                            if sw == 1:  # two loops: the contiguous one vectorises
                                xr = xbits[n, c, hx]
                                for w in range(w_):
                                    b[w] |= np.uint32(xr[w] <= _MINUS_ZERO) << shift
                            else:  # a strided 1x1 conv: every sw-th column
                                for w in range(w_):
                                    b[w] |= np.uint32(xbits[n, c, hx, w * sw] <= _MINUS_ZERO) << shift
                    for r in range(rows):
                        for w in range(w_):
                            out[n, h0 + r + ph, w + pw, g * wpg + q] = np.uint64(buf[0, r, w]) | (
                                np.uint64(buf[1, r, w]) << np.uint64(32)
                            )

    @_jit
    def _pack_nhwc(xbits, ph, pw, out):
        # xbits: float32 (N, H, W, C) viewed as uint32 (a channels_last tensor's memory), groups 1; out as _pack's.
        # One task per input row; a pixel's 64 channels are contiguous: one compare of 64 lanes per word.
        n_, h_, w_, c_ = xbits.shape
        words = out.shape[3]
        for t in prange(n_ * h_):
            n, h = t // h_, t % h_
            for w in range(w_):
                src, dst = xbits[n, h, w].ctypes.data, out[n, h + ph, w + pw].ctypes.data
                for q in range(words):
                    if 64 * q + 64 <= c_:
                        signword64(src + 256 * q, dst + 8 * q)
                    else:  # the last, partial word
                        word = np.uint64(0)
                        for c in range(64 * q, c_):
                            word |= np.uint64(xbits[n, h, w, c] <= _MINUS_ZERO) << np.uint64(c - 64 * q)
                        out[n, h + ph, w + pw, q] = word

    @numba.njit(inline="always", cache=True)
    def _counts(xrow, pstride, offs, wrow, wstride, acc, m):
        """acc[ow, o] = the counts of output pixel ow (input words at xrow + ow * pstride + offs[r]) and
        output channel o (words at wrow + r * wstride + 8 o), over the rows r of offs; m % 16 == 0."""
        wo, arow, orow = acc.shape[0] - 3, acc.ctypes.data, offs.ctypes.data
        for ow in range(0, wo, 4):
            a0 = xrow + ow * pstride
            a1 = a0 + pstride if ow + 1 < wo else a0  # past wo: the scratch rows of acc, from pixel ow again
            a2 = a0 + 2 * pstride if ow + 2 < wo else a0
            a3 = a0 + 3 * pstride if ow + 3 < wo else a0
            for o in range(0, m, 16):
                dot4x16(a0, a1, a2, a3, orow, offs.shape[0], wrow + o * 8, wstride, arow + (ow * m + o) * 8, m * 8)

    @numba.njit(inline="always", cache=True)
    def _add_row(acc, ow, w1, x0, x1, x2, x3, keep):
        """acc[ow + i, o] = (acc[ow + i, o] & keep) + popcount(x_i ^ w1[o]): one weight row, four pixels."""
        for o in range(w1.shape[0]):
            v = w1[o]
            acc[ow, o] = (acc[ow, o] & keep) + popcount(x0 ^ v)
            acc[ow + 1, o] = (acc[ow + 1, o] & keep) + popcount(x1 ^ v)
            acc[ow + 2, o] = (acc[ow + 2, o] & keep) + popcount(x2 ^ v)
            acc[ow + 3, o] = (acc[ow + 3, o] & keep) + popcount(x3 ^ v)

    @numba.njit(inline="always", cache=True)
    def _shortcut(xp, sc, n, h, w0, sw, o0, m, acc):
        """The counts of a 1x1 conv (``sc.words`` (1, wpg, og)) over pixels (h, w0 + ow sw) of xp into acc."""
        wo = acc.shape[0] - 3
        for q in range(sc.words.shape[1]):
            w1 = sc.words[0, q, o0 : o0 + m]
            keep = np.int64(0) if q == 0 else np.int64(-1)
            for ow in range(0, wo, 4):
                p0 = w0 + ow * sw
                p1 = p0 + sw if ow + 1 < wo else p0
                p2 = p0 + 2 * sw if ow + 2 < wo else p0
                p3 = p0 + 3 * sw if ow + 3 < wo else p0
                x0, x1, x2, x3 = _four(xp, n, h, q, p0, p1, p2, p3)
                _add_row(acc, ow, w1, x0, x1, x2, x3, keep)

    @numba.njit(inline="always", cache=True)
    def _four(xp, n, h, c, p0, p1, p2, p3):
        """Word c of pixels p0..p3 of row h of image n."""
        return xp[n, h, p0, c], xp[n, h, p1, c], xp[n, h, p2, c], xp[n, h, p3, c]

    @_jit
    def _conv(xp, wt, out, kh, kw, sh, sw, dh, dw, fan_in, count, oblock, form, alpha, beta, sc, res, res_nhwc, yp):
        # xp (N, Hp, Wp, groups * wpg) uint64, wt (groups, kh * kw * wpg, og) uint64, out (N, O, Ho, Wo) float32.
        # One task per (image, output row, group, block of output channels); its counts (Wo, block) stay in L1.
        # Blocks of 16k channels: dot4x16 keeps the counts of 4 output pixels x 16 channels in registers over
        # all rows of the weight (tap i, j and word q; offs: where each row's word lies from a pixel's first).
        # Other blocks: the rows four at a time, four output pixels at once (per output channel four weight
        # loads serve sixteen popcounts, each count loaded and stored once per pass); the first pass masks
        # acc's unset values to 0 (an AND with keep = 0, then -1) instead of zeroing every task's acc.
        # The epilogue turns the counts into float32 (Wo, block), maps them by alpha * v + beta per output
        # channel when form > 0 (see _affine), then writes NCHW in 8 x 8 transposed blocks.
        # The unit's extras (``xnor_conv``), each off when its array is empty: sc, a 1x1 shortcut conv
        # (``Shortcut``) over the same packed input, its own counts and affine added to the tile; res, a
        # float32 residual added in the transpose (res_nhwc: one laid out channels_last, added to the tile); yp, uint8 (N, Ho + 2 qh, Wo + 2 qw, 8 * words): the signs of
        # the sums packed for the next conv, a byte per 8 channels, also in the transpose (oblock % 8 == 0).
        n_ = xp.shape[0]
        groups, rows, og = wt.shape
        wpg = xp.shape[3] // groups
        ho, wo = out.shape[2], out.shape[3]
        nob = (og + oblock - 1) // oblock
        offs = np.empty(rows, np.int64)  # bytes from a pixel's first word to weight row r's word
        for r in range(rows):
            offs[r] = (r // (kw * wpg) * dh * xp.strides[1] + r // wpg % kw * dw * xp.strides[2]) + r % wpg * 8
        sc_offs = np.arange(sc.words.shape[1]) * 8  # the shortcut's rows: the words of one pixel
        for t in prange(n_ * ho * groups * nob):
            ob = t % nob
            r = t // nob
            g = r % groups
            r = r // groups
            oh = r % ho
            n = r // ho
            o0 = ob * oblock
            m = min(o0 + oblock, og) - o0
            acc = np.empty((wo + 3, m), np.int64)  # rows wo..wo + 2: scratch for the pixels past the last
            if res.shape[0] > 0:  # the residual's rows, on their way while the popcounts run: 2x faster from DRAM
                for o in range(m):
                    row = res[n, g * og + o0 + o, oh].ctypes.data
                    for b in range(0, wo * 4, 64):
                        prefetch(row + b)
            if res_nhwc.shape[0] > 0:  # the same for a channels_last residual: m channels of each pixel
                for ow in range(wo):
                    px = res_nhwc[n, oh, ow, g * og + o0 :].ctypes.data
                    for b in range(0, m * 4, 64):
                        prefetch(px + b)
            hs = np.empty(4, np.int64)  # per row of the four: input row, column offset, word
            ws = np.empty(4, np.int64)
            cs = np.empty(4, np.int64)
            if m % 16 == 0:  # the counts of 4 pixels x 16 channels stay in registers over all rows
                xrow = xp[n, oh * sh, 0, g * wpg : (g + 1) * wpg].ctypes.data
                _counts(xrow, xp.strides[2] * sw, offs, wt[g, 0, o0 : o0 + m].ctypes.data, og * 8, acc, m)
            for r0 in range(0 if m % 16 else rows, rows, 4):  # else 4 rows at a time, the counts in acc
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
                keep = np.int64(0) if r0 == 0 else np.int64(-1)
                for ow in range(0, wo, 4):
                    p0 = ow * sw
                    p1 = p0 + sw if ow + 1 < wo else p0
                    p2 = p0 + 2 * sw if ow + 2 < wo else p0
                    p3 = p0 + 3 * sw if ow + 3 < wo else p0
                    a1, a2, a3 = ow + 1, ow + 2, ow + 3  # past wo: a short last four reads p0 again
                    if k == 4:
                        xa0, xa1, xa2, xa3 = _four(xp, n, hs[0], cs[0], p0 + ws[0], p1 + ws[0], p2 + ws[0], p3 + ws[0])
                        xb0, xb1, xb2, xb3 = _four(xp, n, hs[1], cs[1], p0 + ws[1], p1 + ws[1], p2 + ws[1], p3 + ws[1])
                        xc0, xc1, xc2, xc3 = _four(xp, n, hs[2], cs[2], p0 + ws[2], p1 + ws[2], p2 + ws[2], p3 + ws[2])
                        xd0, xd1, xd2, xd3 = _four(xp, n, hs[3], cs[3], p0 + ws[3], p1 + ws[3], p2 + ws[3], p3 + ws[3])
                        for o in range(m):
                            va, vb, vc, vd = wa[o], wb[o], wc[o], wd[o]
                            acc[ow, o] = (acc[ow, o] & keep) + (
                                popcount(xa0 ^ va) + popcount(xb0 ^ vb) + popcount(xc0 ^ vc) + popcount(xd0 ^ vd)
                            )
                            acc[a1, o] = (acc[a1, o] & keep) + (
                                popcount(xa1 ^ va) + popcount(xb1 ^ vb) + popcount(xc1 ^ vc) + popcount(xd1 ^ vd)
                            )
                            acc[a2, o] = (acc[a2, o] & keep) + (
                                popcount(xa2 ^ va) + popcount(xb2 ^ vb) + popcount(xc2 ^ vc) + popcount(xd2 ^ vd)
                            )
                            acc[a3, o] = (acc[a3, o] & keep) + (
                                popcount(xa3 ^ va) + popcount(xb3 ^ vb) + popcount(xc3 ^ vc) + popcount(xd3 ^ vd)
                            )
                    else:  # the last 1-3 rows, one at a time
                        for e in range(k):
                            w1 = wt[g, r0 + e, o0 : o0 + m]
                            x0, x1, x2, x3 = _four(xp, n, hs[e], cs[e], p0 + ws[e], p1 + ws[e], p2 + ws[e], p3 + ws[e])
                            _add_row(acc, ow, w1, x0, x1, x2, x3, keep if e == 0 else np.int64(-1))
            scale = 1 if count else 2  # agreeing bits fan_in - d, or the +-1 dot fan_in - 2 d
            tile = np.empty((wo, m), np.float32)
            oc = g * og + o0
            a, b = alpha[oc : oc + m], beta[oc : oc + m]
            for ow in range(wo):
                if form == 0:
                    for o in range(m):
                        tile[ow, o] = np.float32(fan_in - scale * acc[ow, o])
                else:
                    for o in range(m):
                        tile[ow, o] = _affine(np.float32(fan_in - scale * acc[ow, o]), a[o], b[o], form)
            if sc.words.shape[0] > 0:  # the 1x1 shortcut: its counts over the input pixel (oh sh, ow sw)
                if m % 16 == 0:
                    xrow = xp[n, oh * sh + sc.oh, sc.ow, :].ctypes.data
                    _counts(xrow, xp.strides[2] * sw, sc_offs, sc.words[0, 0, o0 : o0 + m].ctypes.data, og * 8, acc, m)
                else:
                    _shortcut(xp, sc, n, oh * sh + sc.oh, sc.ow, sw, o0, m, acc)
                a2, b2 = sc.alpha[oc : oc + m], sc.beta[oc : oc + m]
                for ow in range(wo):
                    for o in range(m):
                        tile[ow, o] += _affine(np.float32(sc.fan_in - scale * acc[ow, o]), a2[o], b2[o], sc.form)
            if res_nhwc.shape[0] > 0:  # a channels_last residual: contiguous per pixel, added before the transpose
                for ow in range(wo):
                    rr = res_nhwc[n, oh, ow, oc : oc + m]
                    for o in range(m):
                        tile[ow, o] += rr[o]
            m8, w8 = m - m % 8, wo - wo % 8
            has_res, has_signs = res.shape[0] > 0, yp.shape[0] > 0
            cstride = ho * wo * 4  # bytes from one channel's row to the next, in out and res
            src, dst = tile.ctypes.data, out[n, oc, oh].ctypes.data  # addresses: no array views per block
            rsrc = res[n, oc, oh].ctypes.data if has_res else 0
            qh, qw = (yp.shape[1] - ho) // 2, (yp.shape[2] - wo) // 2
            gstride = yp.shape[3]  # bytes per pixel of the next conv's words
            sdst = yp[n, oh + qh, qw].ctypes.data + oc // 8 if has_signs else 0
            for ob in range(0, m8, 8):
                for ow in range(0, w8, 8):
                    t8 = (src + (ow * m + ob) * 4, m * 4, rsrc + (ob * ho * wo + ow) * 4, cstride)
                    d8 = (dst + (ob * ho * wo + ow) * 4, cstride, sdst + ow * gstride + ob // 8, gstride)
                    if has_res and has_signs:
                        transpose8_residual_signs(t8[0], t8[1], t8[2], t8[3], d8[0], d8[1], d8[2], d8[3])
                    elif has_res:
                        transpose8_residual(t8[0], t8[1], t8[2], t8[3], d8[0], d8[1], d8[2], d8[3])
                    elif has_signs:
                        transpose8_signs(t8[0], t8[1], t8[2], t8[3], d8[0], d8[1], d8[2], d8[3])
                    else:
                        transpose8(t8[0], t8[1], t8[2], t8[3], d8[0], d8[1], d8[2], d8[3])
            tail = np.empty(8, np.float32)  # the last wo % 8 pixels (and m % 8 channels), one value at a time
            tail_bits = tail.view(np.uint32)
            for ow in range(w8, wo):
                for ob in range(0, m8, 8):
                    byte = np.uint8(0)
                    for j in range(8):
                        v = tile[ow, ob + j] + res[n, oc + ob + j, oh, ow] if has_res else tile[ow, ob + j]
                        out[n, oc + ob + j, oh, ow] = v
                        tail[j] = v
                        byte |= np.uint8(tail_bits[j] <= _MINUS_ZERO) << np.uint8(j)
                    if has_signs:
                        yp[n, oh + qh, ow + qw, (oc + ob) // 8] = byte
            for o in range(m8, m):  # never with signs (xnor_conv keeps the blocks whole bytes then)
                for ow in range(wo):
                    v = tile[ow, o] + res[n, oc + o, oh, ow] if has_res else tile[ow, o]
                    out[n, oc + o, oh, ow] = v


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


def _channels_last(x: torch.Tensor) -> bool:
    """A 4-d tensor laid out channels_last and not also NCHW (C == 1 or 1x1 maps are both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def pack_activations(
    x: torch.Tensor, padding: tuple[int, int] = (0, 0), groups: int = 1, subsample: tuple[int, int] = (1, 1)
) -> np.ndarray:
    """sign(x) of float (N, C, H, W) bit-packed per pixel, with a -1 border (see the module docstring);
    ``subsample`` (sh, sw) keeps every sh-th row and sw-th column only (a 1x1 conv's stride). A
    channels_last x is read as it lies (groups 1, no subsampling), any other layout as NCHW."""
    x = x.detach().float()
    n, c, h, w = x.shape
    (ph, pw), (sh, sw) = padding, subsample
    hs, ws = (h + sh - 1) // sh, (w + sw - 1) // sw
    out = np.zeros((n, hs + 2 * ph, ws + 2 * pw, groups * ((c // groups + 63) // 64)), np.uint64)
    _threads()
    if _channels_last(x) and groups == 1 and (sh, sw) == (1, 1):  # read in place: 64 channels per compare
        _pack_nhwc(x.permute(0, 2, 3, 1).numpy().view(np.uint32), ph, pw, out)
        return out
    x = x.contiguous()
    # row blocks of about 2048 pixels, at least four per thread
    rblock = max(1, min(hs, 2048 // max(ws, 1), (n * hs) // (4 * torch.get_num_threads()) or 1))
    _pack(x.numpy().view(np.uint32), ph, pw, groups, sh, sw, rblock, out)
    return out


_NO_AFFINE = np.zeros(0, np.float32)  # alpha and beta of a layer without a fused BatchNorm (form 0)
_NO_WORDS = np.zeros((0, 0, 0), np.uint64)
_NO_ROWS = np.zeros((0, 0, 0, 0), np.float32)
_NO_BYTES = np.zeros((0, 0, 0, 0), np.uint8)


class Shortcut(NamedTuple):
    """A 1x1 conv over the same packed input as the main conv, with the main conv's stride: its output
    pixel (oh, ow) reads the input pixel (oh sh, ow sw), i.e. the padded pixel (oh sh + oh0, ow sw + ow0)
    where (oh0, ow0) is the main conv's padding. Its counts, mapped by its own affine, are added to the
    main conv's (a ResNet downsample shortcut, ``packed.PackedResidual``)."""

    words: np.ndarray  # pack_weights of the 1x1 conv, groups 1: (1, wpg, og)
    oh: int
    ow: int
    fan_in: int
    form: int
    alpha: np.ndarray
    beta: np.ndarray


_NO_SHORTCUT = Shortcut(_NO_WORDS, 0, 0, 0, 0, _NO_AFFINE, _NO_AFFINE)


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
    affine: tuple[np.ndarray, np.ndarray, int] | None = None,
    packed: np.ndarray | None = None,
    shortcut: Shortcut | None = None,
    residual: torch.Tensor | None = None,
    pack_out: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
    """The binary conv of sign(x) (N, C, H, W) with ``pack_weights``' words, -1 padded: float32 NCHW
    holding the +-1 dot products, or with ``count`` the agreeing bits ``(dot + fan_in) / 2``.

    ``affine`` (alpha, beta, form): float32 per output channel, each output v becomes alpha * v + beta
    with one rounding (form 1, an FMA) or two (form 2): a BatchNorm fused into the epilogue
    (``packed.PackedQLayer``, which checks the form against torch's BatchNorm).

    The rest fuse a residual unit ``out = affine(conv(x)) + shortcut`` (``packed.PackedResidual``), groups 1:
    ``packed``, ``pack_activations(x, padding)`` when the caller has it (x then gives only the shape);
    ``shortcut``, a 1x1 binary conv over the same input (``Shortcut``, form 0 or an affine like the main
    one's), computed in the same pass; ``residual``, float32 of the output's shape, added after the affine;
    ``pack_out`` (qh, qw): also return the output's signs packed with that padding, for the next conv.
    Each value is rounded as torch rounds ``conv + bn`` then ``+ shortcut``: the same bits."""
    groups, _, og = weights.shape
    (kh, kw), (sh, sw), (dh, dw), padding = kernel_size, stride, dilation, tuple(padding)
    unit = shortcut is not None or residual is not None or pack_out is not None
    if unit and groups != 1:
        raise ValueError("xnor_conv: shortcut, residual and pack_out need groups 1")
    if packed is not None:
        xp = packed
    elif (kh, kw) == (1, 1) and padding == (0, 0) and not unit:  # a strided 1x1 conv: pack every sh-th pixel
        xp, sh, sw = pack_activations(x, (0, 0), groups, (sh, sw)), 1, 1
    else:
        xp = pack_activations(x, padding, groups)
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty((x.shape[0], groups * og, ho, wo), dtype=torch.float32)
    if residual is not None and (tuple(residual.shape) != tuple(out.shape) or residual.dtype != torch.float32):
        raise ValueError(f"xnor_conv: residual {residual.dtype} {tuple(residual.shape)} for float32 {tuple(out.shape)}")
    if pack_out is not None and og % 8:
        raise ValueError(f"xnor_conv: pack_out needs a multiple of 8 output channels, not {og}")
    oblock, rows = og, x.shape[0] * ho * groups
    while oblock > 32 and rows * ((og + oblock - 1) // oblock) < 8 * torch.get_num_threads():
        if pack_out is not None and (oblock // 2) % 8:
            break  # each task packs whole bytes of the next conv's words
        oblock //= 2  # few rows (small maps, batch 1): split the output channels too, for the threads
    alpha, beta, form = affine if affine is not None else (_NO_AFFINE, _NO_AFFINE, 0)
    res, res_nhwc = _NO_ROWS, _NO_ROWS
    if residual is not None and _channels_last(residual):  # (N, H, W, C) as it lies: added pixel by pixel
        res_nhwc = residual.detach().permute(0, 2, 3, 1).numpy()
    elif residual is not None:
        res = residual.detach().contiguous().numpy()
    yp = _NO_BYTES
    if pack_out is not None:  # the border stays zero bits: -1 padding
        (qh, qw), words = pack_out, (og + 63) // 64
        yp = np.zeros((out.shape[0], ho + 2 * qh, wo + 2 * qw, 8 * words), np.uint8)
    if packed is not None:
        _threads()  # else pack_activations set them
    args = (fan_in, count, oblock, form, alpha, beta, shortcut or _NO_SHORTCUT, res, res_nhwc, yp)
    _conv(xp, weights, out.numpy(), kh, kw, sh, sw, dh, dw, *args)
    return out if pack_out is None else (out, yp.view(np.uint64))


def affine_rows(values: np.ndarray, alpha: np.ndarray, beta: np.ndarray, form: int) -> np.ndarray:
    """(channels, len(values)) float32: the epilogue's ``alpha[c] * v + beta[c]`` in the given form, for
    every value v, with the kernel's own arithmetic (to check a form against torch's BatchNorm)."""
    out = np.empty((alpha.shape[0], values.shape[0]), np.float32)
    _affine_rows(values.astype(np.float32), alpha.astype(np.float32), beta.astype(np.float32), form, out)
    return out
