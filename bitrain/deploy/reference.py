"""The torch reference's bit helpers: sign bits packed 8 per byte (the export's rows), int64 words, a SWAR
popcount and the +-1 dot product of packed operands. Exact and dependency-free (``packed.PackedQLayer``'s
``torch`` kernel; the export packs its weights with ``pack_signs``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """(..., K) bool (True = +1) -> (..., ceil(K / 8)) uint8, little-endian bit order, zero pad bits."""
    k = positive.shape[-1]
    b = F.pad(positive.to(torch.uint8), (0, (-k) % 8))
    b = b.reshape(*b.shape[:-1], -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=b.device)
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(..., nbytes) uint8 -> (..., k) float32 of +-1 (inverse of ``pack_signs``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :k]
    return bits.float() * 2 - 1


def _words(packed: torch.Tensor) -> torch.Tensor:
    """(..., nbytes) uint8 -> (..., ceil(nbytes / 8)) int64 words (zero bytes pad the last word)."""
    packed = F.pad(packed, (0, (-packed.shape[-1]) % 8)).contiguous()
    return packed.view(torch.int64)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits per int64 word (SWAR), computed in place in ``x``; the arithmetic shifts' sign
    bits are masked away and the final multiply wraps, its top byte (<= 64) being the count."""
    t = x >> 1
    x -= t.bitwise_and_(0x5555555555555555)
    t = x >> 2
    x.bitwise_and_(0x3333333333333333).add_(t.bitwise_and_(0x3333333333333333))
    x.add_(x >> 4).bitwise_and_(0x0F0F0F0F0F0F0F0F)  # each byte now holds its own count (0..8)
    return x.mul_(0x0101010101010101).bitwise_right_shift_(56)


def xnor_dot(x_words: torch.Tensor, w_words: torch.Tensor, fan_in: int, chunk: int = 1 << 18) -> torch.Tensor:
    """+-1 dot products from packed operands: dot = fan_in - 2 popcount(x xor w).

    x_words (M, nw) int64, w_words (O, nw) int64 -> (M, O) int64; M is chunked so the (m, O, nw)
    xor never exceeds ``chunk`` words (2 MiB: stays in cache).
    """
    m, nw = x_words.shape
    step = max(1, chunk // max(1, w_words.shape[0] * nw))
    out = [fan_in - 2 * _popcount(x_words[i : i + step, None, :] ^ w_words[None]).sum(-1) for i in range(0, m, step)]
    return torch.cat(out) if out else x_words.new_zeros((0, w_words.shape[0]))
