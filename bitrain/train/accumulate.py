"""Gradient accumulation (Lightning's ``accumulate_grad_batches``, timm's ``--grad-accum-steps``) as
window arithmetic: ``every`` micro-batches of the loader make one optimizer step. The schedule, the
log interval, ``TrainState.batch``/``step`` and the checkpoints count optimizer steps; checkpoints
are written at window boundaries only, so a resumed run restarts at a window's first micro-batch
and continues bit-identical. An epoch whose batch count is not a multiple of ``every`` ends with a
shorter window that still steps (as timm), its loss scaled by 1/(its size) instead of 1/``every``.
Under DDP the window's first micro-steps skip the gradient all-reduce (``no_sync``)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch.nn as nn

from bitrain.errors import UserError


@dataclass(frozen=True)
class Accumulation:
    """``every`` micro-batches per optimizer step over an epoch of ``batches`` micro-batches."""

    every: int = 1
    batches: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise UserError(f"--accumulate must be >= 1, got {self.every}")

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch: the last, shorter window steps too."""
        return math.ceil(self.batches / self.every)

    def window_size(self, step_in_epoch: int) -> int:
        """Micro-batches in window ``step_in_epoch`` (0-based): ``every``, or the remainder for the last."""
        return max(1, min(self.every, self.batches - step_in_epoch * self.every))

    def first_batch(self, step_in_epoch: int) -> int:
        """The loader position (micro-batches) where window ``step_in_epoch`` starts (the epoch's end
        after its last, shorter window)."""
        return min(step_in_epoch * self.every, self.batches)


def no_sync(net: nn.Module, skip: bool):
    """DDP's ``no_sync`` on ``net`` (also under ``torch.compile``) when ``skip``, else nothing."""
    ddp = net if isinstance(net, nn.parallel.DistributedDataParallel) else getattr(net, "_orig_mod", None)
    if skip and isinstance(ddp, nn.parallel.DistributedDataParallel):
        return ddp.no_sync()
    return contextlib.nullcontext()
