"""The epoch loop: the seed's zero_grad -> forward -> loss -> backward -> step, grown into
BMXNet v2's loop (schedule with warmup, data and metric reset per epoch, log lines with speed,
validation, best/numbered checkpoints, interrupt-at, test-run) with exact resume.

``Trainer`` takes everything as flat keyword arguments; it never sees the config, the model zoo
or the data-set registry. ``fit()`` reads top to bottom; the rest are named steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary.layers import clip_latent_weights_, has_weight_clips, latent_weight_warning
from bitrain.binary.schedule import set_quantizer_epoch
from bitrain.errors import UserError
from bitrain.train import checkpoint as ckpt
from bitrain.train import dist
from bitrain.train.callbacks import Callback
from bitrain.train.evaluation import autocast_dtype, evaluate, recalibrate_bn
from bitrain.train.metrics import EpochMetrics
from bitrain.train.mixup import distillation_loss, mix_inputs, mixed_cross_entropy, mixup_params
from bitrain.train.optim import build_optimizer
from bitrain.train.preempt import StopFlag
from bitrain.train.schedules import make_schedule
from bitrain.train.state import Interrupted, NonFiniteLoss, TrainerStop, TrainState

__all__ = [
    "Trainer",
    "TrainState",
    "TrainerStop",
    "Interrupted",
    "NonFiniteLoss",
    "evaluate",  # re-exported from bitrain.train.evaluation
]

PROFILE_STEPS = 5  # steps of the first epoch that --profile traces


class Trainer:
    """Train ``model`` with ``optimizer`` on ``train_loader``, validating on ``val_loader``.

    ``optimizer`` is an optimizer or a name (sgd, nag, adam, radam, adamw, bop: built with BMXNet's
    no-decay groups). Loaders follow bitrain's loader protocol: ``set_epoch(epoch, start)``, ``len()``,
    ``batch_size``, ``num_samples``, and yield ``(x, y)`` already on ``device``.
    The learning rate: ``schedule`` (a function of the optimizer step), else BMXNet's ``lr_mode``
    schedule (step, poly, cosine, linear, with ``lr_steps``, ``lr_factor``, ``warmup_epochs``,
    ``warmup_lr``) built here for the loader's steps per epoch, else a constant ``lr``.
    Keyword names are ``bitrain train``'s option names. Files go to ``run_dir`` (rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | str,
        train_loader: Any,
        val_loader: Any = None,
        *,
        epochs: int,
        schedule: Callable[[int], float] | None = None,
        lr: float = 0.01,
        lr_mode: str | None = None,
        lr_factor: float = 0.1,
        lr_steps: Sequence[float] = (),
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.0,
        run_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | str = "cpu",
        dtype: str | torch.dtype | None = None,
        compile: bool = False,
        channels_last: bool = False,
        sync_bn: bool = False,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        mixup_off_epoch: int = 0,
        clip_grad_norm: float | None = None,
        clip_latent_weights: float | None = None,
        bn_recalibrate: int = 0,
        teacher: nn.Module | None = None,
        distill_temperature: float = 1.0,
        distill_alpha: float = 1.0,
        log_interval: int = 50,
        save_frequency: int = 10,
        checkpoint_interval: int = 0,
        checkpoint_minutes: float = 0.0,
        interrupt_at: int | None = None,
        test_run: bool = False,
        skip_nonfinite: bool = False,
        seed: int = 123,
        start_epoch: int = 0,
        checkpoint_name: str = "model",
        checkpoint_extra: dict[str, Any] | None = None,
        profile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)  # the unwrapped module: what checkpoints hold
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dist = dist.get_info()
        self.net = dist.wrap_ddp(self.model, self.device, sync_bn=sync_bn)  # what forward runs
        if compile:
            self.net = torch.compile(self.net)
        self.steps_per_epoch = 1 if test_run else len(train_loader)
        if schedule is None and lr_mode is not None:
            schedule = make_schedule(
                lr=lr,
                mode=lr_mode,
                steps_per_epoch=self.steps_per_epoch,
                epochs=epochs,
                warmup_epochs=warmup_epochs,
                warmup_lr=warmup_lr,
                lr_steps=list(lr_steps),
                lr_factor=lr_factor,
            )
        if isinstance(optimizer, str):  # a name: BMXNet's parameter groups, lr from the schedule or ``lr``
            optimizer = build_optimizer(self.model, optimizer, lr=schedule(0) if schedule else lr)
        self.optimizer, self.train_loader, self.val_loader = optimizer, train_loader, val_loader
        self.epochs, self.schedule = epochs, schedule
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ckpt_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.callbacks = list(callbacks) if self.dist.is_main else []
        self.amp_dtype = autocast_dtype(dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.label_smoothing, self.mixup_alpha, self.mixup_off_epoch = label_smoothing, mixup_alpha, mixup_off_epoch
        self.clip_grad_norm, self.clip_latent_weights = clip_grad_norm, clip_latent_weights
        self._weight_clips = has_weight_clips(self.model)  # layers with their own bound (larq's WeightClip)
        if bn_recalibrate < 0:
            raise UserError(f"--bn-recalibrate must be >= 0, got {bn_recalibrate}")
        self.bn_recalibrate = bn_recalibrate
        if not distill_temperature > 0 or not 0 <= distill_alpha <= 1:
            raise UserError(
                f"--distill-temperature must be > 0 and --distill-alpha in [0, 1], got "
                f"{distill_temperature} and {distill_alpha}"
            )
        # the teacher: eval mode, no gradients, never saved (a checkpoint's config names its file)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        self.distill_temperature, self.distill_alpha = distill_temperature, distill_alpha
        self.log_interval, self.save_frequency = log_interval, save_frequency
        self.checkpoint_interval, self.checkpoint_minutes = checkpoint_interval, checkpoint_minutes
        self.interrupt_at, self.test_run, self.skip_nonfinite = interrupt_at, test_run, skip_nonfinite
        self.seed, self.checkpoint_name = seed, checkpoint_name
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.profile_steps = PROFILE_STEPS if profile else 0
        self.global_batch = train_loader.batch_size * self.dist.world_size
        self.state = TrainState(
            epoch=start_epoch,
            step=start_epoch * self.steps_per_epoch,
            samples=start_epoch * self.steps_per_epoch * self.global_batch,
        )
        self.train_metrics = EpochMetrics(self.device)
        self.val_metrics = EpochMetrics(self.device)
        # first step whose loss was non-finite (inf = none); a device tensor: no sync per step
        self._first_bad = torch.full((), math.inf, device=self.device, dtype=torch.float64)
        self._signals = StopFlag()
        self._recalibration_reported = False

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``epochs``; returns the final metrics. Raises Interrupted / NonFiniteLoss."""
        s = self.state
        self._emit(
            "on_fit_start",
            {
                "epochs": self.epochs,
                "start_epoch": s.epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.global_batch,
            },
        )
        if s.step == 0:
            self._emit("on_histograms", self.model, s.samples)
        note = None if self.clip_latent_weights else latent_weight_warning(self.model)
        if note:
            self._emit("on_message", note)
        val: dict[str, float] = {}
        with self._signals:
            while s.epoch < self.epochs:
                self._emit(
                    "on_epoch_start",
                    s.epoch,  # the lr of the epoch's first step; the samples before it
                    self.schedule(s.step - s.batch) if self.schedule else self.optimizer.param_groups[0]["lr"],
                    s.samples - s.batch * self.global_batch,
                )
                set_quantizer_epoch(self.model, s.epoch)  # scheduled quantizers: a function of the epoch
                train, epoch_time = self._train_epoch()
                val = self.evaluate()
                epoch = s.epoch
                s.epoch, s.batch, s.epoch_elapsed = epoch + 1, 0, 0.0
                s.epoch_times.append(epoch_time)
                self._emit("on_epoch_end", epoch, epoch_time, s.samples)
                self._emit("on_histograms", self.model, s.samples)
                self._log_row("train", epoch, train, epoch_time=epoch_time)
                self._log_row("val", epoch, val)
                forced = self.interrupt_at is not None and epoch + 1 == self.interrupt_at
                self._save_epoch(epoch, val.get("acc1", float("nan")), forced=forced)
                if forced:
                    raise Interrupted(
                        f"[Epoch {epoch}] interrupting because --interrupt-at was set to {self.interrupt_at}"
                    )
        self._emit("on_fit_end", {"best_acc": s.best_acc, "val": val})
        return {"best_acc": s.best_acc, "val": val, "avg_epoch_time": self.average_epoch_time()}

    def _train_epoch(self) -> tuple[dict[str, float], float]:
        s = self.state
        t0 = time.perf_counter() - s.epoch_elapsed
        if s.batch == 0:
            self.train_metrics.reset()
        self.train_loader.set_epoch(s.epoch, start=s.batch)
        self.net.train()
        t_log, samples_log, t_ckpt = time.perf_counter(), 0, time.perf_counter()
        with self._profiler() as prof:
            for x, y in self.train_loader:
                lr = self._set_lr(s.step)
                self.train_step(x, y)
                s.batch, s.step, s.samples = s.batch + 1, s.step + 1, s.samples + self.global_batch
                samples_log += self.global_batch
                self._emit("on_step", s.epoch, s.batch - 1, self.steps_per_epoch)
                if prof is not None:
                    prof.step()
                if self.log_interval and s.batch % self.log_interval == 0:
                    now = time.perf_counter()
                    self._log_batch(lr, samples_log / max(now - t_log, 1e-9))
                    t_log, samples_log = now, 0
                if self.test_run and s.batch >= 1:
                    break
                if self._should_checkpoint_mid_epoch(t_ckpt):
                    s.epoch_elapsed = time.perf_counter() - t0
                    self._save_last()
                    t_ckpt = time.perf_counter()
                if self._stop_requested():
                    s.epoch_elapsed = time.perf_counter() - t0
                    self._save_last()
                    raise Interrupted(f"received {self._signals.received}: stopped at epoch {s.epoch} batch {s.batch}")
        self._check_finite()
        return self.train_metrics.compute(), time.perf_counter() - t0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """zero_grad -> forward (autocast) -> loss -> backward -> (clip) -> step -> metrics; no host sync."""
        self.optimizer.zero_grad(set_to_none=True)
        mix = self._mixup_params(y)
        if mix is not None:
            x = mix_inputs(x, *mix)
        with self._autocast():
            logits = self.net(x)
            loss = self._loss(logits, y, mix, self._teacher_logits(x))
        if self.skip_nonfinite and not bool(torch.isfinite(loss)):  # opt-in: one sync per step
            self.state.nonfinite_skipped += 1
            self._emit(
                "on_message",
                f"step {self.state.step}: non-finite loss, step skipped ({self.state.nonfinite_skipped} so far)",
            )
            return loss.detach()
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.clip_latent_weights or self._weight_clips:
            clip_latent_weights_(self.model, self.clip_latent_weights)
        loss = loss.detach()
        self.train_metrics.update(logits.detach(), y, loss.float() * y.shape[0])
        bad = torch.where(torch.isfinite(loss), math.inf, float(self.state.step))
        torch.minimum(self._first_bad, bad, out=self._first_bad)
        return loss

    def _loss(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        mix: tuple[float, torch.Tensor] | None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = logits.float()
        alpha = self.distill_alpha if teacher_logits is not None else 0.0
        loss = 0.0
        if alpha < 1:  # the label loss
            if mix is None:
                loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            else:
                loss = mixed_cross_entropy(logits, y, *mix, label_smoothing=self.label_smoothing)
            loss = loss * (1 - alpha) if alpha else loss
        if alpha > 0:  # the teacher's distribution on the same (mixed) input
            loss = loss + alpha * distillation_loss(logits, teacher_logits, self.distill_temperature)
        return loss

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.teacher is None else self.teacher(x)

    def _mixup_params(self, y: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        if not self.mixup_alpha or (self.mixup_off_epoch and self.state.epoch >= self.mixup_off_epoch):
            return None
        return mixup_params(self.seed, self.state.step, self.dist.rank, y.shape[0], self.mixup_alpha)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current model (empty dict without a val loader)."""
        if self.val_loader is None:
            return {}
        if self.bn_recalibrate:
            self.recalibrate_bn(self.bn_recalibrate)
        self.val_loader.set_epoch(0)
        dist.sync_buffers(self.model)  # every rank validates the model rank 0 saves
        return evaluate(
            self.model,
            self.val_loader,
            device=self.device,
            amp_dtype=self.amp_dtype,
            max_batches=1 if self.test_run else None,
            metrics=self.val_metrics,
        )

    def recalibrate_bn(self, batches: int) -> float:
        """Re-estimate the BatchNorm statistics of the current weights over the first ``batches`` train
        batches of epoch 0's order (a fixed, deterministic set, so the validated, saved and resumed model
        agree); see :func:`recalibrate_bn`. Returns the seconds it took."""
        t0 = time.perf_counter()
        count = min(batches, self.steps_per_epoch)
        self.train_loader.set_epoch(0)
        with self._autocast():
            recalibrate_bn(self.model, self.train_loader, count)
        seconds = time.perf_counter() - t0
        if not self._recalibration_reported:
            self._recalibration_reported = True
            self._emit(
                "on_message",
                f"BatchNorm statistics re-estimated over {count} train batches before validating ({seconds:.2f}s)",
            )
        return seconds

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole resume point as a plain dict (weights_only-loadable)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trainer": dataclasses.asdict(self.state),
            "train_metrics": self.train_metrics.state_dict(),
            "rng": {"ranks": dist.gather_rng_states()},
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            **self.checkpoint_extra,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Restore model, optimizer, scaler, loop position, partial-epoch metrics and RNG."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(**payload["trainer"])
        if "train_metrics" in payload:
            self.train_metrics.load_state_dict(payload["train_metrics"])
        self._load_callback_state(payload)
        rng = payload.get("rng", {})
        per_rank = rng.get("ranks")
        if per_rank:
            dist.set_rng_state(per_rank[self.dist.rank % len(per_rank)])

    def attach(self, callbacks: Sequence[Callback], payload: dict[str, Any] | None = None) -> None:
        """Add callbacks (rank 0 only) after construction, e.g. once the run directory exists; with the
        resumed checkpoint's ``payload`` they continue their output (CSV rows, TensorBoard steps)."""
        added = list(callbacks) if self.dist.is_main else []
        self.callbacks.extend(added)
        if payload is not None:
            self._load_callback_state(payload, added)

    def _load_callback_state(self, payload: dict[str, Any], callbacks: Sequence[Callback] | None = None) -> None:
        for cb in self.callbacks if callbacks is None else callbacks:
            state = payload.get("callbacks", {}).get(type(cb).__name__)
            if state:
                cb.load_state_dict(state)

    def _save_last(self, also: Sequence[str] = ()) -> None:
        self._check_finite()
        payload = self.state_dict()  # collective under DDP: every rank calls it
        if self.dist.is_main and self.ckpt_dir is not None:
            ckpt.save_last(self.ckpt_dir, payload, also=[self.ckpt_dir / name for name in also])
        dist.barrier()

    def _save_epoch(self, epoch: int, acc1: float, forced: bool) -> None:
        s = self.state
        is_best = acc1 > s.best_acc  # strictly better (nan is never better)
        if is_best:
            s.best_acc = acc1
        also = [ckpt.BEST] if is_best else []
        if forced or (self.save_frequency and (epoch + 1) % self.save_frequency == 0):
            also.append(f"{self.checkpoint_name}_{epoch:04d}_acc_{max(acc1, 0.0):.4f}.pt")
        # best/numbered are published before last.pt moves on: a crash in between re-does them on resume
        self._save_last(also)

    def _should_checkpoint_mid_epoch(self, t_last: float) -> bool:
        if self.checkpoint_interval and self.state.step % self.checkpoint_interval == 0:
            return True
        return bool(self.checkpoint_minutes) and time.perf_counter() - t_last >= 60 * self.checkpoint_minutes

    def _stop_requested(self) -> bool:
        flag = self._signals.received is not None
        if self.dist.enabled:
            # the ranks agree (one small all-reduce) every log interval, not every step, and at the
            # epoch's last batch, so an epoch shorter than the interval still stops
            batch = self.state.batch
            if batch % (self.log_interval or 50) and batch < self.steps_per_epoch:
                return False
            flag = dist.broadcast_flag(flag, self.device)
            if flag and self._signals.received is None:
                self._signals.received = "a stop request on another rank"
        return flag

    def _check_finite(self) -> None:
        bad = float(self._first_bad)
        if math.isfinite(bad):
            raise NonFiniteLoss(
                f"loss became non-finite at step {int(bad)} (epoch {self.state.epoch}); "
                "the last good checkpoint is kept; lower --lr, or use --skip-nonfinite"
            )

    # ------------------------------------------------------------------ small helpers
    def _set_lr(self, step: int) -> float:
        if self.schedule is None:
            return self.optimizer.param_groups[0]["lr"]
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _profiler(self):
        if not self.profile_steps or self.state.epoch != 0 or self.run_dir is None or not self.dist.is_main:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        # skip the first (slow) step and warm up on the second when the epoch is long enough
        skip = 1 if self.steps_per_epoch >= self.profile_steps + 2 else 0
        active = max(1, min(self.profile_steps, self.steps_per_epoch - 2 * skip))
        return profile(
            activities=acts,
            schedule=schedule(wait=skip, warmup=skip, active=active),
            on_trace_ready=tensorboard_trace_handler(str(self.run_dir / "profile")),
        )

    def _log_batch(self, lr: float, speed: float) -> None:
        self._check_finite()
        m = self.train_metrics.compute()
        self._log_row("batch", self.state.epoch, m, lr=lr, speed=speed, batch=self.state.batch)

    def _log_row(
        self,
        split: str,
        epoch: int,
        m: dict[str, float],
        lr: float | None = None,
        speed: float | None = None,
        batch: int | None = None,
        epoch_time: float | None = None,
    ) -> None:
        if not m:
            return
        s = self.state
        row = {
            "split": split,
            "epoch": epoch,
            "batch": batch,
            "step": s.step,
            "samples": s.samples,
            "loss": m.get("loss"),
            "acc1": m.get("acc1"),
            "acc5": m.get("acc5"),
            "lr": lr if lr is not None else self.optimizer.param_groups[0]["lr"],
            "samples_per_sec": speed,
            "epoch_time": epoch_time,
        }
        self._emit("on_row", row)

    def average_epoch_time(self) -> float:
        """Mean epoch time leaving the first epoch out (it is usually slower), as BMXNet."""
        times = self.state.epoch_times
        rest = times[1:] if len(times) > 1 else times
        return sum(rest) / len(rest) if rest else float("nan")

    def message(self, text: str) -> None:
        """A line for the console and the log file (rank 0)."""
        self._emit("on_message", text)

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)
