"""Shared plumbing of the file-format readers: the .npz cache, progress, download, file lookup.

A data set in its release format (IDX, CIFAR pickles) is converted once to ``bitrain-<name>.npz``
next to the release files: uint8 images NCHW + int64 labels, loaded later with
``np.load(allow_pickle=False)``. The cache is written to a temporary file in the same folder and
``os.replace``d, so a crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

from bitrain.errors import UserError

T = TypeVar("T")
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_val, y_val
_KEYS = ("x_train", "y_train", "x_val", "y_val")


def default_data_dir() -> Path:
    """Where data sets go without --data-dir: $BITRAIN_DATA_DIR or ~/.cache/bitrain/datasets."""
    return Path(os.environ.get("BITRAIN_DATA_DIR", "~/.cache/bitrain/datasets")).expanduser()


def find_file(folder: Path, name: str) -> Path | None:
    """folder/name, or folder/name.gz, whichever exists (plain first)."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_cache(path: Path, image_shape: tuple[int, int, int]) -> Arrays | None:
    """The cached arrays, or None (with a warning) when the file is unreadable or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = tuple(z[k] for k in _KEYS)
    except Exception as e:  # BadZipFile, OSError, ValueError, KeyError: all mean "rebuild"
        warnings.warn(f"ignoring unreadable data cache {path}: {e}", stacklevel=2)
        return None
    x_tr, y_tr, x_va, y_va = arrays
    ok = (
        x_tr.dtype == np.uint8
        and x_va.dtype == np.uint8
        and x_tr.shape[1:] == image_shape
        and x_va.shape[1:] == image_shape
        and y_tr.shape == x_tr.shape[:1]
        and y_va.shape == x_va.shape[:1]
    )
    if not ok:
        warnings.warn(f"ignoring inconsistent data cache {path}", stacklevel=2)
        return None
    return x_tr, y_tr.astype(np.int64), x_va, y_va.astype(np.int64)


def save_cache(path: Path, arrays: Arrays) -> None:
    """Atomic write of the arrays to path (temp file in the same folder, fsync, os.replace).

    A read-only folder only costs the cache: a warning, and the conversion runs again next time.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        warnings.warn(f"cannot write data cache {path}: {e}", stacklevel=2)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(_KEYS, arrays)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_convert(
    folder: Path,
    name: str,
    image_shape: tuple[int, int, int],
    convert: Callable[[Path], Arrays],
    cache_dir: Path | None = None,
) -> Arrays:
    """Arrays of data set `name` in `folder`: from its cache (in `cache_dir`, default `folder`), else
    converted and cached."""
    cache = (folder if cache_dir is None else cache_dir) / f"bitrain-{name}.npz"
    if cache.is_file():
        arrays = load_cache(cache, image_shape)
        if arrays is not None:
            return arrays
    arrays = convert(folder)
    save_cache(cache, arrays)
    return arrays


def torchvision_download(dataset: str, root: Path, files: Iterable[str], folder_hint: Path) -> None:
    """Fetch a data set with torchvision into root (its own layout); UserError when impossible."""
    listing = ", ".join(files)
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise UserError(
            f"{dataset} files not found: put {listing} into {folder_hint} (or install torchvision to download them)"
        ) from None
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[
        dataset
    ]
    try:
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except Exception as e:  # network, disk, checksum: all mean "put the files there yourself"
        raise UserError(f"{dataset}: download into {root} failed ({e}); put {listing} into {folder_hint}") from None
