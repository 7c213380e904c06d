"""The config becomes the run's objects here, one small builder per part: flat config fields in, one
object out (torchtune's rule: config stops at the edge). The only module that maps config fields to
``build_data``, ``build_model``, ``build_optimizer``, ``make_schedule`` and the Trainer's parts."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitrain.cli import config as C
from bitrain.cli.config import TrainConfig
from bitrain.data.sets import DATA_SETS
from bitrain.errors import UserError
from bitrain.names import ARCH_OPTIONS

if TYPE_CHECKING:
    import torch

    from bitrain.train.loss import Loss
    from bitrain.train.options import LoopOptions, Placement, StopPolicy
    from bitrain.train.saver import CheckpointSaver


def select_device(cfg: TrainConfig) -> torch.device:
    """``--cpu`` / ``--gpus``: rank LOCAL_RANK's device (torchrun sets it; 0 in a single process)."""
    import torch

    if cfg.cpu:
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.gpus:
        ids = C.parse_ints("gpus", cfg.gpus)
        if not ids:
            raise UserError(f"--gpus must be GPU ids such as 0 or 0,1, got {cfg.gpus!r}")
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {cfg.gpus}: no CUDA device is available (use --cpu)")
        if max(ids) >= torch.cuda.device_count():
            raise UserError(f"--gpus {cfg.gpus}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", ids[local_rank % len(ids)])
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def build_loaders(cfg: TrainConfig, device: torch.device, rank: int, world_size: int) -> tuple[Any, Any, Any]:
    """(train loader, val loader, DataInfo) of ``--dataset`` for this rank."""
    from bitrain.data import build_data

    return build_data(
        cfg.dataset,
        data_dir=cfg.data_dir,
        batch_size=cfg.batch_size,
        device=device,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        augmentation=cfg.augmentation,
        channels_last=cfg.channels_last,
        dummy_shape=tuple(C.parse_ints("dummy_shape", cfg.dummy_shape)),
        dummy_classes=cfg.dummy_classes,
        dummy_size=cfg.dummy_size,
        **({"image_size": cfg.image_size} if DATA_SETS[cfg.dataset].folder else {}),
    )


def model_args(cfg: TrainConfig, info: Any) -> dict[str, Any]:
    """Exactly the keyword arguments of ``build_model`` (stored in checkpoints and exports)."""
    arch = {k: getattr(cfg, k) for k in ARCH_OPTIONS}
    return {
        "name": cfg.model,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "image_size": info.image_size,
        "bits": cfg.bits,
        "bits_a": cfg.bits_a,
        "activation_method": cfg.activation_method,
        "weight_quantization": cfg.weight_quantization,
        "clip_threshold": cfg.clip_threshold,
        "approximation": cfg.approximation,
        "initial_layers": cfg.initial_layers,
        "initialization": cfg.initialization,
        **{k: v for k, v in arch.items() if v not in (None, False)},
    }


def build_optim(cfg: TrainConfig, model: Any) -> torch.optim.Optimizer:
    """``--optimizer`` with its options, BMXNet's no-decay groups."""
    from bitrain.train.optim import build_optimizer

    return build_optimizer(
        model,
        cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        wd=cfg.wd,
        bop_threshold=cfg.bop_threshold,
        bop_gamma=cfg.bop_gamma,
    )


def build_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """``--lr-mode`` and its options as ``step -> lr`` for ``steps_per_epoch``."""
    from bitrain.train.schedules import make_schedule

    return make_schedule(
        lr=cfg.lr,
        mode=cfg.lr_mode,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        lr_steps=C.parse_floats("lr_steps", cfg.lr_steps),
        lr_factor=cfg.lr_factor,
    )


