"""The data sets by name: one record each, free of torch and numpy (``bitrain --help`` reads it).

To add a data set: one ``DataSet`` line here; a new file format also needs its reader, a function
``reader(name, root) -> (x_train, y_train, x_val, y_val)`` of uint8 (N, C, H, W) images and int64
labels (see ``mnist.py``, ``cifar.py``), named by its import path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_DIGITS = ((0.3052,), (0.3760,))  # measured on digits' train split
_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # BMXNet's CIFAR example (gluon Normalize)
_UNIT = ((0.0,), (1.0,))  # BMXNet's MNIST: divide by 255 and stop


@dataclass(frozen=True)
class DataSet:
    """What bitrain knows about one data set before reading it."""

    name: str
    reader: str | None  # "module:function" of the release-file reader; None: built in (dummy, image folders)
    num_classes: int | None = None  # None: from the data
    mean: tuple[float, ...] | None = None  # per channel in [0, 1] units; None: from the data / flags
    std: tuple[float, ...] | None = None
    crop_flip: tuple[int, bool] = (0, False)  # default train augmentation: (pad for a random crop, h-flip)
    folder: bool = False  # an image tree decoded by CPU workers (imagenet, imagefolder)
    # what `bitrain train --dataset NAME` uses without flags (the rest are BMXNet's defaults)
    defaults: dict[str, Any] = field(default_factory=dict)


_SETS = (
    # digits: 1,442 training images of 8x8; the default run (binary net) takes ~10 s on 2 cores
    DataSet(
        "digits",
        "bitrain.data.build:load_digits",
        10,
        *_DIGITS,
        defaults={
            "epochs": 10,
            "batch_size": 64,
            "save_frequency": 5,
            "model": "tiny_resnet_e",
            "lr_mode": "cosine",
            "lr": 0.01,
        },
    ),
    DataSet("dummy", None, defaults={"epochs": 120, "save_frequency": 10, "model": "tiny_resnet_e"}),
    DataSet(
        "mnist",
        "bitrain.data.mnist:load_mnist",
        10,
        *_UNIT,
        defaults={"epochs": 120, "save_frequency": 10, "model": "tiny_resnet_e"},
    ),
    DataSet(
        "fashion-mnist",
        "bitrain.data.mnist:load_mnist",
        10,
        *_UNIT,
        defaults={"epochs": 120, "save_frequency": 10, "model": "tiny_resnet_e"},
    ),
    DataSet(
        "cifar10",
        "bitrain.data.cifar:load_cifar",
        10,
        *_CIFAR,
        crop_flip=(4, True),
        defaults={"epochs": 120, "save_frequency": 10, "model": "resnet18_e1"},
    ),
    DataSet(
        "cifar100",
        "bitrain.data.cifar:load_cifar",
        100,
        *_CIFAR,
        crop_flip=(4, True),
        defaults={"epochs": 120, "save_frequency": 10, "model": "resnet18_e1"},
    ),
    DataSet("imagenet", None, folder=True, defaults={"epochs": 120, "save_frequency": 1, "model": "resnet18_e1"}),
    DataSet("imagefolder", None, folder=True, defaults={"epochs": 120, "save_frequency": 1, "model": "resnet18_e1"}),
)
DATA_SETS: dict[str, DataSet] = {d.name: d for d in _SETS}
