"""An exponential moving average of the weights (timm's ``--model-ema``): after each optimizer step
``ema = d * ema + (1 - d) * w`` for every parameter (the latent, real-valued weights of binary layers),
while buffers (BatchNorm's running statistics, counters) are copied. With ``warmup`` the decay of the
update after optimizer step ``t`` (0-based) is ``min(decay, (1 + t) / (10 + t))``, so early averages
follow the fast-moving weights.

In a checkpoint the EMA lives under ``"ema"``; ``payload["model"]`` always holds the weights readers
load (eval, export, predict, ``--teacher``): the EMA's when it is the chosen model (``eval_ema``), the
trained ones otherwise, the other set beside it in ``payload["ema"]``."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from bitrain.errors import UserError


class ModelEMA:
    """An EMA copy of ``model`` (eval mode, no gradients). ``decay`` in (0, 1); ``warmup``: timm's
    ``min(decay, (1 + t) / (10 + t))``; ``eval_ema``: the EMA is the model that picks ``best.pt`` and
    is exported."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False, eval_ema: bool = False) -> None:
        if not 0 < decay < 1:
            raise UserError(f"--model-ema must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.eval_ema = float(decay), warmup, eval_ema
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.initialised = False  # set by reset() or load_state_dict(); fit() resets from the model otherwise

    @classmethod
    def from_options(cls, model: nn.Module, options: Any) -> ModelEMA | None:
        """The EMA a :class:`~bitrain.train.options.LoopOptions` asks for (None without ``model_ema``)."""
        if not options.model_ema:
            return None
        return cls(model, options.model_ema, warmup=options.model_ema_warmup, eval_ema=options.model_ema_eval)

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0-based, counted over the run)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average at ``model``'s current weights."""
        self.module.load_state_dict(model.state_dict())
        self.initialised = True

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """One average step towards ``model`` after optimizer step ``step``."""
        d = self.decay_at(step)
        own, theirs = list(self.module.parameters()), list(model.parameters())
        if len(own) != len(theirs):
            raise ValueError(f"ModelEMA: {len(own)} averaged parameters for a model with {len(theirs)}")
        torch._foreach_lerp_(own, theirs, 1.0 - d)  # e + (1 - d) * (p - e), one fused call (timm's way)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    # ---------------------------------------------------------------- the checkpoint
    def pack(self, payload: dict[str, Any]) -> None:
        """Put the EMA into a trainer payload (whose ``"model"`` holds the trained weights)."""
        own = self.module.state_dict()
        if self.eval_ema:
            payload["ema"] = {"model_is_ema": True, "trained": payload["model"]}
            payload["model"] = own
        else:
            payload["ema"] = {"model_is_ema": False, "model": own}

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """The EMA of a payload written by :meth:`pack`; a payload without one starts the average anew."""
        state = payload.get("ema")
        if state:
            self.module.load_state_dict(payload["model"] if state["model_is_ema"] else state["model"])
            self.initialised = True


def trained_weights(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained (not averaged) weights of a trainer payload, with or without an EMA."""
    state = payload.get("ema")
    return state["trained"] if state and state["model_is_ema"] else payload["model"]
