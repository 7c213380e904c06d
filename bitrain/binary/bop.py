"""Bop (Helwegen et al. 2019, larq's ``lq.optimizers.Bop``) for PyTorch.

Binary weights have no latent magnitude to optimise; Bop keeps an exponential moving average
of their gradient and flips a weight when the average is strong enough and agrees in sign:

    m <- (1 - gamma) m + gamma g
    w <- -w   where |m| > threshold and sign(m) == sign(w)      (w stays in {-1, +1})

Every other parameter (BatchNorm, float first/last layers, shortcuts) is trained by an inner
optimizer. Both live in ONE ``torch.optim.Optimizer``: ``param_groups[0]`` is Bop's group
(it ignores ``lr``), ``param_groups[1:]`` are the inner optimizer's own group dicts, so a
trainer that sets ``group["lr"]`` on every group drives the inner learning rate, and
``state_dict()`` / ``load_state_dict()`` carry both states in the standard format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d, QLinear, mark_latent_bounded
from bitrain.errors import UserError

INNER_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "nag": lambda params, **kw: torch.optim.SGD(params, nesterov=True, **{"momentum": 0.9, **kw}),
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "radam": torch.optim.RAdam,
}


def binary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Latent weights of the QConv2d / QLinear layers of ``model`` with 1-bit weights."""
    return [m.weight for m in model.modules() if isinstance(m, (QConv2d, QLinear)) and m.bits == 1]


class Bop(torch.optim.Optimizer):
    """Bop for the binary weights plus an inner optimizer for the rest, as one optimizer.

    Args:
        binary_params: the 1-bit latent weights (see ``binary_parameters``).
        inner: an optimizer already built on the other parameters.
        threshold: flip threshold tau on |m|.
        gamma: adaptivity rate of the gradient moving average m.
    """

    def __init__(self, binary_params, inner: torch.optim.Optimizer, threshold: float = 1e-8, gamma: float = 1e-4):
        if not threshold >= 0:
            raise UserError(f"Bop: threshold={threshold!r} must be >= 0")
        if not 0 < gamma <= 1:
            raise UserError(f"Bop: gamma={gamma!r} must be in (0, 1]")
        binary_params = list(binary_params)
        if not binary_params:
            raise UserError("Bop: the model has no 1-bit QConv2d/QLinear weights to optimise")
        ids = {id(p) for p in binary_params}
        for g in inner.param_groups:
            if any(id(p) in ids for p in g["params"]):
                raise UserError("Bop: a binary weight is also in the inner optimizer's parameters")
        # lr in Bop's group is there for trainers that set it on every group; Bop ignores it
        super().__init__(binary_params, dict(threshold=threshold, gamma=gamma, lr=0.0, bop=True))
        self.inner = inner
        self._link()
        mark_latent_bounded(binary_params)
        with torch.no_grad():  # start from binary weights, as larq does on its first update
            for p in binary_params:
                p.copy_(_sign(p))

    def _link(self) -> None:
        # one list of groups, one state dict: the inner optimizer iterates a live view of
        # param_groups[1:] and keeps its per-parameter state in ours (the params are disjoint)
        if not isinstance(self.inner.param_groups, _GroupView):
            self.param_groups.extend(self.inner.param_groups)
            self.inner.param_groups = _GroupView(self, 1)
        self.inner.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        """One Bop flip step on the binary weights, then one inner step on the rest."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        gamma, tau = group["gamma"], group["threshold"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m = state["momentum"]
            m.mul_(1.0 - gamma).add_(p.grad, alpha=gamma)
            w = _sign(p)
            flip = (m.abs() > tau) & (_sign(m) == w)
            p.copy_(torch.where(flip, -w, w))
        self.inner.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore Bop's and the inner optimizer's state (the standard optimizer format)."""
        super().load_state_dict(state_dict)
        self._link()


class _GroupView(list):
    """The inner optimizer's view of ``param_groups[start:]`` of the Bop optimizer (live)."""

    def __init__(self, owner: Bop, start: int):
        super().__init__()
        self._owner, self._start = owner, start

    def _groups(self) -> list:
        return self._owner.param_groups[self._start :]

    def __iter__(self):
        return iter(self._groups())

    def __len__(self):
        return len(self._groups())

    def __getitem__(self, i):
        return self._groups()[i]


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def build_bop(
    model: nn.Module,
    inner: str | Callable[..., torch.optim.Optimizer],
    lr: float,
    threshold: float = 1e-8,
    gamma: float = 1e-4,
    inner_groups: list[dict] | None = None,
    momentum: float | None = None,
    wd: float = 0.0,
    **inner_kwargs,
) -> Bop:
    """Bop on ``binary_parameters(model)``, ``inner`` (name or optimizer class/factory) on the rest.

    ``inner`` names: sgd, nag, adam, adamw, radam. ``momentum`` goes to sgd/nag only (as in
    BMXNet, the Adam family ignores it). ``inner_groups`` (optional) are the inner optimizer's
    parameter groups; by default two groups of the non-binary parameters that require grad:
    weights with weight decay ``wd``, BatchNorm parameters and biases without (BMXNet's rule).
    Other ``inner_kwargs`` go to the inner optimizer (betas, eps, dampening, ...).
    """
    if isinstance(inner, str):
        if inner not in INNER_OPTIMIZERS:
            raise UserError(f"Bop inner optimizer {inner!r} is unknown; valid: {', '.join(INNER_OPTIMIZERS)}")
        if momentum is not None and inner in ("sgd", "nag"):
            inner_kwargs["momentum"] = momentum
        inner = INNER_OPTIMIZERS[inner]
    elif momentum is not None:
        inner_kwargs["momentum"] = momentum
    binary = binary_parameters(model)
    ids = {id(p) for p in binary}
    if inner_groups is None:
        decay, no_decay = [], []
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in ids:
                    bn = isinstance(module, nn.modules.batchnorm._NormBase)
                    (no_decay if bn or p.ndim <= 1 else decay).append(p)
        inner_groups = [
            g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
        ]
    return Bop(binary, inner(inner_groups, lr=lr, **inner_kwargs), threshold=threshold, gamma=gamma)
