"""MNIST and Fashion-MNIST from their IDX release files (plain or .gz)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from bitrain.console import progress
from bitrain.data.cache import Arrays, cached_convert, find_file, torchvision_download
from bitrain.errors import UserError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# torchvision's layout under --data-dir
SUBDIRS = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
# where distributions install the release files (Debian: apt-get install dataset-fashion-mnist)
SYSTEM_DIRS = {
    "mnist": (Path("/usr/share/datasets/mnist"),),
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
_UBYTE = 0x08  # IDX type code of unsigned bytes


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions; UserError naming the file if corrupt."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"corrupt gzip file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise UserError(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes "
            f"(magic {raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated: {len(raw)} bytes, header alone is {header}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UserError(f"{path} has {len(raw)} bytes; its header {dims} says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _convert(folder: Path) -> Arrays:
    out = []
    for name in progress(FILES, f"converting {folder}"):
        path = find_file(folder, name)
        if path is None:  # only when a broken cache sent us here without the release files
            raise UserError(f"{folder / name} not found (needed to rebuild the data cache)")
        out.append(read_idx(path, 3 if "images" in name else 1))
    x_tr, y_tr, x_va, y_va = out
    for x, y, name in ((x_tr, y_tr, FILES[1]), (x_va, y_va, FILES[3])):
        if x.shape[0] != y.shape[0]:
            raise UserError(f"{folder / name}: {y.shape[0]} labels for {x.shape[0]} images")
        if y.size and int(y.max()) > 9:
            raise UserError(f"{folder / name}: label {int(y.max())} outside 0..9")
        if x.shape[1:] != (28, 28):
            raise UserError(f"{folder}: images are {x.shape[1:]}, expected 28x28")
    return (x_tr[:, None].copy(), y_tr.astype(np.int64), x_va[:, None].copy(), y_va.astype(np.int64))


def load_mnist(name: str, data_dir: Path) -> Arrays:
    """(x_train, y_train, x_val, y_val) of "mnist" or "fashion-mnist": uint8 (N,1,28,28), int64.

    Looks in data_dir itself, then torchvision's data_dir/MNIST/raw (FashionMNIST/raw), then where a
    distribution installs them (SYSTEM_DIRS; their cache goes to data_dir, never into a system folder);
    downloads through torchvision when the files are nowhere and torchvision imports.
    """
    folders = (data_dir, data_dir / SUBDIRS[name])
    for folder in folders:
        if (folder / f"bitrain-{name}.npz").is_file() or all(find_file(folder, f) for f in FILES):
            return cached_convert(folder, name, (1, 28, 28), _convert)
    for folder in SYSTEM_DIRS[name]:
        if all(find_file(folder, f) for f in FILES):
            return cached_convert(folder, name, (1, 28, 28), _convert, cache_dir=data_dir)
    torchvision_download(name, data_dir, FILES, data_dir)
    if not all(find_file(folders[1], f) for f in FILES):
        raise UserError(f"{name}: download did not produce {', '.join(FILES)} in {folders[1]}")
    return cached_convert(folders[1], name, (1, 28, 28), _convert)
