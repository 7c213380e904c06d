"""conv_out_size: PyTorch's output size of a convolution or a floor-mode pool, one axis."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from bitrain.binary.geometry import conv_out_size
from bitrain.binary.layers import QConv2d


def test_values():
    assert conv_out_size(224, 7, 2, 3) == 112
    assert conv_out_size(8, 3, 1, 1) == 8 and conv_out_size(7, 3, 2, 1) == 4  # ceil(7 / 2)
    assert conv_out_size(32, 3, 1, 2, dilation=2) == 32
    assert conv_out_size(5, 2, 2) == 2 and conv_out_size(1, 5) == -3  # a map too small: the caller refuses it


def test_matches_torch_conv_and_pool():
    for size, kernel, stride, padding, dilation in itertools.product(
        (1, 4, 7, 8), (1, 2, 3), (1, 2, 3), (0, 1), (1, 2)
    ):
        if padding > kernel // 2 or size + 2 * padding < dilation * (kernel - 1) + 1:
            continue
        x = torch.zeros(1, 1, size, size)
        w = torch.zeros(1, 1, kernel, kernel)
        out = F.conv2d(x, w, None, stride, padding, dilation).shape[-1]
        assert conv_out_size(size, kernel, stride, padding, dilation) == out
        assert (
            conv_out_size(size, kernel, stride, padding, dilation)
            == F.max_pool2d(x, kernel, stride, padding, dilation).shape[-1]
        )


def test_qconv2d_output_has_that_size():
    conv = QConv2d(2, 3, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    y = conv(torch.randn(1, 2, 9, 11))
    assert y.shape[-2:] == (conv_out_size(9, 3, 2, 1), conv_out_size(11, 5, 1, 2, 2))
