"""The checkpoint policy of a run as one object (timm's CheckpointSaver): which files a save publishes
(``last.pt`` always; ``best.pt`` on a strictly better top-1; a numbered copy every ``save_frequency``
epochs or when forced) and when a mid-epoch ``last.pt`` is due. The writes themselves are
``checkpoint.save_last``'s: atomic, checksummed, on rank 0 only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bitrain.train import checkpoint as ckpt
from bitrain.train import dist


class CheckpointSaver:
    """Saves the trainer's payload into ``folder`` (a run's ``checkpoints/``).

    ``name``: the numbered files' stem, ``{name}_{epoch:04d}_acc_{top1:.4f}.pt``; ``save_frequency``:
    epochs between numbered files (0: only forced ones); ``checkpoint_interval`` (steps) and
    ``checkpoint_minutes``: a mid-epoch ``last.pt`` (0: off); ``extra``: entries added to every payload
    (the CLI's config, model_args and data description).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        name: str = "model",
        save_frequency: int = 10,
        checkpoint_interval: int = 0,
        checkpoint_minutes: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.folder, self.name = Path(folder), name
        self.save_frequency = save_frequency
        self.checkpoint_interval, self.checkpoint_minutes = checkpoint_interval, checkpoint_minutes
        self.extra = dict(extra or {})
        self._last_save = time.perf_counter()

    def epoch_files(self, epoch: int, acc1: float, is_best: bool, forced: bool) -> list[str]:
        """The names published with ``last.pt`` after validating ``epoch`` with top-1 ``acc1``."""
        files = [ckpt.BEST] if is_best else []
        if forced or (self.save_frequency and (epoch + 1) % self.save_frequency == 0):
            files.append(f"{self.name}_{epoch:04d}_acc_{max(acc1, 0.0):.4f}.pt")
        return files

    def restart_clock(self) -> None:
        """Count ``checkpoint_minutes`` from now (the trainer calls it at each epoch's start)."""
        self._last_save = time.perf_counter()

    def mid_epoch_due(self, step: int) -> bool:
        """Whether a ``last.pt`` is due after optimizer step ``step`` (counted over the run)."""
        if self.checkpoint_interval and step % self.checkpoint_interval == 0:
            return True
        return bool(self.checkpoint_minutes) and time.perf_counter() - self._last_save >= 60 * self.checkpoint_minutes

    def save(self, payload: dict[str, Any], also: list[str] = ()) -> None:
        """``payload`` (plus ``extra``) as ``last.pt`` and the names in ``also`` (rank 0 writes)."""
        if dist.get_info().is_main:
            ckpt.save_last(self.folder, {**payload, **self.extra}, also=[self.folder / n for n in also])
        self._last_save = time.perf_counter()
