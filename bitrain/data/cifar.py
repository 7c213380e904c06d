"""CIFAR-10 / CIFAR-100 from the python release (pickled dicts), read without executing code.

The release files are pickles: a dict with a uint8 numpy array under "data" (N x 3072, RGB
planes of 32x32) and a label list. ``_SafeUnpickler.find_class`` allows only what rebuilding a
numpy array needs (``_reconstruct``, ``_frombuffer``, ``ndarray``, ``dtype``, and
``_codecs.encode`` that protocol-2 pickles written by Python 3 use for bytes); any other
global — the way a malicious pickle runs code — is refused, and the file reported as corrupt.
The dict's keys may be str (the release read with ``encoding="latin1"``) or bytes (re-pickled
after the CIFAR page's Python 3 recipe, which unpickles with encoding="bytes": b"data", b"labels").
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path

import numpy as np

from bitrain.console import progress
from bitrain.data.cache import Arrays, cached_convert, find_file, torchvision_download
from bitrain.errors import UserError

# per data set: (torchvision folder, train files, val files, label key, number of classes)
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    # protocol 5 (numpy >= 1.16 writing with pickle 5): the array body is a plain buffer
    ("numpy.core.numeric", "_frombuffer"): np.arange(1).__reduce_ex__(5)[0],
    ("numpy._core.numeric", "_frombuffer"): np.arange(1).__reduce_ex__(5)[0],
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One release file -> (uint8 (N, 3, 32, 32), int64 (N,)); UserError naming a corrupt file."""
    try:
        obj = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as e:  # truncated, garbage, or a refused global: all "corrupt"
        raise UserError(f"corrupt CIFAR file {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):  # bytes keys as their str (latin-1 never fails); a str key wins a tie
        obj = {
            **{k.decode("latin1"): v for k, v in obj.items() if isinstance(k, bytes)},
            **{k: v for k, v in obj.items() if not isinstance(k, bytes)},
        }
    if not isinstance(obj, dict) or "data" not in obj or label_key not in obj:
        raise UserError(f"corrupt CIFAR file {path}: expected a dict with 'data' and '{label_key}'")
    data, labels = obj["data"], np.asarray(obj[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"corrupt CIFAR file {path}: 'data' is not a uint8 N x 3072 array")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise UserError(f"corrupt CIFAR file {path}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"corrupt CIFAR file {path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _converter(name: str):
    _, train_files, val_files, key, classes = LAYOUT[name]

    def convert(folder: Path) -> Arrays:
        parts = {}
        for f in progress(train_files + val_files, f"converting {folder}"):
            path = find_file(folder, f)
            if path is None:
                raise UserError(f"{folder / f} not found (needed to rebuild the data cache)")
            parts[f] = read_batch(path, key, classes)
        x_tr = np.concatenate([parts[f][0] for f in train_files])
        y_tr = np.concatenate([parts[f][1] for f in train_files])
        x_va = np.concatenate([parts[f][0] for f in val_files])
        y_va = np.concatenate([parts[f][1] for f in val_files])
        return x_tr, y_tr, x_va, y_va

    return convert


def load_cifar(name: str, data_dir: Path) -> Arrays:
    """(x_train, y_train, x_val, y_val) of "cifar10"/"cifar100": uint8 (N,3,32,32), int64 labels.

    Looks in data_dir itself, then torchvision's data_dir/cifar-10-batches-py
    (cifar-100-python); downloads through torchvision when missing and torchvision imports.
    """
    sub, train_files, val_files, _, _ = LAYOUT[name]
    files = train_files + val_files
    folders = (data_dir, data_dir / sub)
    for folder in folders:
        if (folder / f"bitrain-{name}.npz").is_file() or all(find_file(folder, f) for f in files):
            return cached_convert(folder, name, (3, 32, 32), _converter(name))
    torchvision_download(name, data_dir, files, folders[1])
    return cached_convert(folders[1], name, (3, 32, 32), _converter(name))
