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
# class names by label index, as each data set's release files number them (bitrain predict prints them)
_DIGIT_NAMES = tuple(str(i) for i in range(10))
_FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_NAMES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm".split()
)


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
    classes: tuple[str, ...] = ()  # class names by label index; (): none (dummy) or folder names (image folders)


# Defaults without flags (issue "defaults that work"): a binary net that trains well on each data set.
# MNIST-like: small_reactnet, Adam with a short warmup and a cosine decay to 0, latent weights clipped to
# [-1, 1], pad-2 random crops (+ flips for Fashion-MNIST; digits are not mirror-symmetric).
# CIFAR / ImageNet: BMXNet v2's published settings (docs/recipes.md).
_SMALL_28 = {
    "model": "small_reactnet",
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 0.003,
    "lr_mode": "cosine",
    "warmup_epochs": 0.5,
    "clip_latent_weights": 1.0,
    "save_frequency": 5,
}
_CIFAR_DEFAULTS = {
    "model": "resnet18_e1",
    "epochs": 150,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 0.02,
    "lr_mode": "cosine",
    "warmup_epochs": 5,
    "clip_threshold": 1.3,
    "save_frequency": 10,
}
_IMAGENET_DEFAULTS = {
    "model": "resnet18_e1",
    "fp_downsample_sc": True,
    "pool_downsample_sc": True,
    "epochs": 120,
    "batch_size": 128,
    "optimizer": "radam",
    "lr": 0.002,
    "lr_mode": "cosine",
    "clip_threshold": 1.3,
    "save_frequency": 1,
}

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
        classes=_DIGIT_NAMES,
    ),
    DataSet("dummy", None, defaults={"epochs": 120, "save_frequency": 10, "model": "tiny_resnet_e"}),
    DataSet(
        "mnist",
        "bitrain.data.mnist:load_mnist",
        10,
        *_UNIT,
        crop_flip=(2, False),
        defaults={**_SMALL_28, "epochs": 10},
        classes=_DIGIT_NAMES,
    ),
    DataSet(
        "fashion-mnist",
        "bitrain.data.mnist:load_mnist",
        10,
        *_UNIT,
        crop_flip=(2, True),
        defaults={**_SMALL_28, "epochs": 20},
        classes=_FASHION_NAMES,
    ),
    DataSet(
        "cifar10",
        "bitrain.data.cifar:load_cifar",
        10,
        *_CIFAR,
        crop_flip=(4, True),
        defaults=_CIFAR_DEFAULTS,
        classes=_CIFAR10_NAMES,
    ),
    DataSet(
        "cifar100",
        "bitrain.data.cifar:load_cifar",
        100,
        *_CIFAR,
        crop_flip=(4, True),
        defaults=_CIFAR_DEFAULTS,
        classes=_CIFAR100_NAMES,
    ),
    DataSet("imagenet", None, folder=True, defaults=_IMAGENET_DEFAULTS),
    DataSet("imagefolder", None, folder=True, defaults={"epochs": 120, "save_frequency": 1, "model": "resnet18_e1"}),
)
DATA_SETS: dict[str, DataSet] = {d.name: d for d in _SETS}