def build_loss(cfg: TrainConfig, teacher: Any = None) -> Loss:
    """Label smoothing, ``--mixup``, ``--cutmix`` and distillation from ``teacher`` (loaded from ``--teacher``)."""
    from bitrain.train.loss import Loss

    return Loss(
        label_smoothing=cfg.label_smoothing,
        mixup_alpha=cfg.mixup_alpha if cfg.mixup else None,
        mixup_off_epoch=cfg.mixup_off_epoch,
        cutmix_alpha=cfg.cutmix,
        mixup_switch_prob=cfg.mixup_switch_prob,
        seed=cfg.seed,
        teacher=teacher,
        distill_alpha=cfg.distill_alpha,
        distill_temperature=cfg.distill_temperature,
    )


def build_saver(cfg: TrainConfig, run_dir: Path, extra: dict[str, Any]) -> CheckpointSaver:
    """``run_dir/checkpoints`` with the numbered / mid-epoch policy of the config; ``extra`` in every file."""
    from bitrain.train.saver import CheckpointSaver

    return CheckpointSaver(
        run_dir / "checkpoints",
        name=f"{cfg.model}_{cfg.bits}bit",
        save_frequency=cfg.save_frequency or 0,
        checkpoint_interval=cfg.checkpoint_interval,
        checkpoint_minutes=cfg.checkpoint_minutes,
        extra=extra,
    )


def checkpoint_extra(cfg: TrainConfig, margs: dict[str, Any], info: Any) -> dict[str, Any]:
    """What every checkpoint carries besides the resume point: the config, the model's and the data's description."""
    return {
        "config": cfg.to_dict(include_run_control=False),
        "model_args": margs,
        "data": {
            "dataset": info.name,
            "mean": list(info.mean),
            "std": list(info.std),
            "image_size": info.image_size,
            "num_classes": info.num_classes,
        },
    }


def build_placement(cfg: TrainConfig, device: torch.device) -> Placement:
    """Device, ``--dtype``, ``--compile`` (or BMXNet's ``--mode hybrid``), ``--channels-last``, ``--sync-bn``."""
    from bitrain.train.options import Placement

    return Placement(
        device=device,
        dtype=cfg.dtype,
        compile=cfg.compile or cfg.mode != "imperative",
        channels_last=cfg.channels_last,
        sync_bn=cfg.sync_bn,
    )


def build_stop(cfg: TrainConfig) -> StopPolicy:
    """``--interrupt-at``, ``--test-run``, ``--skip-nonfinite``."""
    from bitrain.train.options import StopPolicy

    return StopPolicy(interrupt_at=cfg.interrupt_at, test_run=cfg.test_run, skip_nonfinite=cfg.skip_nonfinite)


def build_loop_options(cfg: TrainConfig, run_dir: Path) -> LoopOptions:
    """``--log-interval``, ``--bn-recalibrate``, the clips, ``--start-epoch``, ``--profile`` (into
    ``run_dir/profile``), ``--accumulate``, ``--model-ema`` and its options."""
    from bitrain.train.options import LoopOptions

    return LoopOptions(
        log_interval=cfg.log_interval,
        bn_recalibrate=cfg.bn_recalibrate,
        clip_grad_norm=cfg.clip_grad_norm,
        clip_latent_weights=cfg.clip_latent_weights,
        start_epoch=cfg.start_epoch,
        profile_dir=run_dir / "profile" if cfg.profile else None,
        accumulate=cfg.accumulate,
        model_ema=cfg.model_ema,
        model_ema_warmup=cfg.model_ema_warmup,
        model_ema_eval=cfg.model_ema_eval,
    )


def load_teacher(path: str, student_args: dict[str, Any]) -> Any:
    """The ``--teacher`` model (any file bitrain writes, or a run directory), checked against the student."""
    from bitrain.cli.reader import load_model

    loaded = load_model(path)
    for key in ("num_classes", "in_channels"):
        if loaded.model_args.get(key) != student_args.get(key):
            raise UserError(
                f"--teacher {path}: built for {key}={loaded.model_args.get(key)}, the student has "
                f"{key}={student_args.get(key)}"
            )
    return loaded.model
