"""ReActNet's learnable shifts (Liu et al., 2020): ``LearnableBias``, ``RSign`` and ``RPReLU``.

ReActNet moves the sign's threshold and the activation's origin per channel, learnt:

* ``RSign(x) = sign(x + b)``, b per channel: the binary conv's input threshold. Inside a bitrain block
  this is ``LearnableBias`` in front of a ``QConv2d``, whose own input quantizer takes the sign.
* ``RPReLU(x) = PReLU(x + b1) + b2``, b1, b2 and the negative slope per channel: the block's
  nonlinearity after the shortcut add, where a plain ResNetE block has none.

All parameters start at the identity (biases 0, slope 0.25 as ``nn.PReLU``), so a net built with them
starts as the net without them plus a PReLU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.binary.quantizers import INF, Quantizer, get_quantizer


class LearnableBias(nn.Module):
    """x + b, one learnt b per channel (dim 1), zero at the start. State dict key: ``bias`` [C]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return str(self.bias.numel())


class RSign(nn.Module):
    """sign(x + b) with a learnt per-channel threshold; the gradient of ``method`` (default det_sign, the STE;
    ReActNet's own is approx_sign) reaches both x and b."""

    def __init__(self, channels: int, method: str | Quantizer = "det_sign", clip_threshold: float = INF) -> None:
        super().__init__()
        self.shift = LearnableBias(channels)
        self.quantize = get_quantizer(method, 1, "activation")
        self.clip_threshold = clip_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.shift(x), self.clip_threshold)


class RPReLU(nn.Module):
    """PReLU(x + b1) + b2, all three per channel. State dict keys: ``shift_in.bias``, ``prelu.weight``,
    ``shift_out.bias``."""

    def __init__(self, channels: int, init: float = 0.25) -> None:
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels, init)
        self.shift_out = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift_out(self.prelu(self.shift_in(x)))
