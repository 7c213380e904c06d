"""The Trainer's small option groups, each a frozen dataclass: where and how it runs (``Placement``),
when it stops early (``StopPolicy``) and the remaining loop settings (``LoopOptions``). Range checks
of the options a caller could get wrong in both the API and the CLI live here, once; the CLI builds
these groups from its config, an API user directly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitrain.errors import UserError

PROFILE_STEPS = 5  # steps of the first epoch that ``LoopOptions.profile_dir`` traces


@dataclass(frozen=True)
class Placement:
    """Device and precision: ``dtype`` float32 (None), bfloat16 or float16 runs the forward under
    autocast (float16 adds a grad scaler); ``compile`` wraps the model in ``torch.compile``;
    ``channels_last`` memory format; ``sync_bn`` BatchNorm statistics over all ranks under DDP."""

    device: Any = "cpu"  # a torch.device or its name
    dtype: Any = None  # a name (bitrain.names.DTYPES), a torch dtype, or None
    compile: bool = False
    channels_last: bool = False
    sync_bn: bool = False


@dataclass(frozen=True)
class StopPolicy:
    """Ways a run ends other than after ``epochs``: ``interrupt_at`` N saves after validating epoch
    N-1 and raises ``Interrupted`` (exit 3); ``test_run`` trains and validates one batch per epoch;
    ``skip_nonfinite`` skips a step whose loss is NaN/inf (one host sync per step) instead of raising
    ``NonFiniteLoss``. SIGTERM/SIGUSR1/Ctrl-C always stop at the next step with a checkpoint."""

    interrupt_at: int | None = None
    test_run: bool = False
    skip_nonfinite: bool = False

    def steps_per_epoch(self, train_loader: Any, accumulate: int = 1) -> int:
        """Optimizer steps per epoch (the schedule's unit too): the loader's batches, or its windows of
        ``accumulate`` batches (a shorter last one steps too); 1 in a test run."""
        return 1 if self.test_run else -(-len(train_loader) // max(1, accumulate))

    def interrupts_after(self, epoch: int) -> bool:
        """Whether the run stops after validating ``epoch`` (0-based)."""
        return self.interrupt_at is not None and epoch + 1 == self.interrupt_at


@dataclass(frozen=True)
class LoopOptions:
    """The rest of the loop: a log row every ``log_interval`` batches (0: none); BatchNorm statistics
    re-estimated over ``bn_recalibrate`` train batches before each validation (0: running averages);
    ``clip_grad_norm`` (None: off); ``clip_latent_weights`` v clamps binary layers' latent weights to
    [-v, v] after each step (layers with their own bound are clamped anyway); ``start_epoch`` of a
    fresh run; ``profile_dir``: a torch.profiler trace of the first steps (None: off); ``accumulate``
    micro-batches per optimizer step (:mod:`bitrain.train.accumulate`); ``model_ema`` DECAY keeps an EMA
    of the weights, validated beside them (``model_ema_warmup``: timm's warmup of the decay;
    ``model_ema_eval``: the EMA picks ``best.pt`` and is exported; :mod:`bitrain.train.ema`)."""

    log_interval: int = 50
    bn_recalibrate: int = 0
    clip_grad_norm: float | None = None
    clip_latent_weights: float | None = None
    start_epoch: int = 0
    profile_dir: str | Path | None = None
    accumulate: int = 1
    model_ema: float | None = None
    model_ema_warmup: bool = False
    model_ema_eval: bool = False

    def __post_init__(self) -> None:
        if self.bn_recalibrate < 0:
            raise UserError(f"--bn-recalibrate must be >= 0, got {self.bn_recalibrate}")
        if self.accumulate < 1:
            raise UserError(f"--accumulate must be >= 1, got {self.accumulate}")
        if self.model_ema is not None and not 0 < self.model_ema < 1:
            raise UserError(f"--model-ema must be in (0, 1), got {self.model_ema}")
        if self.model_ema is None and (self.model_ema_warmup or self.model_ema_eval):
            raise UserError("--model-ema-warmup and --model-ema-eval need --model-ema DECAY")


def first_steps_profiler(folder: str | Path, steps_per_epoch: int, device_type: str) -> Any:
    """A torch.profiler over the first ``PROFILE_STEPS`` steps, written to ``folder`` (TensorBoard's format)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    # skip the first (slow) step and warm up on the second when the epoch is long enough
    skip = 1 if steps_per_epoch >= PROFILE_STEPS + 2 else 0
    active = max(1, min(PROFILE_STEPS, steps_per_epoch - 2 * skip))
    return profile(
        activities=acts,
        schedule=schedule(wait=skip, warmup=skip, active=active),
        on_trace_ready=tensorboard_trace_handler(str(folder)),
    )
