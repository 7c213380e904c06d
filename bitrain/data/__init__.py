"""Data sets by name, the device-resident loader, image folders and the release-file readers.

``build_data(name, ...) -> (train_loader, val_loader, DataInfo)``; the data sets are the records of
``bitrain.data.sets.DATA_SETS``. Names are imported on first use, so reading ``bitrain.data.sets``
(the CLI's choices) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataInfo": "bitrain.data.base",
    "Loader": "bitrain.data.base",
    "build_data": "bitrain.data.build",
    "load_digits_split": "bitrain.data.build",
    "make_dummy": "bitrain.data.build",
    "load_cifar": "bitrain.data.cifar",
    "load_mnist": "bitrain.data.mnist",
    "DATA_SETS": "bitrain.data.sets",
    "AUGMENTATIONS": "bitrain.names",
}
__all__ = sorted([*_EXPORTS, "DATASETS"])


def __getattr__(name: str) -> Any:
    if name == "DATASETS":
        return tuple(importlib.import_module("bitrain.data.sets").DATA_SETS)
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bitrain.data' has no attribute {name!r}")
