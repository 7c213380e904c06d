"""Data sets by name -> (train loader, val loader, DataInfo).

In-memory sets (digits, dummy, mnist, fashion-mnist, cifar10, cifar100) become uint8 tensors on
the device served by `bitrain.data.loader.DeviceLoader`; image trees (imagenet, imagefolder) are
decoded by CPU workers in `bitrain.data.imagefolder`. Both follow the same Loader protocol:
``batch_size``, ``len()``, ``num_samples``, ``set_epoch(epoch, start=0)``, ``iter() -> (x, y)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from bitrain.data.base import DataInfo, Loader
from bitrain.data.loader import DeviceLoader, mix_seed
from bitrain.data.sets import DATA_SETS
from bitrain.errors import UserError
from bitrain.names import AUGMENTATIONS

_DUMMY_SEED = 0xD0_D0  # the dummy set never depends on --seed
DUMMY_MEAN, DUMMY_STD = 0.5, 0.21  # the dummy set's normalisation, every channel
_DIGITS_VAL_EVERY = 5  # digits: the 5th, 10th, ... sample of each class (file order) is val


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as uint8 (N, 1, 8, 8) + int64 labels, split train/val.

    Grey levels 0..16 are scaled to 0..255 (round(v * 255 / 16)). The split is fixed and never
    depends on --seed: within each class, in file order, every 5th sample (ranks 4, 9, ...) is
    val; that is a stratified 1442 / 355 split.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    rank_in_class = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        rank_in_class[where] = np.arange(len(where))
    val = rank_in_class % _DIGITS_VAL_EVERY == _DIGITS_VAL_EVERY - 1
    return x[~val], y[~val], x[val], y[val]


def make_dummy(shape: tuple[int, int, int], num_classes: int, n: int, split: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic uint8 images of `shape` with learnable labels (BMXNet's dummy, but learnable).

    Class c has a fixed random 4x4 template per channel (levels 48..207) blown up to H x W;
    an image is its class template plus uniform noise in [-48, 47]. Labels cycle 0..C-1.
    Deterministic from a fixed seed; `split` (0 train, 1 val) selects an independent stream.
    """
    c, h, w = shape
    g = torch.Generator().manual_seed(mix_seed(_DUMMY_SEED, num_classes, *shape))
    templates = torch.randint(48, 208, (num_classes, c, 4, 4), generator=g, dtype=torch.int16)
    rows, cols = torch.arange(h) * 4 // h, torch.arange(w) * 4 // w
    g.manual_seed(mix_seed(_DUMMY_SEED, num_classes, *shape, n, split + 1))
    labels = torch.arange(n) % num_classes
    out = torch.empty(n, c, h, w, dtype=torch.uint8)
    for lo in range(0, n, 256):  # chunks bound the int16 temporaries (224 px sets are large)
        hi = min(lo + 256, n)
        base = templates[labels[lo:hi]][:, :, rows][:, :, :, cols]
        noise = torch.randint(-48, 48, (hi - lo, c, h, w), generator=g, dtype=torch.int16)
        out[lo:hi] = (base + noise).to(torch.uint8)
    return out.numpy(), labels.numpy().astype(np.int64)


def load_digits(name: str = "digits", root: Path | None = None):
    """The digits reader (``DataSet.reader``): scikit-learn ships the data, ``root`` is not used."""
    return load_digits_split()


