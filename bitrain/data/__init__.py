"""Data sets by name, the device-resident loader, image folders and the release-file readers.

``build_data(name, ...) -> (train_loader, val_loader, DataInfo)``; names in ``bitrain.names.DATASETS``.
"""

from __future__ import annotations

from bitrain.data.build import DataInfo, Loader, build_data, load_digits_split, make_dummy
from bitrain.data.cifar import load_cifar
from bitrain.data.mnist import load_mnist
from bitrain.names import AUGMENTATIONS, DATASETS

__all__ = ["AUGMENTATIONS", "DATASETS", "DataInfo", "Loader", "build_data", "load_cifar", "load_digits_split",
           "load_mnist", "make_dummy"]
