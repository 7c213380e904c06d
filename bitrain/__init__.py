"""bitrain: train full-precision and binary (1-bit) image classifiers with BMXNet v2's loop in PyTorch.

Public API (imported on first use, so ``bitrain --help`` stays fast)::

    from bitrain import Trainer, build_model, build_data, build_optimizer, make_schedule
    from bitrain import QActivation, QConv2d, QLinear, get_quantizer
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "bitrain.train.trainer",
    "Loss": "bitrain.train.loss",
    "CheckpointSaver": "bitrain.train.saver",
    "Placement": "bitrain.train.options",
    "StopPolicy": "bitrain.train.options",
    "LoopOptions": "bitrain.train.options",
    "TrainState": "bitrain.train.state",
    "evaluate": "bitrain.train.evaluation",
    "Interrupted": "bitrain.train.trainer",
    "NonFiniteLoss": "bitrain.train.trainer",
    "build_model": "bitrain.models",
    "list_models": "bitrain.models",
    "build_data": "bitrain.data",
    "build_optimizer": "bitrain.train.optim",
    "make_schedule": "bitrain.train.schedules",
    "EpochMetrics": "bitrain.train.metrics",
    "QActivation": "bitrain.binary.layers",
    "QConv2d": "bitrain.binary.layers",
    "QLinear": "bitrain.binary.layers",
    "binary_layer_config": "bitrain.binary.layers",
    "get_quantizer": "bitrain.binary.quantizers",
    "summarize": "bitrain.binary.summary",
    "export_packed": "bitrain.deploy.export",
    "load_packed": "bitrain.deploy.load",
    "load_model": "bitrain.cli.reader",
    "load_checkpoint": "bitrain.train.checkpoint",
    "UserError": "bitrain.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bitrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
