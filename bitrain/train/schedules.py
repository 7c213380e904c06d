"""Learning rate as a pure function of the step: nothing to checkpoint, resume just works.
Torch-free (the CLI's option schema reads ``DEFAULT_LR_STEPS`` from here).

The shapes follow gluoncv's ``LRScheduler`` / ``LRSequential`` that BMXNet v2 uses: a linear
warmup over ``warmup_epochs`` from ``warmup_lr`` to ``lr`` (BMXNet parses ``--warmup-lr`` but
ignores it; bitrain honours it), then the main schedule over the remaining epochs with the
``--lr-steps`` shifted by the warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

from bitrain.errors import UserError
from bitrain.names import LR_MODES

#: the epochs at which step mode drops the lr when none are given (BMXNet's ``--lr-steps`` default);
#: the one home of this default: ``bitrain train``'s ``--lr-steps`` reads it too
DEFAULT_LR_STEPS: tuple[float, ...] = (30, 60, 90)


def lr_at(
    step: int,
    *,
    lr: float,
    mode: str,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0,
    warmup_lr: float = 0.0,
    lr_steps: Sequence[float] = DEFAULT_LR_STEPS,
    lr_factor: float = 0.1,
    power: float = 2.0,
    target_lr: float = 0.0,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based, counted over the whole run)."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:  # linear from warmup_lr (at step 0) towards lr (at warmup_steps)
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    t = step - warmup_steps  # steps into the main schedule
    n = max(1, round(epochs * steps_per_epoch) - warmup_steps)  # length of the main schedule
    if mode == "step":
        # BMXNet shifts the step epochs by the warmup: a drop at epoch e happens after e - warmup
        # epochs of the main schedule.
        passed = sum(1 for e in lr_steps if t >= round((e - warmup_epochs) * steps_per_epoch))
        return lr * lr_factor**passed
    progress = min(t, n) / n
    if mode == "cosine":
        return target_lr + (lr - target_lr) * (1 + math.cos(math.pi * progress)) / 2
    if mode == "poly":
        return target_lr + (lr - target_lr) * (1 - progress) ** power
    if mode == "linear":
        return target_lr + (lr - target_lr) * (1 - progress)
    raise UserError(f"--lr-mode {mode!r} is not one of: {', '.join(LR_MODES)}")


def make_schedule(**kwargs) -> Callable[[int], float]:
    """``step -> lr`` with the arguments of :func:`lr_at` bound (checked once, here)."""
    if kwargs.get("mode") not in LR_MODES:
        raise UserError(f"--lr-mode {kwargs.get('mode')!r} is not one of: {', '.join(LR_MODES)}")
    if kwargs.get("steps_per_epoch", 0) <= 0:
        raise ValueError("steps_per_epoch must be positive")
    return partial(lr_at, **kwargs)
