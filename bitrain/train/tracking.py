"""Experiment trackers as callbacks (``--logger mlflow``, ``--logger wandb``): the base that feeds every
tracker the same values and keeps a failing one from costing the run.

What a tracker gets, with the samples seen as the step (TensorBoard's ``global_step``):

- its run's parameters: the resolved config, once, when its run is created;
- each log row as metrics ``SPLIT/NAME``, the split and names of ``metrics.csv`` (``batch/loss``,
  ``batch/lr``, ``train/acc1``, ``train/epoch_time``, ``val/acc1``, ``val/acc5``, ``val_ema/acc1``, ...),
  ``epoch`` at each epoch's end (and ``stage``, the stage's index, in a run in stages);
- at the end of a finished run, ``best_acc1`` and its files (``model.safetensors``, the best
  checkpoint, ``config.yaml``), the best checkpoint's path also as ``best_checkpoint``.

The tracker's run id is its ``state_dict``, so it is in every checkpoint (and in a run in stages'
``finished.json``): a resumed run reopens the same tracker run. A run stopped with exit 3 has logged
nothing past its checkpoint, so its resumed run adds no duplicates; after a hard kill (SIGKILL, a
lost node) the rows between the last checkpoint and the kill are logged a second time at the same
steps (with the same values: a resumed run repeats those steps bit-identically), as no tracker can
delete logged points.

A tracker that raises (a locked or full store, a lost server) costs one warning line, logs nothing
more in this process, and the run goes on. The heavy libraries are imported when the tracker starts.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bitrain.train.callbacks import Callback

#: the ``metrics.csv`` columns a row's metrics are taken from
ROW_METRICS = ("loss", "acc1", "acc5", "lr", "samples_per_sec", "epoch_time")


def row_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A log row's values as ``{"SPLIT/NAME": value}`` (the names of ``metrics.csv``'s columns)."""
    return {f"{row['split']}/{k}": float(row[k]) for k in ROW_METRICS if row.get(k) is not None}


class TrackingLogger(Callback):
    """The hooks, the guard and the resume state; a backend implements the ``_``-methods below.

    ``params``: the run's parameters (plain values; None ones are left out). ``say``: where a note
    or the one warning goes (the run's console and log file); stderr without it.
    """

    name = "tracker"  # --logger's name for it

    def __init__(self, params: dict[str, Any], *, say: Callable[[str], None] | None = None) -> None:
        self.params = {k: v for k, v in params.items() if v is not None}
        self.say = say
        self.run_id: str | None = None  # set by a resumed checkpoint's state, or when the run is created
        self.started = self.failed = self.finished = False
        self.stage: tuple[str, int] | None = None  # (name, index) in a run in stages
        self.epoch_offset = 0  # epochs of the stages before this one
        self.last_step = 0
        self.best: float | None = None
        self.fit_done = False

    # ------------------------------------------------------------------ what a backend implements
    def _start(self, run_id: str | None) -> str:
        """Reopen run ``run_id`` (resumed), or create one and log ``self.params``; returns its id."""
        raise NotImplementedError

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _set_tag(self, key: str, value: str) -> None:
        raise NotImplementedError

    def _log_files(self, files: dict[str, Path]) -> None:
        """The run's files, each under its name (a path relative to the run directory)."""
        raise NotImplementedError

    def _finish(self, exit_code: int) -> None:
        raise NotImplementedError

    def _abandon(self) -> None:
        """After a failure: release what the backend holds (best effort; errors are ignored)."""

    # ------------------------------------------------------------------ the guard
    def _guarded(self, fn: Callable[..., None], *args: Any, start: bool = True) -> None:
        """``fn(*args)`` once the run is open (opened here with ``start``); the first exception turns
        the tracker off with one warning."""
        if self.failed or self.finished or not (self.started or start):
            return
        try:
            if not self.started:
                self.run_id = self._start(self.run_id)
                self.started = True
                if self.stage is not None:
                    self._set_tag("stage", self.stage[0])
            fn(*args)
        except Exception as e:  # the tracker's problem, never the run's
            self.failed = True
            detail = " ".join(str(e).split())[:300]
            self._tell(
                f"warning: --logger {self.name} failed ({type(e).__name__}: {detail}); it logs nothing more "
                "in this process, the run goes on"
            )
            with contextlib.suppress(Exception):
                self._abandon()

    def _tell(self, text: str) -> None:
        if self.say is not None:
            self.say(text)
        else:
            print(f"bitrain: {text}", file=sys.stderr)

    # ------------------------------------------------------------------ stages
    def set_stage(self, name: str, index: int, epoch_offset: int) -> None:
        """A run in stages: stage ``index`` (``name``) begins; its epochs count on from ``epoch_offset``."""
        self.stage, self.epoch_offset = (name, index), epoch_offset
        self._guarded(self._set_tag, "stage", name, start=False)

    # ------------------------------------------------------------------ the callback's hooks
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.started and state.get("run_id"):
            self.run_id = str(state["run_id"])

    def on_fit_start(self, info: dict[str, Any]) -> None:
        self.fit_done = False
        self._guarded(lambda: None)  # opens the run

    def on_row(self, row: dict[str, Any]) -> None:
        self.last_step = max(self.last_step, int(row["samples"]))
        self._guarded(self._log_metrics, row_metrics(row), int(row["samples"]))

    def on_epoch_end(self, epoch: int, epoch_time: float, samples: int) -> None:
        self.last_step = max(self.last_step, int(samples))
        values = {"epoch": float(epoch + self.epoch_offset)}
        if self.stage is not None:
            values["stage"] = float(self.stage[1])
        self._guarded(self._log_metrics, values, int(samples))

    def on_fit_end(self, result: dict[str, Any]) -> None:
        self.fit_done, self.best = True, result.get("best_acc")

    def on_run_end(self, exit_code: int, files: dict[str, Path]) -> None:
        if exit_code == 0 and self.best is not None:
            self._guarded(self._log_metrics, {"best_acc1": float(self.best)}, self.last_step, start=False)
        present = {name: Path(p) for name, p in files.items() if Path(p).is_file()} if exit_code == 0 else {}
        if present:
            self._guarded(self._log_files, present, start=False)
        best = [p for name, p in present.items() if name.endswith("best.pt")]
        if best:
            self._guarded(self._set_tag, "best_checkpoint", str(best[0].resolve()), start=False)
        self._guarded(self._finish, exit_code, start=False)
        self.finished = True

    def close(self) -> None:
        """Finish the run if ``on_run_end`` did not (the API without the CLI): done after a finished fit."""
        if not self.finished:
            self._guarded(self._finish, 0 if self.fit_done else 1, start=False)
            self.finished = True


@contextlib.contextmanager
def quiet_logs(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """The INFO lines of these libraries' loggers held back (a store's first-use chatter on the console)."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
