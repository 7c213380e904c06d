"""numba's xnor-popcount conv for packed 1-bit layers (the optional ``[fast]`` extra).

``xnor_conv`` takes ``packing.pack_activations``' words of sign(x) and ``packing.pack_weights``' words and
counts the bits where input and weight disagree, d, over each receptive field. The unused high bits of a
group's last word are 0 on both sides and never disagree, so over the fan_in real bits ``dot = fan_in - 2 d``
and the offset's ``(dot + fan_in) / 2 = fan_in - d``: integers, exact in float32.

The kernel, ``_conv``, runs one task per (image, output row, group, block of output channels) in three
phases, each a helper numba inlines: the count tile (``_count_tile``: the counts (Wo, block) in L1), the
epilogue (``_epilogue``: counts to float32 through the per-channel affine, then the unit's shortcut and
channels_last residual) and the transposed store (``_store``: NCHW in 8 x 8 blocks, with an NCHW residual
and the next conv's packed signs). Its arguments come in named bundles: ``_Taps`` (the geometry),
``_Epilogue`` (fan_in, count or dot, the affine), ``Shortcut`` and ``_Unit`` (a fused residual unit's
extras); the kernel receives ``_Taps``, ``_Epilogue`` and ``_Unit`` as plain tuples in their field order
and unpacks them by those names (numba types a plain tuple in C, a named one in Python). The LLVM pieces
the loops call (popcount, FMA, the 4 x 8 count block, the epilogue's 8 x 8 transpose, prefetch) are
in ``bitrain.deploy.intrinsics``. ``xnor_conv``'s unit arguments (a residual, a 1x1 shortcut, the output's
signs packed for the next conv) serve ``bitrain.deploy.fused``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from bitrain.binary.geometry import conv_out_size
from bitrain.deploy.epilogue import affine as _affine
from bitrain.deploy.packing import MINUS_ZERO, cached_njit, channels_last, jit, numba, pack_activations, set_threads

if numba is not None:
    from numba import prange

    from bitrain.deploy.counts import count_block, count_tile, row_offsets, shortcut_counts
    from bitrain.deploy.intrinsics import (
        prefetch,
        transpose8,
        transpose8_residual,
        transpose8_residual_signs,
        transpose8_signs,
    )


class Shortcut(NamedTuple):
    """A 1x1 conv over the same packed input as the main conv, with the main conv's stride: its output
    pixel (oh, ow) reads the input pixel (oh sh, ow sw), i.e. the padded pixel (oh sh + oh0, ow sw + ow0)
    where (oh0, ow0) is the main conv's padding. Its counts, mapped by its own affine, are added to the
    main conv's (a ResNet downsample shortcut, ``fused.PackedResidual``)."""

    words: np.ndarray  # pack_weights of the 1x1 conv, groups 1: (1, wpg, og)
    oh: int
    ow: int
    fan_in: int
    form: int
    alpha: np.ndarray
    beta: np.ndarray


class _Taps(NamedTuple):
    """The conv's geometry: kernel (kh, kw), stride (sh, sw), dilation (dh, dw)."""

    kh: int
    kw: int
    sh: int
    sw: int
    dh: int
    dw: int


class _Epilogue(NamedTuple):
    """Counts to outputs: v = fan_in - scale * d (scale 1: the agreeing bits, 2: the +-1 dot), then
    ``_affine(v, alpha[c], beta[c], form)`` per output channel c."""

    fan_in: int
    scale: int
    form: int
    alpha: np.ndarray
    beta: np.ndarray


class _Unit(NamedTuple):
    """A fused residual unit's arrays, each off when empty: ``res`` an NCHW float32 residual, ``res_nhwc`` a
    channels_last one; ``yp`` uint8 (N, Ho + 2 qh, Wo + 2 qw, 8 * words), the sums' signs packed for the next
    conv, a byte per 8 channels. (Its 1x1 shortcut, a ``Shortcut``, is an argument of its own.)"""

    res: np.ndarray
    res_nhwc: np.ndarray
    yp: np.ndarray


_EXACT = 1 << 24  # fan_in below it: counts and fan_in - scale * count are exact in float32
_NO_AFFINE = np.zeros(0, np.float32)  # alpha and beta of a layer without a fused BatchNorm (form 0)
_NO_WORDS = np.zeros((0, 0, 0), np.uint64)
_NO_ROWS = np.zeros((0, 0, 0, 0), np.float32)
_NO_BYTES = np.zeros((0, 0, 0, 0), np.uint8)
_NO_SHORTCUT = Shortcut(_NO_WORDS, 0, 0, 0, 0, _NO_AFFINE, _NO_AFFINE)

