"""Data sets by name: digits split, dummy, MNIST IDX / CIFAR pickle readers, cache, errors."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bitrain.data import DATASETS, build_data, load_cifar, load_digits_split, load_mnist, make_dummy
from bitrain.data.mnist import FILES as MNIST_FILES
from bitrain.errors import UserError


@pytest.fixture(autouse=True)
def _no_torchvision(monkeypatch):
    """Missing files must give the "put these files there" error, never a download attempt."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)


# ---------------------------------------------------------------- writers of the release formats


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def make_mnist(folder: Path, n_train=20, n_val=7, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.uint8),
        rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_val).astype(np.uint8),
    )
    for name, a in zip(MNIST_FILES, arrays):
        write_idx(folder / name, a, gz)
    return arrays


def make_cifar(folder: Path, name="cifar10", per_batch=4, n_val=6, seed=0, protocol=2, bytes_keys=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    classes, key = (10, "labels") if name == "cifar10" else (100, "fine_labels")
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    sizes = [per_batch] * 5 + [n_val] if name == "cifar10" else [per_batch * 5, n_val]
    out = {}
    for f, n in zip(files, sizes):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        batch = {"batch_label": f, "data": data, key: labels}
        if bytes_keys:  # as pickle.load(f, encoding="bytes") gives them (the CIFAR page's recipe)
            batch = {k.encode(): v for k, v in batch.items()}
            batch[b"batch_label"] = f.encode()
            if name == "cifar100":
                batch[b"coarse_labels"] = [y // 5 for y in labels]
        (folder / f).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[f] = (data, labels)
    return out


# ---------------------------------------------------------------- digits and dummy


def test_dataset_names_and_unknown_name():
    assert DATASETS == ("digits", "dummy", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet", "imagefolder")
    with pytest.raises(UserError, match="valid: digits, dummy"):
        build_data("svhn", batch_size=4)
    with pytest.raises(UserError, match="augmentation.*valid: none, low"):
        build_data("digits", batch_size=4, augmentation="heavy")


def test_digits_split_is_fixed_stratified_and_seed_independent():
    x_tr, y_tr, x_va, y_va = load_digits_split()
    assert x_tr.shape == (1442, 1, 8, 8) and x_va.shape == (355, 1, 8, 8)
    assert (
        x_tr.dtype == np.uint8
        and x_tr.max() == 255
        and set(np.unique(x_tr)) <= {round(v * 255 / 16) for v in range(17)}
    )
    counts = np.bincount(y_va, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 36  # stratified: ~20 % of every class
    from sklearn.datasets import load_digits

    y_all = load_digits().target
    seen = np.zeros(10, dtype=int)
    val_idx = []
    for i, c in enumerate(y_all):  # the documented rule, written out: 5th, 10th, ... of a class
        seen[c] += 1
        if seen[c] % 5 == 0:
            val_idx.append(i)
    assert y_va.tolist() == y_all[val_idx].tolist()
    a_tr, a_va, a_info = build_data("digits", batch_size=32, seed=1)
    b_tr, b_va, b_info = build_data("digits", batch_size=32, seed=2)
    assert a_info == b_info and a_info.num_train == 1442 and a_info.num_val == 355
    assert a_info.num_classes == 10 and a_info.in_channels == 1 and a_info.image_size == 8
    for (xa, ya), (xb, yb) in zip(a_va, b_va):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the seed changes the train order, not the split
    ya = torch.cat([y for _, y in a_tr])
    yb = torch.cat([y for _, y in b_tr])
    assert not torch.equal(ya, yb)
    # no augmentation by default: train batches are exact normalised train images
    x, y = next(iter(a_tr))
    raw = torch.from_numpy(x_tr)
    xr = (x * 0.3760 + 0.3052) * 255
    matches = [(raw.float() - xr[i]).abs().amax(dim=(1, 2, 3)).min().item() for i in range(4)]
    assert max(matches) < 1e-3


def test_dummy_is_deterministic_learnable_and_shaped():
    x1, y1 = make_dummy((3, 12, 12), 5, 40)
    x2, y2 = make_dummy((3, 12, 12), 5, 40)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (40, 3, 12, 12) and x1.dtype == np.uint8 and set(y1.tolist()) == set(range(5))
    xv, yv = make_dummy((3, 12, 12), 5, 40, split=1)
    assert not np.array_equal(xv, x1)
    # learnable: nearest class mean (from the train split) classifies the val split
    means = np.stack([x1[y1 == c].astype(np.float32).mean(0) for c in range(5)])
    d = ((xv[:, None].astype(np.float32) - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (d.argmin(1) == yv).mean() > 0.9
    tr, va, info = build_data("dummy", batch_size=16, dummy_shape=(2, 10, 10), dummy_classes=3, dummy_size=64, seed=9)
    assert (info.num_train, info.num_val, info.num_classes, info.in_channels, info.image_size) == (64, 16, 3, 2, 10)
    x, y = next(iter(tr))
    assert x.shape == (16, 2, 10, 10) and y.max() < 3
    with pytest.raises(UserError, match="dummy shape"):
        build_data("dummy", batch_size=4, dummy_shape=(3, 8, 9))


def test_batch_size_larger_than_train_split():
    with pytest.raises(UserError, match=r"--batch-size 1500 .* 1442 samples"):
        build_data("digits", batch_size=1500)
    with pytest.raises(UserError, match=r"--batch-size 800 .* 721 samples"):
        build_data("digits", batch_size=800, world_size=2, rank=1)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gz_and_cache(tmp_path, gz):
    x_tr, y_tr, x_va, y_va = make_mnist(tmp_path, gz=gz)
    got = load_mnist("mnist", tmp_path)
    assert np.array_equal(got[0], x_tr[:, None]) and np.array_equal(got[1], y_tr)
    assert np.array_equal(got[2], x_va[:, None]) and np.array_equal(got[3], y_va)
    assert got[0].dtype == np.uint8 and got[1].dtype == np.int64
    cache = tmp_path / "bitrain-mnist.npz"
    assert cache.is_file() and not list(tmp_path.glob("*.tmp"))
    for f in tmp_path.iterdir():  # the cache alone is enough from now on
        if f != cache:
            f.unlink()
    again = load_mnist("mnist", tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(got, again))


def test_fashion_mnist_torchvision_layout_and_build_data(tmp_path):
    x_tr, y_tr, x_va, y_va = make_mnist(tmp_path / "FashionMNIST" / "raw", n_train=24, gz=True)
    tr, va, info = build_data("fashion-mnist", data_dir=str(tmp_path), batch_size=8, augmentation="none")
    assert (info.num_train, info.num_val, info.in_channels, info.image_size) == (24, 7, 1, 28)
    default, _, _ = build_data("fashion-mnist", data_dir=str(tmp_path), batch_size=8)
    assert (default.pad, default.flip) == (2, True)  # its default augmentation: pad-2 random crop + flip
    assert torch.cat([y for _, y in va]).tolist() == y_va.tolist()
    xv = torch.cat([x for x, _ in va])
    torch.testing.assert_close(xv, torch.from_numpy(x_va[:, None]).float() / 255)
    xs = torch.cat([x for x, _ in tr]) * 255  # mean 0, std 1: pixels / 255 (BMXNet)
    assert len(tr) == 3 and xs.shape == (24, 1, 28, 28)
    assert torch.equal(xs.round().to(torch.uint8).sort(0).values, torch.from_numpy(x_tr[:, None]).sort(0).values)


def test_mnist_corrupt_files_name_the_file(tmp_path):
    make_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[2] = 0x0D  # float type code: wrong magic
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*not an IDX"):
        load_mnist("mnist", tmp_path)
    raw[2] = 0x08
    bad.write_bytes(bytes(raw[:-5]))  # truncated body
    with pytest.raises(UserError, match="train-images-idx3-ubyte has .* bytes"):
        load_mnist("mnist", tmp_path)
    bad.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(UserError, match="corrupt gzip file .*train-images-idx3-ubyte.gz"):
        load_mnist("mnist", tmp_path)
    assert not (tmp_path / "bitrain-mnist.npz").exists()


def test_missing_files_name_folder_and_files(tmp_path):
    with pytest.raises(
        UserError,
        match=r"put train-images-idx3-ubyte, .*t10k-labels-idx1-ubyte "
        rf"into {tmp_path}",
    ):
        build_data("mnist", data_dir=str(tmp_path), batch_size=4)
    with pytest.raises(UserError, match=r"data_batch_1, .*test_batch into .*cifar-10-batches-py"):
        build_data("cifar10", data_dir=str(tmp_path), batch_size=4)
    with pytest.raises(UserError, match=r"put train, test into .*cifar-100-python"):
        build_data("cifar100", data_dir=str(tmp_path), batch_size=4)


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_reader_layout_and_cache(tmp_path, protocol):
    made = make_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    x_tr, y_tr, x_va, y_va = load_cifar("cifar10", tmp_path)
    assert x_tr.shape == (20, 3, 32, 32) and x_va.shape == (6, 3, 32, 32)
    data, labels = made["data_batch_2"]
    assert np.array_equal(x_tr[4:8], data.reshape(4, 3, 32, 32))  # RGB planes of 32 x 32
    assert x_tr[4, 1, 0, 0] == data[0, 1024]  # green plane starts at 1024
    assert y_tr[4:8].tolist() == labels and y_va.tolist() == made["test_batch"][1]
    assert (tmp_path / "cifar-10-batches-py" / "bitrain-cifar10.npz").is_file()


def test_cifar100_build_data_default_augmentation(tmp_path):
    make_cifar(tmp_path, name="cifar100", per_batch=8)  # the folder itself
    tr, va, info = build_data("cifar100", data_dir=str(tmp_path), batch_size=8)
    assert (info.num_classes, info.num_train, info.num_val, info.image_size) == (100, 40, 6, 32)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2023, 0.1994, 0.2010)
    assert (tr.pad, tr.flip) == (4, True)  # BMXNet's CIFAR augmentation, whatever the level
    tr2, _, _ = build_data("cifar100", data_dir=str(tmp_path), batch_size=8, augmentation="none")
    assert (tr2.pad, tr2.flip) == (0, False)
    d_tr, _, _ = build_data("digits", batch_size=8)
    assert (d_tr.pad, d_tr.flip) == (0, False)
    d_tr, _, _ = build_data("digits", batch_size=8, augmentation="crop-flip")
    assert (d_tr.pad, d_tr.flip) == (1, True)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_with_bytes_keys_is_read(tmp_path, protocol):
    made = make_cifar(tmp_path / "c10", protocol=protocol, bytes_keys=True)
    assert b"data" in pickle.loads((tmp_path / "c10" / "data_batch_1").read_bytes())
    x_tr, y_tr, x_va, y_va = load_cifar("cifar10", tmp_path / "c10")
    assert x_tr.shape == (20, 3, 32, 32) and x_va.shape == (6, 3, 32, 32)
    assert np.array_equal(x_tr[8:12], made["data_batch_3"][0].reshape(4, 3, 32, 32))
    assert y_tr[8:12].tolist() == made["data_batch_3"][1] and y_va.tolist() == made["test_batch"][1]

    made = make_cifar(tmp_path / "c100", name="cifar100", per_batch=8, protocol=protocol, bytes_keys=True)
    tr, va, info = build_data("cifar100", data_dir=str(tmp_path / "c100"), batch_size=8, augmentation="none")
    assert (info.num_classes, info.num_train, info.num_val) == (100, 40, 6)
    x_tr, y_tr, x_va, y_va = load_cifar("cifar100", tmp_path / "c100")
    assert np.array_equal(x_tr, made["train"][0].reshape(40, 3, 32, 32))
    assert y_tr.tolist() == made["train"][1] and y_va.tolist() == made["test"][1]  # fine, not coarse labels


def test_cifar_bytes_keys_still_go_through_the_restricted_unpickler(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder, bytes_keys=True)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    f = folder / "data_batch_2"
    f.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(UserError, match="corrupt CIFAR file .*data_batch_2.*refusing"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()
    f.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1, 2]}, protocol=2))
    with pytest.raises(UserError, match="data_batch_2: expected a dict with 'data' and 'labels'"):
        load_cifar("cifar10", tmp_path)


def test_cifar_corrupt_and_malicious_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    f = folder / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])  # short pickle
    with pytest.raises(UserError, match="corrupt CIFAR file .*data_batch_3"):
        load_cifar("cifar10", tmp_path)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    f.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(UserError, match="corrupt CIFAR file .*data_batch_3.*refusing"):
        load_cifar("cifar10", tmp_path)
    assert not marker.exists()  # nothing from the file was executed

    f.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3.*labels for 2 images"):
        load_cifar("cifar10", tmp_path)
    f.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3.*N x 3072"):
        load_cifar("cifar10", tmp_path)


