"""Convolution arithmetic shared by the quantized layers, the zoo and the packed engine (torch-free)."""

from __future__ import annotations


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output positions along one axis of a convolution (or a floor-mode pool) on ``size`` inputs:
    ``(size + 2 padding - dilation (kernel - 1) - 1) // stride + 1``, PyTorch's ``nn.Conv2d`` formula."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
