"""Device-resident loader: images live on the device as uint8 NCHW; a batch is a gather + augment.

airbench style: one permutation per epoch, then tensor slicing. Per batch there is no Python loop
over samples and no host sync: the epoch's whole plan (sample index, crop offsets, flip) is drawn
on the CPU from a generator seeded by (seed, epoch) and copied to the device once per epoch, so the
order and the augmentation of every epoch position are pure functions of (seed, epoch, position),
identical on every device, for any batch read alone, and for any number of ranks.

Sharding (shared with the image-folder loader):
  train: global batch k of the epoch is the permutation slice [k*B*W, (k+1)*B*W); rank r takes
         its r-th block of B. Every rank gets N // (B*W) batches; the tail is dropped. With this
         layout W ranks at batch B see the same samples per step as 1 rank at batch B*W.
  val:   fixed order, rank r takes the contiguous range [r*N//W, (r+1)*N//W) in batches of B,
         the last partial batch kept: the ranks cover every sample exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bitrain.errors import UserError

# Salts keep the streams drawn from the same (seed, epoch) independent of each other.
_SALT_ORDER = 0x5EED_0001
_SALT_AUG = 0x5EED_0002


def mix_seed(*keys: int) -> int:
    """A 64-bit generator seed from integer keys (seed, epoch, index, ...), well mixed.

    numpy's SeedSequence hashes the keys, so neighbouring keys give unrelated streams.
    """
    words = [int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The train order of one epoch: a CPU int64 permutation of range(n), a function of (seed, epoch)."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, _SALT_ORDER))
    return torch.randperm(n, generator=g)


def check_batch_size(batch_size: int, num_train: int, world_size: int) -> None:
    """UserError unless 1 <= batch_size <= train samples per rank."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise UserError(f"world size must be >= 1, got {world_size}")
    per_rank = num_train // world_size
    if batch_size > per_rank:
        raise UserError(
            f"--batch-size {batch_size} is larger than the train split per rank: "
            f"{per_rank} samples ({num_train} samples / {world_size} rank(s))"
        )


def train_batches_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Batches each rank yields per train epoch (the partial tail is dropped on every rank)."""
    return n // (batch_size * world_size)


def train_batch_slice(k: int, batch_size: int, rank: int, world_size: int) -> slice:
    """Epoch positions of this rank's train batch k (into the epoch permutation)."""
    lo = (k * world_size + rank) * batch_size
    return slice(lo, lo + batch_size)


def val_shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) sample range this rank evaluates; the ranks' ranges partition range(n)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def normalize_affine(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, C, 1, 1) with x_norm = uint8 * scale + shift == (x/255 - mean)/std."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, -1, 1, 1).to(device)
    shift = (-m / s).to(torch.float32).view(1, -1, 1, 1).to(device)
    return scale, shift