def test_broken_cache_is_rebuilt(tmp_path):
    made = make_cifar(tmp_path)
    load_cifar("cifar10", tmp_path)
    cache = tmp_path / "bitrain-cifar10.npz"
    cache.write_bytes(b"PK\x03\x04 broken zip")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        x_tr, *_ = load_cifar("cifar10", tmp_path)
    assert np.array_equal(x_tr[:4], made["data_batch_1"][0].reshape(4, 3, 32, 32))
    assert np.load(cache)["x_train"].shape == (20, 3, 32, 32)  # rewritten, valid again


def test_fashion_mnist_from_the_system_folder_caches_in_the_data_dir(tmp_path, monkeypatch):
    from bitrain.data import mnist

    system, data_dir = tmp_path / "usr-share-datasets-fashion-mnist", tmp_path / "cache"
    system.mkdir()
    x_tr, y_tr, _, _ = make_mnist(system, gz=True)
    monkeypatch.setattr(mnist, "SYSTEM_DIRS", {"mnist": (), "fashion-mnist": (system,)})
    got = load_mnist("fashion-mnist", data_dir)  # nothing in data_dir: the system copy is found
    assert np.array_equal(got[0], x_tr[:, None]) and np.array_equal(got[1], y_tr)
    assert (data_dir / "bitrain-fashion-mnist.npz").is_file()  # the cache goes to the data dir ...
    assert not list(system.glob("bitrain-*"))  # ... never into the system folder
    # a user folder that holds the files wins over the system copy
    user = tmp_path / "user"
    user.mkdir()
    x_user, *_ = make_mnist(user, seed=5)
    assert np.array_equal(load_mnist("fashion-mnist", user)[0], x_user[:, None])


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_without_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BITRAIN_DATA_DIR", str(tmp_path))
    train, val, info = build_data("fashion-mnist", batch_size=256, device="cpu")
    assert (info.num_train, info.num_val, info.num_classes, info.image_size) == (60000, 10000, 10, 28)
    x, y = next(iter(val))
    assert x.shape == (256, 1, 28, 28) and int(y.max()) <= 9