def _in_memory(name: str, data_dir: str | None, dummy_shape: tuple[int, int, int], dummy_classes: int, dummy_size: int):
    spec = DATA_SETS[name]
    if name == "dummy":
        if len(dummy_shape) != 3 or dummy_shape[1] != dummy_shape[2] or min(dummy_shape) < 1:
            raise UserError(f"dummy shape must be (C, S, S) with S >= 1, got {tuple(dummy_shape)}")
        if dummy_classes < 2:  # the one rule, for the API and --dummy-classes: 1 class is no classifier
            raise UserError(f"--dummy-classes must be at least 2, got {dummy_classes}")
        if dummy_size < 1:
            raise UserError(f"--dummy-size must be at least 1, got {dummy_size}")
        x_tr, y_tr = make_dummy(tuple(dummy_shape), dummy_classes, dummy_size, 0)
        x_va, y_va = make_dummy(tuple(dummy_shape), dummy_classes, max(1, dummy_size // 4), 1)
        ch = dummy_shape[0]
        return (x_tr, y_tr, x_va, y_va), dummy_classes, ((DUMMY_MEAN,) * ch, (DUMMY_STD,) * ch)
    from bitrain.data.cache import default_data_dir

    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is not a folder")
    module, _, function = spec.reader.partition(":")
    reader = getattr(importlib.import_module(module), function)
    return reader(name, root), spec.num_classes, (spec.mean, spec.std)


def _memory_augmentation(name: str, augmentation: str, size: int) -> tuple[int, bool]:
    """(pad, flip) of the train loader. CIFAR's default is BMXNet's pad-4 crop + flip;
    the other sets get none unless asked with "crop" (pad size//8) or "crop-flip"."""
    if augmentation == "none":
        return 0, False
    if augmentation in ("crop", "crop-flip"):
        return max(1, size // 8), augmentation == "crop-flip"
    return DATA_SETS[name].crop_flip


def build_data(
    name: str,
    *,
    data_dir: str | None = None,
    batch_size: int,
    device: str | torch.device = "cpu",
    seed: int = 123,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    augmentation: str = "medium",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    dummy_shape: tuple[int, int, int] = (3, 32, 32),
    dummy_classes: int = 10,
    dummy_size: int = 1024,
    image_size: int | None = None,
) -> tuple[Loader, Loader, DataInfo]:
    """Train loader, val loader and DataInfo of data set `name` (one of DATASETS).

    batch_size is per rank; rank/world_size shard the data (see bitrain.data.loader).
    augmentation: none|low|medium|high (BMXNet's ImageNet levels; CIFAR always pad-4 crop + flip
    unless "none") or crop|crop-flip for the in-memory sets. image_size: imagenet/imagefolder
    only (default 224). num_workers: decoding processes of imagenet/imagefolder.
    """
    if name not in DATA_SETS:
        raise UserError(f"unknown --dataset {name!r}; valid: {', '.join(DATA_SETS)}")
    if augmentation not in AUGMENTATIONS:
        raise UserError(f"unknown --augmentation {augmentation!r}; valid: {', '.join(AUGMENTATIONS)}")
    device = torch.device(device)
    if DATA_SETS[name].folder:
        from bitrain.data.imagefolder import build_imagefolder

        return build_imagefolder(
            name,
            data_dir=data_dir,
            batch_size=batch_size,
            device=device,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            augmentation=augmentation,
            dtype=dtype,
            channels_last=channels_last,
            image_size=image_size or 224,
        )
    if image_size is not None:
        raise UserError(f"--image-size applies to imagenet/imagefolder only, not {name}")
    (x_tr, y_tr, x_va, y_va), classes, (mean, std) = _in_memory(name, data_dir, dummy_shape, dummy_classes, dummy_size)
    c, size = x_tr.shape[1], x_tr.shape[2]
    info = DataInfo(name, classes, c, size, len(y_tr), len(y_va), tuple(mean), tuple(std))
    pad, flip = _memory_augmentation(name, augmentation, size)
    common = dict(
        batch_size=batch_size,
        mean=mean,
        std=std,
        seed=seed,
        rank=rank,
        world_size=world_size,
        dtype=dtype,
        channels_last=channels_last,
    )
    train = DeviceLoader(
        torch.from_numpy(x_tr).to(device), torch.from_numpy(y_tr).to(device), train=True, pad=pad, flip=flip, **common
    )
    val = DeviceLoader(torch.from_numpy(x_va).to(device), torch.from_numpy(y_va).to(device), train=False, **common)
    return train, val, info