def normalize_batch(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype, channels_last: bool
) -> torch.Tensor:
    """uint8 NCHW (any strides) -> normalised `dtype` NCHW, contiguous or channels_last."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)  # on uint8: 1 byte per element moved, not 4
    out = torch.addcmul(shift, x, scale)  # one kernel: uint8 promoted to float32, same format
    return out if dtype == torch.float32 else out.to(dtype)


class EpochShards:
    """The Loader protocol's bookkeeping, shared by the loaders: this rank's batches per epoch,
    its samples, and ``set_epoch(epoch, start)``. Train: every rank the same number of full
    batches (tail dropped); val: this rank's contiguous shard, last partial batch kept."""

    def _init_shards(self, n: int, *, batch_size: int, train: bool, rank: int, world_size: int) -> None:
        if train:
            check_batch_size(batch_size, n, world_size)
            self._len = train_batches_per_epoch(n, batch_size, world_size)
        else:
            if batch_size < 1:
                raise UserError(f"--batch-size must be >= 1, got {batch_size}")
            self._lo, self._hi = val_shard(n, rank, world_size)
            self._len = -(-(self._hi - self._lo) // batch_size)
        self.batch_size, self.train = batch_size, train
        self._epoch, self._start = 0, 0

    def __len__(self) -> int:
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples one full epoch yields on this rank."""
        return self._len * self.batch_size if self.train else self._hi - self._lo

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; the next iter() yields its batches start .. len-1."""
        if not 0 <= start <= self._len:
            raise ValueError(f"start batch {start} outside 0..{self._len}")
        self._epoch, self._start = int(epoch), int(start)


class DeviceLoader(EpochShards):
    """Batches of an in-memory data set kept on the device (see the module docstring).

    images: uint8 (N, C, H, W) on the device; labels: int64 (N,) on the same device.
    train=True: reshuffled per epoch, tail dropped, random crop (zero padding `pad` pixels each
    side) and horizontal flip (`flip`) per sample. train=False: fixed order, no augmentation.
    Yields (x, y): x `dtype` normalised with mean/std (per channel, [0, 1] units), y int64.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 123,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 0,
        flip: bool = False,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} channels, got {len(mean)}/{len(std)}")
        self._init_shards(images.shape[0], batch_size=batch_size, train=train, rank=rank, world_size=world_size)
        self.labels = labels.to(torch.int64)
        self.device = images.device
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.pad, self.flip = (pad, flip) if train else (0, False)
        self.dtype, self.channels_last = dtype, channels_last
        self.scale, self.shift = normalize_affine(mean, std, self.device)
        n, _, h, w = images.shape
        self._n = n
        self.images = images
        if self.pad:
            # Padded once (zeros: black, as gluoncv/torchvision RandomCrop); the crop windows are a
            # view (N, C, 2p+1, 2p+1, H, W), so one gather does sample selection, pad and crop.
            p = self.pad
            self.images = F.pad(images, (p, p, p, p))
            self._windows = self.images.unfold(2, h, 1).unfold(3, w, 1)
        self._plan: tuple[int, torch.Tensor] | None = None  # (epoch, (N, 4) device plan)

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """(N, 4) int64 on the device: per epoch position (sample index, dy, dx, flip)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        plan = torch.zeros(self._n, 4, dtype=torch.int64)
        plan[:, 0] = epoch_permutation(self._n, self.seed, epoch)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _SALT_AUG))
        # Drawn even when unused, so enabling flip does not change the crops (and vice versa).
        plan[:, 1:3] = torch.randint(0, 2 * self.pad + 1, (self._n, 2), generator=g)
        plan[:, 3] = torch.randint(0, 2, (self._n,), generator=g) if self.flip else 0
        plan = plan.to(self.device)  # the one host->device copy of the epoch
        self._plan = (epoch, plan)
        return plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        self._start = 0  # start applies to the next iteration only
        if self.train:
            return self._train_batches(self.epoch_plan(epoch), start)
        return self._val_batches(start)

    def _train_batches(self, plan: torch.Tensor, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(start, self._len):
            rows = plan[train_batch_slice(k, self.batch_size, self.rank, self.world_size)]
            yield self.augment(rows), self.labels[rows[:, 0]]

    def _val_batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(start, self._len):
            lo = self._lo + k * self.batch_size
            hi = min(lo + self.batch_size, self._hi)
            x = normalize_batch(self.images[lo:hi], self.scale, self.shift, self.dtype, self.channels_last)
            yield x, self.labels[lo:hi]

    def augment(self, rows: torch.Tensor) -> torch.Tensor:
        """Gather, crop, flip and normalise one batch; rows: (B, 4) slice of the epoch plan."""
        if self.pad:
            x = self._windows[rows[:, 0], :, rows[:, 1], rows[:, 2]]  # (B, C, H, W) uint8
        else:
            x = self.images[rows[:, 0]]
        if self.flip:
            x = torch.where(rows[:, 3].bool()[:, None, None, None], x.flip(3), x)
        return normalize_batch(x, self.scale, self.shift, self.dtype, self.channels_last)
