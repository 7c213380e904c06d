"""Phase 1 of numba's xnor-popcount conv (``conv._conv``): the counts of one task's tile.

For output row oh of image n, group g and the output channels o0 .. o0 + m, ``count_tile`` fills
acc[ow, o] with the bits where the packed input and weight disagree over the receptive field of pixel
(oh, ow). ``shortcut_counts`` does the same for a fused unit's 1x1 shortcut conv. Layouts: ``packing.py``.
"""

from __future__ import annotations

import numpy as np

from bitrain.deploy.packing import cached_njit, numba

if numba is not None:
    from bitrain.deploy.intrinsics import dot1x8, dot2x8, dot3x8, dot4x8, popcount

    @cached_njit(inline="always")
    def count_block(xrow, pstride, offs, wrow, wstride, acc, m):
        """acc[ow, o] = the counts of output pixel ow (input words at xrow + ow * pstride + offs[r]) and
        output channel o (words at wrow + r * wstride + 8 o), over the rows r of offs; m % 8 == 0. Per 8
        channels, whose weight rows then stay in L1, the pixels four at a time, the last 1-3 together."""
        wo, rows, orow = acc.shape[0] - 3, offs.shape[0], offs.ctypes.data
        astride = m * 4
        w4 = wo - wo % 4
        for o in range(0, m, 8):
            wo8, arow = wrow + o * 8, acc.ctypes.data + o * 4
            for ow in range(0, w4, 4):
                a0, a = xrow + ow * pstride, arow + ow * astride
                dot4x8(a0, a0 + pstride, a0 + 2 * pstride, a0 + 3 * pstride, orow, rows, wo8, wstride, a, astride)
            a0, a = xrow + w4 * pstride, arow + w4 * astride
            if wo - w4 == 3:
                dot3x8(a0, a0 + pstride, a0 + 2 * pstride, a0, orow, rows, wo8, wstride, a, astride)
            elif wo - w4 == 2:
                dot2x8(a0, a0 + pstride, a0, a0, orow, rows, wo8, wstride, a, astride)
            elif wo - w4 == 1:
                dot1x8(a0, a0, a0, a0, orow, rows, wo8, wstride, a, astride)

    @cached_njit(inline="always")
    def _add_row(acc, ow, w1, x0, x1, x2, x3, keep):
        """acc[ow + i, o] = (acc[ow + i, o] & keep) + popcount(x_i ^ w1[o]): one weight row, four pixels."""
        for o in range(w1.shape[0]):
            v = w1[o]
            acc[ow, o] = (acc[ow, o] & keep) + popcount(x0 ^ v)
            acc[ow + 1, o] = (acc[ow + 1, o] & keep) + popcount(x1 ^ v)
            acc[ow + 2, o] = (acc[ow + 2, o] & keep) + popcount(x2 ^ v)
            acc[ow + 3, o] = (acc[ow + 3, o] & keep) + popcount(x3 ^ v)

    @cached_njit(inline="always")
    def shortcut_counts(xp, sc, n, h, w0, sw, o0, m, acc):
        """The counts of a 1x1 conv (``sc.words`` (1, wpg, og)) over pixels (h, w0 + ow sw) of xp into acc."""
        wo = acc.shape[0] - 3
        for q in range(sc.words.shape[1]):
            w1 = sc.words[0, q, o0 : o0 + m]
            keep = np.int32(0) if q == 0 else np.int32(-1)
            for ow in range(0, wo, 4):
                p0 = w0 + ow * sw
                p1 = p0 + sw if ow + 1 < wo else p0
                p2 = p0 + 2 * sw if ow + 2 < wo else p0
                p3 = p0 + 3 * sw if ow + 3 < wo else p0
                x0, x1, x2, x3 = _four(xp, n, h, q, p0, p1, p2, p3)
                _add_row(acc, ow, w1, x0, x1, x2, x3, keep)

    @cached_njit(inline="always")
    def _four(xp, n, h, c, p0, p1, p2, p3):
        """Word c of pixels p0..p3 of row h of image n."""
        return xp[n, h, p0, c], xp[n, h, p1, c], xp[n, h, p2, c], xp[n, h, p3, c]

    @cached_njit(inline="always")
    def row_offsets(xp, rows, taps, wpg):
        """Bytes from a pixel's first word to weight row r's word (tap i = r // (kw wpg), j, word q)."""
        _, kw, _, _, dh, dw = taps
        offs = np.empty(rows, np.int64)
        for r in range(rows):
            offs[r] = (r // (kw * wpg) * dh * xp.strides[1] + r // wpg % kw * dw * xp.strides[2]) + r % wpg * 8
        return offs

    @cached_njit(inline="always")
    def count_tile(xp, wt, taps, offs, n, oh, g, o0, acc):
        """Phase 1: acc[ow, o] = the disagreeing bits of output pixel (oh, ow), channel o0 + o of group g.

        Blocks of 8k channels: ``count_block`` (the counts of 4 output pixels x 8 channels in registers over
        all rows of the weight, ``intrinsics.dot4x8``). Other blocks: the rows four at a time, four output pixels at once
        (per output channel four weight loads serve sixteen popcounts, each count loaded and stored once per
        pass); the first pass masks acc's unset values to 0 (an AND with keep = 0, then -1) instead of
        zeroing every task's acc. acc's rows wo..wo + 2 are scratch for the pixels past the last."""
        groups, rows, og = wt.shape
        wo, m = acc.shape[0] - 3, acc.shape[1]
        wpg = xp.shape[3] // groups
        _, kw, sh, sw, dh, dw = taps
        if m % 8 == 0:  # the counts of 4 pixels x 8 channels stay in registers over all rows
            xrow = xp[n, oh * sh, 0, g * wpg : (g + 1) * wpg].ctypes.data
            count_block(xrow, xp.strides[2] * sw, offs, wt[g, 0, o0 : o0 + m].ctypes.data, og * 8, acc, m)
            return
        hs = np.empty(4, np.int64)  # per row of the four: input row, column offset, word
        ws = np.empty(4, np.int64)
        cs = np.empty(4, np.int64)
        for r0 in range(0, rows, 4):  # 4 rows at a time, the counts in acc
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
            keep = np.int32(0) if r0 == 0 else np.int32(-1)
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
                        _add_row(acc, ow, w1, x0, x1, x2, x3, keep if e == 0 else np.int32(-1))
