"""The epoch loop: the seed's zero_grad -> forward -> loss -> backward -> step, grown into
BMXNet v2's loop (schedule with warmup, data and metric reset per epoch, log lines with speed,
validation, best/numbered checkpoints, interrupt-at, test-run) with exact resume.

``Trainer`` takes a few grouped parts built outside (optimizer, schedule, loss, checkpoint saver,
placement, stop policy, loop options); it never sees the config, the model zoo or the data-set
registry. ``fit()`` reads top to bottom; the rest are named steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from bitrain.binary.layers import clip_latent_weights_, has_weight_clips, latent_weight_warning
from bitrain.binary.schedule import set_quantizer_epoch
from bitrain.train import dist
from bitrain.train.accumulate import Accumulation, no_sync
from bitrain.train.callbacks import Callback
from bitrain.train.ema import ModelEMA, trained_weights
from bitrain.train.evaluation import autocast_dtype, evaluate, recalibrate_bn
from bitrain.train.loss import Loss
from bitrain.train.metrics import EpochMetrics
from bitrain.train.options import LoopOptions, Placement, StopPolicy, first_steps_profiler
from bitrain.train.preempt import StopFlag
from bitrain.train.saver import CheckpointSaver
from bitrain.train.state import Interrupted, NonFiniteLoss, TrainerStop, TrainState

__all__ = ["Trainer", "TrainState", "TrainerStop", "Interrupted", "NonFiniteLoss", "Loss", "CheckpointSaver"]
__all__ += ["Placement", "StopPolicy", "LoopOptions", "evaluate"]  # evaluate: from bitrain.train.evaluation


class Trainer:
    """Train ``model`` with ``optimizer`` on ``train_loader``, validating on ``val_loader``, for ``epochs``.

    ``optimizer``: an optimizer object (``build_optimizer`` gives BMXNet's no-decay groups). Loaders follow
    bitrain's loader protocol: ``set_epoch(epoch, start)``, ``len()``, ``batch_size``, ``num_samples``, and
    yield ``(x, y)`` already on the device. ``schedule``: the lr as a function of the optimizer step
    (``make_schedule``; None keeps the optimizer's lr). ``loss``: a :class:`Loss` (default: plain
    cross-entropy). ``saver``: a :class:`CheckpointSaver` (None: nothing is written; give one on every
    rank or on none). ``placement``, ``stop``, ``options``: see :mod:`bitrain.train.options`.
    Callbacks are added with :meth:`attach`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Any,
        val_loader: Any = None,
        *,
        epochs: int,
        schedule: Callable[[int], float] | None = None,
        loss: Loss | None = None,
        saver: CheckpointSaver | None = None,
        placement: Placement = Placement(),
        stop: StopPolicy = StopPolicy(),
        options: LoopOptions = LoopOptions(),
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be an optimizer object (bitrain.build_optimizer(model, name, lr=...)), got {optimizer!r}"
            )
        self.placement, self.stop, self.options = placement, stop, options
        self.device = torch.device(placement.device)
        self.model = model.to(self.device)  # the unwrapped module: what checkpoints hold
        if placement.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dist = dist.get_info()
        self.net = dist.wrap_ddp(self.model, self.device, sync_bn=placement.sync_bn)  # what forward runs
        if placement.compile:
            self.net = torch.compile(self.net)
        self.optimizer, self.train_loader, self.val_loader = optimizer, train_loader, val_loader
        self.epochs, self.schedule = epochs, schedule
        self.loss = (loss if loss is not None else Loss()).to(self.device)
        self.saver = saver
        self.callbacks: list[Callback] = []
        self._callback_states: dict[str, Any] = {}  # a resumed payload's, for callbacks attached later
        self.amp_dtype = autocast_dtype(placement.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._weight_clips = has_weight_clips(self.model)  # layers with their own bound (larq's WeightClip)
        self.accum = Accumulation(options.accumulate, len(train_loader))
        self._micro = 0  # batches of the open accumulation window (0 between optimizer steps: checkpoints)
        self._window_backward = False  # whether a batch of the open window was backpropagated
        self.steps_per_epoch = stop.steps_per_epoch(train_loader, options.accumulate)
        self.micro_batch = train_loader.batch_size * self.dist.world_size  # samples per batch, all ranks
        self.global_batch = self.micro_batch * options.accumulate  # samples per optimizer step, all ranks
        epoch_samples = self.micro_batch * (self.accum.window_size(0) if stop.test_run else self.accum.batches)
        self.state = TrainState.at_epoch(options.start_epoch, self.steps_per_epoch, self.global_batch, epoch_samples)
        self.state.accumulate = options.accumulate
        self.ema = ModelEMA.from_options(self.model, options)  # None without options.model_ema
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
        info = dict(epochs=self.epochs, start_epoch=s.epoch, steps_per_epoch=self.steps_per_epoch)
        self._emit("on_fit_start", {**info, "global_batch": self.global_batch})
        if s.step == 0:
            self._emit("on_histograms", self.model, s.samples)
        note = None if self.options.clip_latent_weights else latent_weight_warning(self.model)
        if note:
            self._emit("on_message", note)
        if self.ema is not None and not self.ema.initialised:
            self.ema.reset(self.model)
        val: dict[str, float] = {}
        with self._signals:
            while s.epoch < self.epochs:
                lr = self._lr_at(s.epoch_first_step)  # a resumed epoch reports the lr it started with
                start = s.samples_before_epoch(self.micro_batch, self.accum.first_batch(s.batch))
                self._emit("on_epoch_start", s.epoch, lr, start)
                set_quantizer_epoch(self.model, s.epoch)  # scheduled quantizers: a function of the epoch
                train, epoch_time = self._train_epoch()
                val, val_ema = self.evaluate(), self.evaluate_ema()
                epoch = s.finish_epoch(epoch_time)
                self._emit("on_epoch_end", epoch, epoch_time, s.samples)
                self._emit("on_histograms", self.model, s.samples)
                self._log_row("train", epoch, train, epoch_time=epoch_time)
                self._log_row("val", epoch, val)
                self._log_row("val_ema", epoch, val_ema)
                chosen = val_ema if self.ema is not None and self.ema.eval_ema else val
                forced = self.stop.interrupts_after(epoch)
                self._save_epoch(epoch, chosen.get("acc1", float("nan")), forced=forced)
                if forced:
                    raise Interrupted(
                        f"[Epoch {epoch}] interrupting because --interrupt-at was set to {self.stop.interrupt_at}"
                    )
        self._emit("on_fit_end", {"best_acc": s.best_acc, "val": val})  # best_acc: of the chosen model
        return {"best_acc": s.best_acc, "val": val, "avg_epoch_time": self.average_epoch_time()}

    def _train_epoch(self) -> tuple[dict[str, float], float]:
        s, log_interval = self.state, self.options.log_interval
        t0 = time.perf_counter() - s.epoch_elapsed  # a resumed epoch keeps the time it already took
        if s.batch == 0:
            self.train_metrics.reset()
        self.train_loader.set_epoch(s.epoch, start=self.accum.first_batch(s.batch))
        self.net.train()
        t_log, samples_log = time.perf_counter(), 0
        if self.saver is not None:
            self.saver.restart_clock()
        with self._profiler() as prof:
            for x, y in self.train_loader:
                lr = self._set_lr(s.step)
                self.train_step(x, y)
                samples_log += self.micro_batch
                if self._micro:  # the accumulation window is still open
                    continue
                s.advance(self.micro_batch * self.accum.window_size(s.batch))
                self._emit("on_step", s.epoch, s.batch - 1, self.steps_per_epoch)
                if prof is not None:
                    prof.step()
                if log_interval and s.batch % log_interval == 0:
                    now = time.perf_counter()
                    self._log_batch(lr, samples_log / max(now - t_log, 1e-9))
                    t_log, samples_log = now, 0
                if self.stop.test_run and s.batch >= 1:
                    break
                if self.saver is not None and self.saver.mid_epoch_due(s.step):
                    s.epoch_elapsed = time.perf_counter() - t0
                    self._save_last()
                if self._stop_requested():
                    s.epoch_elapsed = time.perf_counter() - t0
                    self._save_last()
                    raise Interrupted(f"received {self._signals.received}: stopped at epoch {s.epoch} batch {s.batch}")
        self._check_finite()
        return self.train_metrics.compute(), time.perf_counter() - t0

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One batch: (zero_grad) -> forward (autocast) -> loss -> backward -> metrics, then at the last
        batch of an accumulation window (every batch without ``accumulate``) -> (clip) -> step -> EMA.
        The loss is scaled by 1/(window size); DDP all-reduces at the window's last batch only. No host sync."""
        s, k = self.state, self._micro
        size = self.accum.window_size(s.batch)
        last = k + 1 == size
        if k == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._window_backward = False
        self._micro = 0 if last else k + 1
        # the mix is a function of the micro-step: s.step without accumulation
        x, mix = self.loss.mix(x, y, s.epoch, s.step * self.accum.every + k, self.dist.rank)
        with no_sync(self.net, skip=not last):
            with self._autocast():
                logits = self.net(x)
                loss = self.loss(logits, y, x, mix)
            skip = self.stop.skip_nonfinite and not bool(torch.isfinite(loss))  # opt-in: one sync per step
            if not skip:
                self.scaler.scale(loss / size if size > 1 else loss).backward()
                self._window_backward = True
        if skip:
            s.nonfinite_skipped += 1
            what = "step" if size == 1 else "batch"
            self.message(f"step {s.step}: non-finite loss, {what} skipped ({s.nonfinite_skipped} so far)")
        if last and self._window_backward:
            self._optimizer_step()
        if skip:
            return loss.detach()
        loss = loss.detach()
        self.train_metrics.update(logits.detach(), y, loss.float() * y.shape[0])
        bad = torch.where(torch.isfinite(loss), math.inf, float(s.step))
        torch.minimum(self._first_bad, bad, out=self._first_bad)
        return loss

    def _optimizer_step(self) -> None:
        """(clip the gradient norm) -> step -> (clamp latent weights) -> EMA update."""
        clip_norm, clip_latent = self.options.clip_grad_norm, self.options.clip_latent_weights
        if clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if clip_latent or self._weight_clips:
            clip_latent_weights_(self.model, clip_latent)
        if self.ema is not None:
            self.ema.update(self.model, self.state.step)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Validation metrics of the current model (empty dict without a val loader)."""
        return self._validate(self.model)

    def evaluate_ema(self) -> dict[str, float]:
        """Validation metrics of the weights' EMA (empty without one); BatchNorm re-estimated as the model's."""
        return {} if self.ema is None else self._validate(self.ema.module)

    def _validate(self, model: nn.Module) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        if self.options.bn_recalibrate:
            self.recalibrate_bn(self.options.bn_recalibrate, model)
        self.val_loader.set_epoch(0)
        dist.sync_buffers(model)  # every rank validates the model rank 0 saves
        options = dict(device=self.device, amp_dtype=self.amp_dtype, metrics=self.val_metrics)
        return evaluate(model, self.val_loader, max_batches=1 if self.stop.test_run else None, **options)

    @property
    def final_model(self) -> nn.Module:
        """The model a run exports: the EMA when it is the chosen one (``model_ema_eval``), else the model."""
        return self.ema.module if self.ema is not None and self.ema.eval_ema else self.model

    def recalibrate_bn(self, batches: int, model: nn.Module | None = None) -> float:
        """Re-estimate the BatchNorm statistics of the current weights (of ``model``, default the trained
        one) over the first ``batches`` train batches of epoch 0's order (a fixed, deterministic set, so
        the validated, saved and resumed model agree); see :func:`recalibrate_bn`. Returns the seconds."""
        t0 = time.perf_counter()
        count = min(batches, 1 if self.stop.test_run else self.accum.batches)
        self.train_loader.set_epoch(0)
        with self._autocast():
            recalibrate_bn(model if model is not None else self.model, self.train_loader, count)
        seconds = time.perf_counter() - t0
        if not self._recalibration_reported:
            self._recalibration_reported = True
            self.message(
                f"BatchNorm statistics re-estimated over {count} train batches before validating ({seconds:.2f}s)"
            )
        return seconds

    # ------------------------------------------------------------------ state, callbacks, checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole resume point as a plain dict (weights_only-loadable); the saver adds its ``extra``."""
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "trainer": dataclasses.asdict(self.state),
            "train_metrics": self.train_metrics.state_dict(),
            "rng": {"ranks": dist.gather_rng_states()},
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
        }
        if self.ema is not None:
            self.ema.pack(payload)  # "model": the chosen weights (what readers load); see train/ema.py
        return payload

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Restore model, optimizer, scaler, loop position, partial-epoch metrics, RNG and the callbacks'
        state (of those attached now and of those attached later)."""
        self.model.load_state_dict(trained_weights(payload))
        if self.ema is not None:
            self.ema.load_state_dict(payload)
        self.optimizer.load_state_dict(payload["optimizer"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState.resumed(payload["trainer"], self.options.accumulate)
        if "train_metrics" in payload:
            self.train_metrics.load_state_dict(payload["train_metrics"])
        self._callback_states = dict(payload.get("callbacks", {}))
        self._load_callback_state(self.callbacks)
        per_rank = payload.get("rng", {}).get("ranks")
        if per_rank:
            dist.set_rng_state(per_rank[self.dist.rank % len(per_rank)])

    def attach(self, callbacks: Sequence[Callback]) -> None:
        """Add callbacks (kept on rank 0 only), e.g. once the run directory exists. After
        :meth:`load_state_dict`, before or after it, they continue a resumed run's output (CSV rows,
        TensorBoard steps)."""
        added = list(callbacks) if self.dist.is_main else []
        self.callbacks.extend(added)
        self._load_callback_state(added)

    def _load_callback_state(self, callbacks: Sequence[Callback]) -> None:
        for cb in callbacks:
            state = self._callback_states.get(type(cb).__name__)
            if state:
                cb.load_state_dict(state)

    def _save_last(self, also: Sequence[str] = ()) -> None:
        self._check_finite()
        if self.saver is not None:
            self.saver.save(self.state_dict(), list(also))  # state_dict is collective under DDP: every rank
        dist.barrier()

    def _save_epoch(self, epoch: int, acc1: float, forced: bool) -> None:
        s = self.state
        is_best = acc1 > s.best_acc  # strictly better (nan is never better)
        if is_best:
            s.best_acc = acc1
        also = self.saver.epoch_files(epoch, acc1, is_best, forced) if self.saver is not None else []
        # best/numbered are published before last.pt moves on: a crash in between re-does them on resume
        self._save_last(also)

    def _stop_requested(self) -> bool:
        # under DDP the ranks agree (one small all-reduce) every log interval, not every step, and at
        # the epoch's last batch, so an epoch shorter than the interval still stops
        batch = self.state.batch
        due = batch % (self.options.log_interval or 50) == 0 or batch >= self.steps_per_epoch
        return self._signals.poll(self.device, agree=self.dist.enabled, due=due)

    def _check_finite(self) -> None:
        bad = float(self._first_bad)
        if math.isfinite(bad):
            raise NonFiniteLoss(
                f"loss became non-finite at step {int(bad)} (epoch {self.state.epoch}); "
                "the last good checkpoint is kept; lower --lr, or use --skip-nonfinite"
            )

    # ------------------------------------------------------------------ small helpers
    def _lr_at(self, step: int) -> float:
        return self.schedule(step) if self.schedule is not None else self.optimizer.param_groups[0]["lr"]

    def _set_lr(self, step: int) -> float:
        lr = self._lr_at(step)
        if self.schedule is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _profiler(self):
        folder = self.options.profile_dir
        if folder is None or self.state.epoch != 0 or not self.dist.is_main:
            return contextlib.nullcontext()
        return first_steps_profiler(folder, self.steps_per_epoch, self.device.type)

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
        if m:
            lr = lr if lr is not None else self.optimizer.param_groups[0]["lr"]
            self._emit("on_row", self.state.row(split, epoch, m, lr, speed, batch, epoch_time))

    def average_epoch_time(self) -> float:
        """Mean epoch time leaving the first epoch out (it is usually slower), as BMXNet."""
        return self.state.average_epoch_time()

    def message(self, text: str) -> None:
        """A line for the console and the log file (rank 0)."""
        self._emit("on_message", text)

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(*args)