if numba is not None:

    @cached_njit(inline="always")
    def _prefetch_residual(res, res_nhwc, n, oh, oc, m, wo):
        """The residual's values of this task, on their way while the popcounts run: 2x faster from DRAM."""
        if res.shape[0] > 0:  # NCHW: the rows of the m channels
            for o in range(m):
                row = res[n, oc + o, oh].ctypes.data
                for b in range(0, wo * 4, 64):
                    prefetch(row + b)
        if res_nhwc.shape[0] > 0:  # channels_last: m channels of each pixel
            for ow in range(wo):
                px = res_nhwc[n, oh, ow, oc:].ctypes.data
                for b in range(0, m * 4, 64):
                    prefetch(px + b)

    @cached_njit(inline="always")
    def _map_counts(acc, fan_in, scale, a, b, form, tile, add):
        """tile[ow, o] (+)= ``_affine(fan_in - scale * acc[ow, o], a[o], b[o], form)`` in float32: the counts
        and fan_in are integers below 2^24 (``xnor_conv`` checks), so each value is exact as it was in int64.
        One loop per form and int32 counts: numba vectorises each (8 lanes on AVX2)."""
        f, s = np.float32(fan_in), np.float32(scale)
        wo, m = tile.shape
        for ow in range(wo):
            if form == 1:
                for o in range(m):
                    v = _affine(f - s * np.float32(acc[ow, o]), a[o], b[o], 1)
                    tile[ow, o] = tile[ow, o] + v if add else v
            elif form == 2:
                for o in range(m):
                    v = _affine(f - s * np.float32(acc[ow, o]), a[o], b[o], 2)
                    tile[ow, o] = tile[ow, o] + v if add else v
            else:
                for o in range(m):
                    v = f - s * np.float32(acc[ow, o])
                    tile[ow, o] = tile[ow, o] + v if add else v

    @cached_njit(inline="always")
    def _epilogue(acc, epi, oc, tile):
        """Phase 2: tile[ow, o] = the float32 output of count acc[ow, o], mapped by channel oc + o's affine."""
        fan_in, scale, form, alpha, beta = epi
        m = tile.shape[1]
        _map_counts(acc, fan_in, scale, alpha[oc : oc + m], beta[oc : oc + m], form, tile, False)

    @cached_njit(inline="always")
    def _add_shortcut(xp, sc, sc_offs, scale, n, h, sw, o0, oc, wstride, acc, tile):
        """Phase 2, a unit's 1x1 shortcut: its counts over input row h, pixels (ow sw), mapped and added."""
        m = tile.shape[1]
        if m % 8 == 0:
            xrow = xp[n, h, sc.ow, :].ctypes.data
            count_block(xrow, xp.strides[2] * sw, sc_offs, sc.words[0, 0, o0 : o0 + m].ctypes.data, wstride, acc, m)
        else:
            shortcut_counts(xp, sc, n, h, sc.ow, sw, o0, m, acc)
        _map_counts(acc, sc.fan_in, scale, sc.alpha[oc : oc + m], sc.beta[oc : oc + m], sc.form, tile, True)

    @cached_njit(inline="always")
    def _add_channels_last(res_nhwc, n, oh, oc, tile):
        """Phase 2, a unit's channels_last residual: contiguous per pixel, added before the transpose."""
        for ow in range(tile.shape[0]):
            rr = res_nhwc[n, oh, ow, oc : oc + tile.shape[1]]
            for o in range(tile.shape[1]):
                tile[ow, o] += rr[o]

    @cached_njit(inline="always")
    def _store(tile, out, res, yp, n, oh, oc):
        """Phase 3: tile (Wo, m) into out[n, oc : oc + m, oh] (NCHW) in 8 x 8 transposed blocks, adding an
        NCHW residual and packing the sums' signs into yp on the way; the last pixels and channels one by one."""
        wo, m = tile.shape
        ho = out.shape[2]
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
                    byte |= np.uint8(tail_bits[j] <= MINUS_ZERO) << np.uint8(j)
                if has_signs:
                    yp[n, oh + qh, ow + qw, (oc + ob) // 8] = byte
        for o in range(m8, m):  # never with signs (xnor_conv keeps the blocks whole bytes then)
            for ow in range(wo):
                v = tile[ow, o] + res[n, oc + o, oh, ow] if has_res else tile[ow, o]
                out[n, oc + o, oh, ow] = v

    @jit
    def _conv(xp, wt, out, taps, epi, shortcut, unit, oblock):
        # xp (N, Hp, Wp, groups * wpg) uint64, wt (groups, kh * kw * wpg, og) uint64, out (N, O, Ho, Wo) float32.
        # One task per (image, output row, group, block of oblock output channels), in three phases: count,
        # epilogue, transposed store (module docstring); its counts (Wo, block) stay in L1.
        sc = Shortcut(*shortcut)  # a plain tuple in (typed in C), named here
        groups, rows, og = wt.shape
        wpg = xp.shape[3] // groups
        ho, wo = out.shape[2], out.shape[3]
        nob = (og + oblock - 1) // oblock
        offs = row_offsets(xp, rows, taps, wpg)
        res, res_nhwc, yp = unit
        sh, sw, scale = taps[2], taps[3], epi[1]
        sc_offs = np.arange(sc.words.shape[1]) * 8  # the shortcut's rows: the words of one pixel
        for t in prange(xp.shape[0] * ho * groups * nob):
            ob = t % nob
            r = t // nob
            g = r % groups
            r = r // groups
            oh = r % ho
            n = r // ho
            o0 = ob * oblock
            m = min(o0 + oblock, og) - o0
            oc = g * og + o0
            acc = np.empty((wo + 3, m), np.int32)  # rows wo..wo + 2: scratch for the pixels past the last
            _prefetch_residual(res, res_nhwc, n, oh, oc, m, wo)
            count_tile(xp, wt, taps, offs, n, oh, g, o0, acc)
            tile = np.empty((wo, m), np.float32)
            _epilogue(acc, epi, oc, tile)
            if sc.words.shape[0] > 0:  # the 1x1 shortcut reads the input pixel (oh sh, ow sw)
                h = oh * sh + sc.oh
                _add_shortcut(xp, sc, sc_offs, scale, n, h, sw, o0, oc, og * 8, acc, tile)
            if res_nhwc.shape[0] > 0:
                _add_channels_last(res_nhwc, n, oh, oc, tile)
            _store(tile, out, res, yp, n, oh, oc)


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
    Each value is rounded as torch rounds ``conv + bn`` then ``+ shortcut``: the same bits.

    ``prepare`` + ``run`` are the same call in two steps, for a caller that repeats it (``fused``)."""
    geometry = dict(kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    call = prepare(tuple(x.shape), weights, fan_in=fan_in, count=count, affine=affine, shortcut=shortcut, **geometry)
    return run(call.with_output(pack_out, residual is not None or shortcut is not None), x, packed, residual)


class ConvCall(NamedTuple):
    """``xnor_conv``'s arguments for one input shape, worked out once (``prepare``); ``run`` takes the input."""

    in_shape: tuple[int, ...]
    weights: np.ndarray
    padding: tuple[int, int]
    subsample: tuple[int, int] | None  # a strided 1x1 conv: pack every sh-th pixel (unpacked input, no unit)
    taps: tuple  # _Taps as a plain tuple
    packed_shape: tuple[int, ...]  # pack_activations(x, padding)'s shape: what ``run``'s ``packed`` must be
    out_shape: tuple[int, ...]
    epi: tuple  # _Epilogue as a plain tuple
    shortcut: Shortcut | None
    sc_args: tuple  # the shortcut (or none) as the kernel takes it: a plain tuple
    pack_out: tuple[int, int] | None
    yp_shape: tuple[int, ...] | None
    oblocks: dict  # threads -> _oblock's value

    def with_output(self, pack_out: tuple[int, int] | None, unit: bool = False) -> ConvCall:
        """This call packing its output's signs with padding ``pack_out`` for the next conv (None: not)."""
        if (unit or pack_out is not None or self.shortcut is not None) and self.weights.shape[0] != 1:
            raise ValueError("xnor_conv: shortcut, residual and pack_out need groups 1")
        if pack_out is None:
            return self._replace(pack_out=None, yp_shape=None, oblocks={})
        og = self.weights.shape[2]
        if og % 8:
            raise ValueError(f"xnor_conv: pack_out needs a multiple of 8 output channels, not {og}")
        (qh, qw), (n, _, ho, wo) = pack_out, self.out_shape
        yp_shape = (n, ho + 2 * qh, wo + 2 * qw, 8 * ((og + 63) // 64))
        return self._replace(pack_out=tuple(pack_out), yp_shape=yp_shape, oblocks={})


def prepare(
    shape: tuple[int, ...],
    weights: np.ndarray,
    *,
    kernel_size: tuple[int, int] = (1, 1),
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    fan_in: int,
    count: bool,
    affine: tuple[np.ndarray, np.ndarray, int] | None = None,
    shortcut: Shortcut | None = None,
) -> ConvCall:
    """``xnor_conv``'s call for inputs of ``shape`` (N, C, H, W), without packing its output (``with_output``)."""
    groups, _, og = weights.shape
    n, c, h, w = shape
    (kh, kw), (sh, sw), (dh, dw), padding = kernel_size, stride, dilation, tuple(padding)
    if max(fan_in, shortcut.fan_in if shortcut is not None else 0) >= _EXACT:
        raise ValueError(f"xnor_conv: fan_in {fan_in} is not below 2^24 (the epilogue's float32 arithmetic)")
    ho, wo = conv_out_size(h + 2 * padding[0], kh, sh, 0, dh), conv_out_size(w + 2 * padding[1], kw, sw, 0, dw)
    one = (kh, kw) == (1, 1) and padding == (0, 0) and shortcut is None
    alpha, beta, form = affine if affine is not None else (_NO_AFFINE, _NO_AFFINE, 0)
    return ConvCall(
        in_shape=tuple(shape),
        weights=weights,
        padding=padding,
        subsample=(sh, sw) if one else None,
        taps=tuple(_Taps(kh, kw, sh, sw, dh, dw)),
        packed_shape=(n, h + 2 * padding[0], w + 2 * padding[1], groups * ((c // groups + 63) // 64)),
        out_shape=(n, groups * og, ho, wo),
        epi=tuple(_Epilogue(fan_in, 1 if count else 2, form, alpha, beta)),  # fan_in - d agreeing bits, or the dot
        shortcut=shortcut,
        sc_args=tuple(shortcut or _NO_SHORTCUT),
        pack_out=None,
        yp_shape=None,
        oblocks={},
    )


def _oblock(call: ConvCall) -> int:
    """Output channels per task: all, or halved while there are fewer than 8 tasks per thread (small maps,
    batch 1), keeping whole bytes of the next conv's words where the output is packed."""
    threads = torch.get_num_threads()
    oblock = call.oblocks.get(threads)
    if oblock is None:
        groups, _, og = call.weights.shape
        oblock, rows = og, call.out_shape[0] * call.out_shape[2] * groups
        while oblock > 32 and rows * ((og + oblock - 1) // oblock) < 8 * threads:
            if call.pack_out is not None and (oblock // 2) % 8:
                break
            oblock //= 2
        call.oblocks[threads] = oblock
    return oblock


def run(
    call: ConvCall, x: torch.Tensor, packed: np.ndarray | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
    """``call`` (``prepare``) on x, with its packed signs when the caller has them, and a residual."""
    if tuple(x.shape) != call.in_shape:
        raise ValueError(f"xnor_conv: input {tuple(x.shape)} for a call prepared for {call.in_shape}")
    taps, groups = call.taps, call.weights.shape[0]
    if packed is not None:
        if packed.shape != call.packed_shape:
            raise ValueError(f"xnor_conv: packed input {packed.shape} where {call.packed_shape} was expected")
        set_threads()  # else pack_activations sets them
    elif call.subsample is not None and call.pack_out is None and residual is None:
        packed, taps = pack_activations(x, (0, 0), groups, call.subsample), taps[:2] + (1, 1) + taps[4:]
    else:
        packed = pack_activations(x, call.padding, groups)
    out = torch.empty(call.out_shape, dtype=torch.float32)
    res, res_nhwc = _NO_ROWS, _NO_ROWS
    if residual is not None:
        if residual.shape != out.shape or residual.dtype != torch.float32:
            raise ValueError(
                f"xnor_conv: residual {residual.dtype} {tuple(residual.shape)} for float32 {call.out_shape}"
            )
        if groups != 1:
            raise ValueError("xnor_conv: shortcut, residual and pack_out need groups 1")
        if channels_last(residual):  # (N, H, W, C) as it lies: added pixel by pixel
            res_nhwc = residual.detach().permute(0, 2, 3, 1).numpy()
        else:
            res = residual.detach().contiguous().numpy()
    yp = _NO_BYTES if call.yp_shape is None else np.zeros(call.yp_shape, np.uint8)  # border zero bits: -1 padding
    # plain tuples into numba: it types a named tuple argument in Python, 2-3 us a call; a tuple in C
    unit = (res, res_nhwc, yp)  # _Unit's fields
    _conv(packed, call.weights, out.numpy(), taps, call.epi, call.sc_args, unit, _oblock(call))
    return out if call.yp_shape is None else (out, yp.view(np.uint64))
