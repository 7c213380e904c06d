"""The loop's position (``TrainState``) and the ways ``fit()`` ends early, with their exit codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bitrain.errors import UserError


class TrainerStop(Exception):
    """Base of the ways fit() ends early; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class Interrupted(TrainerStop):
    """--interrupt-at, SIGTERM/SIGUSR1/Ctrl-C: a resumable checkpoint was written."""

    exit_code = 3


class NonFiniteLoss(TrainerStop):
    """The loss became NaN/inf; the last good checkpoint is kept."""

    exit_code = 1


@dataclass
class TrainState:
    """Everything resume needs besides module/optimizer/scaler tensors (nanoGPT's loop_state)."""

    epoch: int = 0  # epoch in progress, or the next one to start
    batch: int = 0  # batches of ``epoch`` already trained (0 = at its start)
    step: int = 0  # optimizer steps over the whole run: the schedule's input
    samples: int = 0  # samples seen over the run, all ranks: TensorBoard's x axis
    best_acc: float = -1.0  # best validation top-1 so far
    epoch_elapsed: float = 0.0  # seconds already spent in ``epoch`` before a mid-epoch resume
    epoch_times: list[float] = field(default_factory=list)
    nonfinite_skipped: int = 0
    accumulate: int = 1  # batches per optimizer step: ``batch`` counts these windows

    # the resume arithmetic, named (global_batch: samples per step over all ranks)
    @classmethod
    def at_epoch(
        cls, epoch: int, steps_per_epoch: int, global_batch: int, samples_per_epoch: int | None = None
    ) -> TrainState:
        """The position at the start of ``epoch`` with nothing trained in it (``start_epoch``);
        ``samples_per_epoch`` when an epoch's last step is shorter (accumulation's remainder window)."""
        step = epoch * steps_per_epoch
        samples = epoch * samples_per_epoch if samples_per_epoch is not None else step * global_batch
        return cls(epoch=epoch, step=step, samples=samples)

    @classmethod
    def resumed(cls, saved: dict[str, Any], accumulate: int) -> TrainState:
        """A checkpoint's position for a run with ``accumulate``; a mid-epoch one written with another
        window size is refused (its ``batch`` counts windows of that size)."""
        state = cls(**saved)
        if state.batch and state.accumulate != accumulate:
            raise UserError(
                f"the checkpoint stopped inside epoch {state.epoch} with --accumulate {state.accumulate}; "
                f"resume it with --accumulate {state.accumulate} (or change it from an epoch's end)"
            )
        state.accumulate = accumulate
        return state

    @property
    def epoch_first_step(self) -> int:
        """The step of ``epoch``'s first batch (its lr is the epoch's lr)."""
        return self.step - self.batch

    def samples_before_epoch(self, global_batch: int, batches: int | None = None) -> int:
        """Samples seen when ``epoch`` began (TensorBoard's x value of its start): ``global_batch`` per
        step, or per loader batch when ``batches`` (the loader batches trained in the epoch) is given."""
        return self.samples - (self.batch if batches is None else batches) * global_batch

    def advance(self, global_batch: int) -> None:
        """One optimizer step of ``global_batch`` samples done (an epoch's last step may have fewer)."""
        self.batch, self.step, self.samples = self.batch + 1, self.step + 1, self.samples + global_batch

    def finish_epoch(self, epoch_time: float) -> int:
        """Move to the next epoch's start; returns the epoch just finished."""
        done = self.epoch
        self.epoch, self.batch, self.epoch_elapsed = done + 1, 0, 0.0
        self.epoch_times.append(epoch_time)
        return done

    def average_epoch_time(self) -> float:
        """Mean epoch time leaving the first epoch out (it is usually slower), as BMXNet."""
        rest = self.epoch_times[1:] if len(self.epoch_times) > 1 else self.epoch_times
        return sum(rest) / len(rest) if rest else float("nan")

    def row(
        self,
        split: str,
        epoch: int,
        m: dict[str, float],
        lr: float,
        speed: float | None = None,
        batch: int | None = None,
        epoch_time: float | None = None,
    ) -> dict[str, Any]:
        """A log row (the callbacks' ``on_row``) of metrics ``m`` at this position."""
        return {
            "split": split,
            "epoch": epoch,
            "batch": batch,
            "step": self.step,
            "samples": self.samples,
            "loss": m.get("loss"),
            "acc1": m.get("acc1"),
            "acc5": m.get("acc5"),
            "lr": lr,
            "samples_per_sec": speed,
            "epoch_time": epoch_time,
        }
