"""Optimizers by name, with BMXNet's parameter groups: no weight decay for BatchNorm parameters,
biases and binary (latent) weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from bitrain.errors import UserError

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda groups, lr, momentum, **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum),
    "nag": lambda groups, lr, momentum, **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0),
    "adam": lambda groups, lr, **kw: torch.optim.Adam(groups, lr=lr),
    "radam": lambda groups, lr, **kw: torch.optim.RAdam(groups, lr=lr),
    # AdamW's decay is decoupled; the group's weight_decay is honoured the same way.
    "adamw": lambda groups, lr, **kw: torch.optim.AdamW(groups, lr=lr),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS) + ("bop",)


def is_binary_weight(module: nn.Module, name: str) -> bool:
    """A latent weight that forward binarises (a Q layer's weight with fewer than 32 bits)."""
    return name == "weight" and getattr(module, "bits", 32) < 32 and hasattr(module, "act")


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Two groups: decayed (float weights) and not decayed (BN, biases, binary latent weights)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = p.ndim <= 1 or isinstance(module, nn.modules.batchnorm._NormBase) or is_binary_weight(module, name)
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    momentum: float = 0.9,
    wd: float = 0.0,
    bop_threshold: float = 1e-8,
    bop_gamma: float = 1e-4,
    bop_inner: str = "adam",
) -> torch.optim.Optimizer:
    """``name`` in sgd, nag, adam, radam, adamw, bop (binary weights flipped by Bop, the rest by ``bop_inner``)."""
    if name == "bop":
        from bitrain.binary.bop import build_bop  # binary-only optimizer, lives with the binary layers

        return build_bop(model, bop_inner, lr=lr, threshold=bop_threshold, gamma=bop_gamma, momentum=momentum, wd=wd)
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r} is not one of: {', '.join(OPTIMIZER_NAMES)}")
    return OPTIMIZERS[name](param_groups(model, wd), lr=lr, momentum=momentum)
