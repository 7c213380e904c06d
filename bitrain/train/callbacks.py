"""What the loop reports to: console + log file, progress bar + ETA file, CSV, TensorBoard.

Callbacks receive plain values (rows of floats, the model for histograms) and never reach into
the trainer. The trainer creates them only on rank 0. A row is a dict with the keys of
``CSV_COLUMNS``; ``split`` is ``batch`` for a log-interval row, ``train``/``val`` at epoch end.
"""

from __future__ import annotations

import csv
import datetime
import functools
import inspect
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from bitrain.train.metrics import METRIC_NAMES

CSV_COLUMNS = ("split", "epoch", "step", "samples", "loss", "acc1", "acc5", "lr", "samples_per_sec", "epoch_time")
#: metric-key scheme -> BMXNet TensorBoard tag suffix, in one place
TB_SPLIT = {"batch": "batch", "train": "training", "val": "validation", "val_ema": "validation-ema"}


class Callback:
    """Base class: every hook is optional.

    ``on_epoch_start`` gets the learning rate of the epoch's first step and the samples seen when
    the epoch began (the ``global_step`` of TensorBoard tags); a subclass that still defines
    ``on_epoch_start(self, epoch)`` keeps working (the two extra values are dropped for it).
    ``on_run_end`` is the CLI's, not the trainer's: once per command, before ``close``, with the exit
    code and, after a finished run, its files (name -> path: the final weights, the best checkpoint).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hook = cls.__dict__.get("on_epoch_start")
        if hook is not None and not _accepts(hook, 4):
            cls.on_epoch_start = _drop_extra_args(hook)

    def on_fit_start(self, info: dict[str, Any]) -> None: ...
    def on_epoch_start(self, epoch: int, lr: float | None = None, samples: int | None = None) -> None: ...
    def on_step(self, epoch: int, batch: int, num_batches: int) -> None: ...
    def on_row(self, row: dict[str, Any]) -> None: ...
    def on_epoch_end(self, epoch: int, epoch_time: float, samples: int) -> None: ...
    def on_histograms(self, model: nn.Module, samples: int) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_fit_end(self, result: dict[str, Any]) -> None: ...
    def on_run_end(self, exit_code: int, files: dict[str, Path]) -> None: ...
    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this callback's output (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _accepts(fn: Any, n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (self included)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature to inspect: assume it does
        return True
    return True


def _drop_extra_args(hook: Any) -> Any:
    @functools.wraps(hook)
    def on_epoch_start(self: Any, epoch: int, *_: Any) -> None:
        hook(self, epoch)

    return on_epoch_start


def _fmt_metrics(row: dict[str, Any]) -> str:
    return "\t".join(f"{METRIC_NAMES[k]}={row[k]:.6f}" for k in ("acc1", "acc5", "loss") if row.get(k) is not None)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ConsoleLogger(Callback):
    """BMXNet's log lines, to the console and to the run's log file (``--log``)."""

    def __init__(self, log_file: str | Path | None, console: Any = None) -> None:
        self.logger = logging.getLogger(f"bitrain.run.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.console = console  # a rich Console while a progress bar is live, else None
        if console is None:
            h = logging.StreamHandler(sys.stdout)
            h.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(h)
        if log_file is not None:
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.logger.addHandler(fh)

    def _log(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)
        self.logger.info(text)

    def on_message(self, text: str) -> None:
        self._log(text)

    def on_row(self, row: dict[str, Any]) -> None:
        e = row["epoch"]
        if row["split"] == "batch":
            self._log(
                f"Epoch[{e}] Batch [{row['batch']}]\tSpeed: {row['samples_per_sec']:.1f} samples/sec\t"
                f"{_fmt_metrics(row)}\tlr={row['lr']:.6g}"
            )
        else:
            name = {"train": "training", "val": "validation", "val_ema": "validation (EMA)"}[row["split"]]
            self._log(f"[Epoch {e}] {name}: {_fmt_metrics(row)}")

    def on_epoch_end(self, epoch: int, epoch_time: float, samples: int) -> None:
        self._log(f"[Epoch {epoch}] time cost: {epoch_time:.3f}")

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


class CSVLogger(Callback):
    """``metrics.csv``: one row per log interval and per epoch and split (appends on resume)."""

    def __init__(self, path: str | Path) -> None:
        new = not Path(path).exists() or Path(path).stat().st_size == 0
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def on_row(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
        self.file.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"bytes": self.file.tell()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # rows written after the checkpoint (a run killed mid-epoch) are cut, so the resumed run
        # does not log them twice
        if self.file.tell() > state["bytes"]:
            self.file.truncate(state["bytes"])
            self.file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger(Callback):
    """BMXNet's TensorBoard tags; ``global_step`` counts samples seen (not iterations).

    ``training/lr`` is written at each epoch start (BMXNet's ``track_lr``) and with each
    log-interval row; one value per step (the first written).
    """

    #: in the log dir: the step of the last epoch-start ``training/lr`` on disk. That write comes
    #: right after an epoch-end checkpoint, so only the files can tell a resumed run whether the
    #: killed one got that far (an --interrupt-at run stops before it)
    LR_MARK = ".bitrain-lr-step"

    def __init__(self, log_dir: str | Path, histograms: bool = False) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = str(log_dir)
        self.writer = SummaryWriter(self.log_dir)
        self.histograms = histograms
        self.last_step = -1  # the largest global_step written
        self.lr_step = -1  # the largest global_step of a training/lr value

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "lr_step": self.lr_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # TensorBoard hides events at or after purge_step written before this restart: what a
        # killed run logged after its checkpoint does not show twice
        from torch.utils.tensorboard import SummaryWriter

        self.writer.close()
        self.last_step = state["last_step"]
        self.lr_step = state.get("lr_step", -1)
        mark = self._read_lr_mark()
        if mark <= self.last_step:  # one past it is purged below, and written again
            self.lr_step = max(self.lr_step, mark)
        self.writer = SummaryWriter(self.log_dir, purge_step=self.last_step + 1)

    def _read_lr_mark(self) -> int:
        try:
            return int((Path(self.log_dir) / self.LR_MARK).read_text())
        except (OSError, ValueError):
            return -1

    def on_epoch_start(self, epoch: int, lr: float | None = None, samples: int | None = None) -> None:
        if lr is None or samples is None or samples <= self.lr_step:  # a resumed epoch: written already
            return
        self._add_lr(lr, samples)
        self.writer.flush()
        mark = Path(self.log_dir) / self.LR_MARK
        tmp = mark.with_name(mark.name + ".tmp")
        tmp.write_text(f"{samples}\n")
        os.replace(tmp, mark)

    def _add_lr(self, lr: float, step: int) -> None:
        if step > self.lr_step:
            self.lr_step = step
            self.last_step = max(self.last_step, step)
            self.writer.add_scalar("training/lr", lr, global_step=step)

    def on_row(self, row: dict[str, Any]) -> None:
        split, step = TB_SPLIT[row["split"]], row["samples"]
        self.last_step = max(self.last_step, step)
        for key in ("acc1", "acc5", "loss"):
            if row.get(key) is not None:
                self.writer.add_scalar(f"{METRIC_NAMES[key]}/{split}", row[key], global_step=step)
        if row["split"] == "batch":
            self._add_lr(row["lr"], step)

    def on_epoch_end(self, epoch: int, epoch_time: float, samples: int) -> None:
        self.last_step = max(self.last_step, samples)
        self.writer.add_scalar("training/epoch", epoch, global_step=samples)
        self.writer.add_scalar("training/epoch-time", epoch_time, global_step=samples)
        self.writer.flush()

    def on_histograms(self, model: nn.Module, samples: int) -> None:
        if not self.histograms:
            return
        for name, p in model.named_parameters():
            self.writer.add_histogram(name, p.detach().float().cpu(), global_step=samples)
            if p.grad is not None:
                self.writer.add_histogram(f"{name}-grad", p.grad.detach().float().cpu(), global_step=samples)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ProgressETA(Callback):
    """Live progress bar with ETA on a terminal, and/or BMXNet's ``--progress FILE``
    ("Epoch ETA: X, Train ETA: Y", overwritten in place)."""

    def __init__(self, progress_file: str | Path | None = None, live: bool = False, console: Any = None) -> None:
        self.path = Path(progress_file) if progress_file else None
        self.bar = None
        self.console = None
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = console or Console()
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
        self.epochs = 1
        self.start_epoch = 0
        self.task = None
        self.t_epoch = time.perf_counter()
        self.epoch_times: list[float] = []
        self.last_write = 0.0

    def on_fit_start(self, info: dict[str, Any]) -> None:
        self.epochs, self.start_epoch = info["epochs"], info["start_epoch"]
        if self.bar is not None:
            self.bar.start()

    def on_epoch_start(self, epoch: int, lr: float | None = None, samples: int | None = None) -> None:
        self.t_epoch = time.perf_counter()
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"Epoch {epoch + 1}/{self.epochs}", total=None)

    def on_step(self, epoch: int, batch: int, num_batches: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=batch + 1, total=num_batches)
        now = time.perf_counter()
        if self.path is not None and now - self.last_write >= 1.0:
            self.last_write = now
            per_batch = (now - self.t_epoch) / (batch + 1)
            epoch_eta = per_batch * (num_batches - batch - 1)
            epoch_len = self.epoch_times[-1] if self.epoch_times else per_batch * num_batches
            train_eta = epoch_eta + epoch_len * (self.epochs - epoch - 1)
            text = f"Epoch ETA: {format_duration(epoch_eta)}, Train ETA: {format_duration(train_eta)}"
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, self.path)

    def on_epoch_end(self, epoch: int, epoch_time: float, samples: int) -> None:
        self.epoch_times.append(epoch_time)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
