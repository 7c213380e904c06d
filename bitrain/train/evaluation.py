"""Validation as pure functions: top-1/top-5/loss of a model over a loader, BatchNorm statistics
re-estimated for the current weights, and the compute dtype by name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.errors import UserError
from bitrain.train.metrics import EpochMetrics

_AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # keys: bitrain.names.DTYPES


def autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A compute dtype name (``--dtype``) or torch dtype -> the autocast dtype (None: float32, no autocast)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    try:
        return _AUTOCAST[dtype]
    except KeyError:
        raise UserError(f"--dtype {dtype!r} is not valid; choose from: {', '.join(_AUTOCAST)}") from None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    max_batches: int | None = None,
    metrics: EpochMetrics | None = None,
) -> dict[str, float]:
    """Top-1, top-5 and mean loss of ``model`` over ``loader`` (eval mode, no grad), exact over all
    samples and, under DDP, over all ranks."""
    device = torch.device(device)
    metrics = metrics or EpochMetrics(device)
    metrics.reset()
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        with autocast:
            logits = model(x)
        loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
        metrics.update(logits, y, loss_sum)
    model.train(was_training)
    return metrics.compute()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, count: int) -> int:
    """Set every BatchNorm's running statistics of ``model`` to their exact average (momentum None) over
    the first ``count`` batches ``(x, y)`` of ``batches``, in train mode; nothing else changes. Returns
    the number of BatchNorm layers.

    Why a binary net needs it: a fraction of its weight signs flips at every step, so the true statistics
    move about as far within the running average's horizon (momentum 0.1: ~10 steps) as that average's
    own error, and the next layer's sign() turns a 0.05-sigma error in a BN mean into points of accuracy
    (docs/recipes.md has the measurement).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    try:
        for i, (x, _) in enumerate(batches):
            if i >= count:
                break
            model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(bns)
