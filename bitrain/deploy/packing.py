"""Signs to 64-bit words for numba's xnor-popcount conv (``conv.py``; the optional ``[fast]`` extra).

Bits are little-endian, 1 = +1 and 0 = -1, as in the export (``docs/export.md``). Layouts:

- activations, ``pack_activations``: float32 (N, C, H, W) -> uint64 (N, H + 2 ph, W + 2 pw, groups * wpg),
  wpg = ceil(C / groups / 64) words per pixel and group; channel c of group g is bit c % 64 of word
  g * wpg + c // 64. The border is all zero bits, i.e. -1: BMXNet's -1 padding of a binary input, exact.
- weights, ``pack_weights``: the export's (out, ceil(fan_in / 8)) uint8 rows -> uint64
  (groups, kh * kw * wpg, out / groups): for tap (i, j) and word q, that word of every output channel of
  the group side by side, so the conv's inner loop runs over output channels with the input word held.

The sign is fused into the packing: bit = 1 where ``sign(x) = +1`` as ``quantizers._sign`` defines it,
``copysign(1, x + 0.0)``: the IEEE sign bit clear, or x = -0.0 (which becomes +0.0). NaN keeps its sign bit.
As one unsigned compare of the float's bits u: ``u <= 0x80000000`` (the bits of -0.0).
Threads: torch's setting (``torch.get_num_threads()``), passed to numba on every call.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from bitrain.deploy import kernel_cache

try:
    import numba
    from numba import prange

    from bitrain.deploy.intrinsics import prefetch, signword64, signwords8, signwords16
except ImportError as e:  # the [fast] extra is not installed: callers use the torch reference
    numba = None
    IMPORT_ERROR: str | None = f"{type(e).__name__}: {e}"
else:
    IMPORT_ERROR = None

MINUS_ZERO = np.uint32(0x80000000)  # float32 -0.0 as uint32: bits u <= it are the x with sign(x) = +1


def cached_njit(**options):
    """numba's njit with ``options``, cached in ``kernel_cache.cache_dir()`` (a folder per version of the
    kernels' sources, never numba's ``__pycache__``), else compiled at each start."""

    def decorate(fn):
        if _CACHE_DIR is None:
            return numba.njit(**options)(fn)
        saved, numba.config.CACHE_DIR = numba.config.CACHE_DIR, str(_CACHE_DIR)  # read once, here
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # numba found no usable cache location after all: compile at each start
            return numba.njit(**options)(fn)
        finally:
            numba.config.CACHE_DIR = saved

    return decorate


def jit(fn):
    """A parallel kernel (``cached_njit``)."""
    return cached_njit(parallel=True, fastmath=False, nogil=True)(fn)


_CACHE_DIR = kernel_cache.cache_dir() if numba is not None else None


if numba is not None:

    @jit
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
                                    b[w] |= np.uint32(xr[w] <= MINUS_ZERO) << shift
                            else:  # a strided 1x1 conv: every sw-th column
                                for w in range(w_):
                                    b[w] |= np.uint32(xbits[n, c, hx, w * sw] <= MINUS_ZERO) << shift
                    for r in range(rows):
                        for w in range(w_):
                            out[n, h0 + r + ph, w + pw, g * wpg + q] = np.uint64(buf[0, r, w]) | (
                                np.uint64(buf[1, r, w]) << np.uint64(32)
                            )

    @jit
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
                            word |= np.uint64(xbits[n, h, w, c] <= MINUS_ZERO) << np.uint64(c - 64 * q)
                        out[n, h + ph, w + pw, q] = word


def available() -> bool:
    """True when numba imports (the ``[fast]`` extra is installed)."""
    return numba is not None


_SET = threading.local()  # per thread (numba's setting is): the torch thread count last passed on


def set_threads() -> None:
    """numba's threads: torch's setting, within numba's own limit (set again when torch's changes). The first
    call starts numba's thread pool, and its OpenMP layer then sets the process's OpenMP default to all of
    numba's threads (torch and numba share libgomp): torch's setting is put back, else a model run at 1
    thread would run at all after it."""
    threads = torch.get_num_threads()
    if getattr(_SET, "threads", None) == threads:
        return
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _SET.threads = threads


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


def channels_last(x: torch.Tensor) -> bool:
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
    set_threads()
    if channels_last(x) and groups == 1 and (sh, sw) == (1, 1):  # read in place: 64 channels per compare
        _pack_nhwc(x.permute(0, 2, 3, 1).numpy().view(np.uint32), ph, pw, out)
        return out
    x = x.contiguous()
    # row blocks of about 2048 pixels, at least four per thread
    rblock = max(1, min(hs, 2048 // max(ws, 1), (n * hs) // (4 * torch.get_num_threads()) or 1))
    _pack(x.numpy().view(np.uint32), ph, pw, groups, sh, sw, rblock, out)
    return out
