"""What every data set gives the rest of bitrain: its DataInfo and loaders that follow one protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class DataInfo:
    """What the model and the trainer need to know about a data set."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int  # H == W after the val transform
    num_train: int  # samples in the whole train split
    num_val: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]


class Loader(Protocol):
    """What the trainer uses of a loader (DeviceLoader and ImageFolderLoader both are one)."""

    batch_size: int

    def __len__(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    def set_epoch(self, epoch: int, start: int = 0) -> None: ...
    def __iter__(self): ...
