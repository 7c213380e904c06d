"""Quantizers that change with the epoch (bitorch): a progressive sign and a quantizer scheduler.

A trainer drives them with ``set_quantizer_epoch(model, epoch)`` at each epoch start and after a
resume, so their behaviour is a pure function of the epoch.
"""

from __future__ import annotations

import torch

from bitrain.binary.quantizers import INF, _SteValue, det_sign, get_quantizer, spec
from bitrain.errors import UserError

# The schedule position lives in a non-persistent 0-d buffer, so changing it neither
# recompiles a torch.compile'd model nor adds keys to the state_dict; the trainer sets it
# again from the epoch on resume.


class ScheduledQuantizer(torch.nn.Module):
    """Base of quantizers whose behaviour follows the epoch: ``set_epoch(e)`` or ``step()``.

    ``progress`` goes linearly from 0 at epoch 0 to 1 at epoch ``epochs`` (clamped).
    """

    def __init__(self, epochs: int):
        super().__init__()
        if not isinstance(epochs, int) or epochs < 1:
            raise UserError(f"scheduled quantizer: epochs={epochs!r} must be an integer >= 1")
        self.epochs = epochs
        self.epoch = 0
        self.register_buffer("progress", torch.zeros(()), persistent=False)

    def set_epoch(self, epoch: int) -> None:
        """Set the schedule position to the start of ``epoch`` (0-based)."""
        self.epoch = int(epoch)
        self.progress.fill_(min(max(self.epoch / self.epochs, 0.0), 1.0))

    def step(self) -> None:
        """Advance by one epoch."""
        self.set_epoch(self.epoch + 1)


class ProgressiveSign(ScheduledQuantizer):
    """bitorch's progressive sign: hardtanh(x / (1 - temperature)) in training, sign in eval.

    temperature = 1 - alpha^(-beta * progress) goes 0 -> ~1 over ``epochs``; the backward is
    straight-through (with gradient cancel at ``clip_threshold``). Outputs +-1 at the end.
    """

    plus_minus_one = True  # its eval output is +-1: an export packs its inputs for xnor-popcount, as det_sign's

    def __init__(self, epochs: int, alpha: float = 4.0, beta: float = 10.0, clip_threshold: float = INF):
        super().__init__(epochs)
        self.alpha, self.beta, self.clip_threshold = float(alpha), float(beta), clip_threshold

    def temperature(self) -> torch.Tensor:
        """Current temperature in [0, 1)."""
        return 1.0 - self.alpha ** (-self.beta * self.progress)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return det_sign(x, self.clip_threshold)
        width = (1.0 - self.temperature()).clamp(min=1e-7).to(x.dtype)
        return _SteValue.apply(x, torch.nn.functional.hardtanh(x.detach() / width), self.clip_threshold)


class QuantizerScheduler(ScheduledQuantizer):
    """bitorch's mix-linear scheduling: blend quantizers ``[q0, q1, ...]`` as progress goes 0 -> 1.

    At progress p the output is (1 - f) q_i(x) + f q_{i+1}(x) with i + f = p (len - 1); the
    default goes from ``identity`` to ``det_sign`` (full precision -> binary).
    """

    def __init__(self, epochs: int, quantizers: tuple = ("identity", "det_sign"), clip_threshold: float = INF):
        super().__init__(epochs)
        if len(quantizers) < 1:
            raise UserError("QuantizerScheduler: quantizers must name at least one quantizer")
        fns = []
        for q in quantizers:
            if isinstance(q, str):
                record = spec(q)  # a 1-bit quantizer at 1 bit, a full-precision activation (identity) at 32
                fns.append(get_quantizer(q, 1 if record is None or 1 in record.bits else 32))
            else:
                fns.append(get_quantizer(q))
        self._fns = fns
        self.clip_threshold = clip_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight of q_k is the hat function relu(1 - |p n - k|): no Python branch on the
        # epoch, so a compiled model does not recompile when the schedule moves
        n = len(self._fns) - 1
        if n == 0:
            return self._fns[0](x, self.clip_threshold)
        pos = self.progress * n
        out = None
        for k, fn in enumerate(self._fns):
            w = torch.relu(1.0 - (pos - k).abs()).to(x.dtype)
            term = fn(x, self.clip_threshold) * w
            out = term if out is None else out + term
        return out


def set_quantizer_epoch(model: torch.nn.Module, epoch: int) -> int:
    """Call ``set_epoch(epoch)`` on every ScheduledQuantizer in ``model``; returns how many.

    A trainer calls this at the start of each epoch (before the first batch), and after a
    resume with the resumed epoch, so the schedule is a pure function of the epoch.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, ScheduledQuantizer):
            m.set_epoch(epoch)
            count += 1
    return count
