"""Image-folder data sets (imagenet, imagefolder): ``train/<class>/*``, ``val/<class>/*`` trees.

Images are decoded and augmented by CPU workers (torch DataLoader, Pillow + numpy), collated as
uint8, pinned, copied to the device without blocking, and normalised there. The order is the
same permutation/sharding as the in-memory loader (bitrain.data.loader); each sample's augmentation
draws come from a numpy generator seeded by (seed, epoch, sample index), so batches never depend
on the number of workers or on what was read before.

Corrupt images are skipped. Train: sample i is replaced by the next decodable file of the split
in file order (i+1, i+2, ..., wrapping), with its label and with sample i's random draws; the
batch keeps its size. Val: the file is left out (its batch is one smaller), so the metrics are over
the readable files only, and a pass that left files out says how many. Each bad file is named once
on stderr (one line) and counted in ``loader.num_skipped``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bitrain.data.base import DataInfo
from bitrain.data.loader import EpochShards, epoch_permutation, normalize_affine, normalize_batch, train_batch_slice
from bitrain.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
# BMXNet's ImageNet mean/std (pixel units 123.68 ... / 58.393 ...) in [0, 1] units.
IMAGENET_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
IMAGENET_STD = (58.393 / 255, 57.12 / 255, 57.375 / 255)
CROP_RATIO = 0.875  # val: resize the short side to ceil(size / 0.875) (256 for 224), centre crop
JITTER = 0.4  # "high": brightness, contrast, saturation factors in [0.6, 1.4]
LIGHTING_STD = 0.1  # "high": AlexNet PCA lighting, eigen-values/vectors of ImageNet RGB (0..255)
_EIGVAL = np.array([55.46, 4.794, 1.148], dtype=np.float32)
_EIGVEC = np.array(
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], dtype=np.float32
)
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MAX_REPLACEMENTS = 64  # consecutive bad files after which the tree is declared broken
_BROKEN, _LEFT_OUT = -1, -2  # item labels: no readable file in _MAX_REPLACEMENTS tries; a val file left out


def class_folders(folder: Path) -> list[str]:
    """The class names of a split folder: its sub-folders, sorted by name (label i is the i-th)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def scan_split(root: Path, split: str, classes: list[str] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, file paths, int64 labels) of root/split/<class>/**; classes sorted by name.

    classes: the train split's list, so val labels use the same numbering.
    """
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"--data-dir {root}: missing folder {folder} (expected {split}/<class>/<image>)")
    found = class_folders(folder)
    if not found:
        raise UserError(f"--data-dir {root}: {folder} has no class folders")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{folder}: classes not in the train split: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in found:
        for dirpath, dirnames, filenames in os.walk(folder / c, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(index[c])
    if not paths:
        raise UserError(f"--data-dir {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return classes, paths, np.asarray(labels, dtype=np.int64)


def random_resized_crop_box(
    w: int,
    h: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(x0, y0, crop w, crop h): area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries;
    then the centre crop with the aspect clamped into `ratio` (as gluoncv/torchvision)."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    cw, ch = w, h
    if w / h < ratio[0]:
        ch = round(w / ratio[0])
    elif w / h > ratio[1]:
        cw = round(h * ratio[1])
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def color_jitter(a: np.ndarray, rng: np.random.Generator, strength: float = JITTER) -> np.ndarray:
    """Brightness, contrast, saturation (random order, factors 1 +- strength) on float HWC 0..255."""
    factors = 1.0 + rng.uniform(-strength, strength, 3)
    for k in rng.permutation(3):
        f = np.float32(factors[k])
        if k == 0:
            a = a * f
        elif k == 1:  # towards the mean grey level of the image
            a = a * f + np.float32((a @ _GRAY).mean()) * (1 - f)
        else:  # towards each pixel's grey level
            a = a * f + (a @ _GRAY)[..., None] * (1 - f)
    return a


def pca_lighting(a: np.ndarray, rng: np.random.Generator, std: float = LIGHTING_STD) -> np.ndarray:
    """AlexNet lighting noise: add eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel."""
    alpha = rng.normal(0.0, std, 3).astype(np.float32)
    return a + _EIGVEC @ (alpha * _EIGVAL)


def _resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BILINEAR)


def _open(path: str, short: int | None) -> Image.Image:
    img = Image.open(path)
    if short is not None and img.format == "JPEG":  # decode at a reduced scale when enough
        s = short / min(img.size)
        img.draft("RGB", (math.ceil(img.size[0] * s), math.ceil(img.size[1] * s)))
    return img.convert("RGB")


def transform(path: str, size: int, augmentation: str, rng: np.random.Generator | None) -> np.ndarray:
    """Decode one image and make it a uint8 (size, size, 3) array.

    rng None (val) or augmentation "none": resize short side to ceil(size/0.875), centre crop.
    low / crop / crop-flip: the same resize, random size x size crop (+ flip unless "crop").
    medium: random-resized crop (area 8-100 %, aspect 3/4-4/3) to size, flip.
    high: medium + colour jitter 0.4 + PCA lighting 0.1.
    """
    resize = math.ceil(size / CROP_RATIO)
    if rng is None or augmentation == "none":
        img = _resize_short(_open(path, resize), resize)
        x0, y0 = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        return np.asarray(img.crop((x0, y0, x0 + size, y0 + size)))
    if augmentation in ("low", "crop", "crop-flip"):
        img = _resize_short(_open(path, resize), resize)
        x0 = int(rng.integers(0, img.size[0] - size + 1))
        y0 = int(rng.integers(0, img.size[1] - size + 1))
        img = img.crop((x0, y0, x0 + size, y0 + size))
    else:
        img = _open(path, None)
        x0, y0, cw, ch = random_resized_crop_box(*img.size, rng)
        img = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5 and augmentation != "crop":
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(img)
    if augmentation == "high":
        f = pca_lighting(color_jitter(a.astype(np.float32), rng), rng)
        a = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return a


class ImageFolderDataset(torch.utils.data.Dataset):
    """Item (epoch, i) -> (uint8 HWC array, label, [(bad path, reason), ...]). Train: a bad file is
    replaced by the next readable one; val: label ``_LEFT_OUT`` (the collate drops the item)."""

    def __init__(
        self, paths: list[str], labels: np.ndarray, *, size: int, augmentation: str, train: bool, seed: int
    ) -> None:
        self.paths, self.labels = paths, labels
        self.size, self.augmentation, self.train, self.seed = size, augmentation, train, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int, list[tuple[str, str]]]:
        epoch, i = key
        bad: list[tuple[str, str]] = []
        for step in range(min(len(self.paths), _MAX_REPLACEMENTS) if self.train else 1):
            j = (i + step) % len(self.paths)
            # a fresh generator per try, so a replacement uses the same draws as sample i would
            rng = np.random.default_rng([self.seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, i]) if self.train else None
            try:
                return transform(self.paths[j], self.size, self.augmentation, rng), int(self.labels[j]), bad
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                why = str(e).replace(repr(self.paths[j]), "").replace(self.paths[j], "")  # named once, by the line
                bad.append((self.paths[j], " ".join(f"{type(e).__name__}: {why}".split())[:200]))
        empty = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        return empty, _BROKEN if self.train else _LEFT_OUT, bad  # _BROKEN: the loader raises a UserError


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], list[bool]]:
    """(x, y, bad files, per item: left out) with the left-out val items dropped from x and y."""
    left_out = [it[1] == _LEFT_OUT for it in items]
    kept = [it for it, out in zip(items, left_out) if not out]
    a = np.stack([it[0] for it in kept]) if kept else np.zeros((0, *items[0][0].shape), dtype=np.uint8)
    x = torch.from_numpy(a).permute(0, 3, 1, 2)  # (B, 3, S, S)
    y = torch.tensor([it[1] for it in kept], dtype=torch.int64)
    return x, y, [b for it in items for b in it[2]], left_out


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode with Pillow; torch threads would oversubscribe


class _EpochBatches:
    """Batch sampler whose content the loader sets before each iter (works with persistent workers)."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batches = self.epoch, self.batches  # snapshot: set_epoch may run while workers prefetch
        return ([(epoch, i) for i in b] for b in batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageFolderLoader(EpochShards):
    """The Loader protocol (see bitrain.data) over an ImageFolderDataset, decoded by CPU workers."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        *,
        batch_size: int,
        device: torch.device,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        dtype: torch.dtype,
        channels_last: bool,
    ) -> None:
        self._init_shards(len(dataset), batch_size=batch_size, train=dataset.train, rank=rank, world_size=world_size)
        self.dataset, self.device = dataset, device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.dtype, self.channels_last = dtype, channels_last
        self.scale, self.shift = normalize_affine(IMAGENET_MEAN, IMAGENET_STD, device)
        self.num_skipped = 0  # corrupt-image replacements (train) or files left out (val) so far, every occurrence
        self.skipped_files: set[str] = set()
        self.num_left_out = 0  # val: files left out of the last full pass
        self._reported_left_out = 0
        self.split_name = "val"  # in that count's line (bitrain eval --split train may set "train")
        self._sampler = _EpochBatches()
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init,
            persistent_workers=num_workers > 0,
            # workers start from a clean server process, not a fork of this one: a fork of a process
            # whose thread pools are running (OpenVINO's, onnxruntime's, OpenMP's) can crash or hang
            multiprocessing_context="forkserver" if num_workers > 0 else None,
        )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Sample indices of this rank's batches in `epoch` (train: shuffled; val: fixed)."""
        if self.train:
            perm = epoch_permutation(len(self.dataset), self.seed, epoch).tolist()
            return [perm[train_batch_slice(k, self.batch_size, self.rank, self.world_size)] for k in range(self._len)]
        return [
            list(range(lo, min(lo + self.batch_size, self._hi))) for lo in range(self._lo, self._hi, self.batch_size)
        ]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        self._start = 0  # start applies to the next iteration only
        self._sampler.epoch, self._sampler.batches = epoch, self.epoch_batches(epoch)[start:]
        return self._batches(iter(self._loader))

    def _batches(self, it: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        left_out = in_a_row = 0  # val: files left out in this pass; consecutive ones
        in_a_row_max = min(_MAX_REPLACEMENTS, max(1, self.num_samples))
        for x, y, bad, out in it:
            if bad:
                self._report(bad, bool((y < 0).any()))
            for o in out:
                in_a_row = in_a_row + 1 if o else 0
                if in_a_row >= in_a_row_max:
                    raise UserError(
                        f"{in_a_row} unreadable images in a row up to {bad[-1][0]}: is the image folder broken?"
                    )
            left_out += sum(out)
            if not len(y):  # a val batch of unreadable files only
                continue
            x = x.to(self.device, non_blocking=True)  # uint8: a quarter of float's bytes
            y = y.to(self.device, non_blocking=True)
            yield normalize_batch(x, self.scale, self.shift, self.dtype, self.channels_last), y
        if not self.train:  # a full pass: say how many files the metrics leave out (when that changes)
            self.num_left_out = left_out
            if left_out != self._reported_left_out:
                self._reported_left_out = left_out
                where = f" (rank {self.rank})" if self.world_size > 1 else ""
                s = "s" if left_out != 1 else ""
                print(
                    f"{self.split_name}{where}: {left_out} unreadable image{s} skipped; the metrics are over the "
                    f"other {self.num_samples - left_out}",
                    file=sys.stderr,
                )

    def _report(self, bad: list[tuple[str, str]], broken: bool) -> None:
        for path, reason in bad:
            self.num_skipped += 1
            if path not in self.skipped_files:
                self.skipped_files.add(path)
                instead = "using the next file in its place" if self.train else "left out of validation"
                print(f"skipping unreadable image {path} ({reason}); {instead}", file=sys.stderr)
        if broken:
            raise UserError(
                f"{_MAX_REPLACEMENTS} unreadable images in a row from {bad[-1][0]}: is the image folder broken?"
            )


def build_imagefolder(
    name: str,
    *,
    data_dir: str | None,
    batch_size: int,
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    augmentation: str,
    dtype: torch.dtype,
    channels_last: bool,
    image_size: int = 224,
):
    """(train loader, val loader, DataInfo) of a train/<class>/, val/<class>/ tree at data_dir."""

    if not data_dir:
        raise UserError(
            f"--data-dir is required for {name}: a folder holding train/<class>/<image> and val/<class>/<image>"
        )
    if image_size < 1:
        raise UserError(f"--image-size must be >= 1, got {image_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {num_workers}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"--data-dir {root} is not a folder (expected train/<class>/, val/<class>/)")
    classes, tr_paths, tr_labels = scan_split(root, "train")
    _, va_paths, va_labels = scan_split(root, "val", classes)
    info = DataInfo(name, len(classes), 3, image_size, len(tr_paths), len(va_paths), IMAGENET_MEAN, IMAGENET_STD)
    common = dict(
        batch_size=batch_size,
        device=device,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        dtype=dtype,
        channels_last=channels_last,
    )
    train = ImageFolderLoader(
        ImageFolderDataset(tr_paths, tr_labels, size=image_size, augmentation=augmentation, train=True, seed=seed),
        **common,
    )
    val = ImageFolderLoader(
        ImageFolderDataset(va_paths, va_labels, size=image_size, augmentation="none", train=False, seed=seed), **common
    )
    return train, val, info
