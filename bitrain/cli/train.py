"""``bitrain train``: BMXNet v2 flag names over the Python API.

The only command that reads the configuration: it turns it into flat keyword arguments for
``build_data``, ``build_model``, ``build_optimizer``, ``make_schedule`` and ``Trainer``.
Exit codes: 0 done, 2 bad usage/config/data/checkpoint (one line, no traceback), 3 interrupted
with a resumable checkpoint, 1 anything else (non-finite loss included).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitrain import console
from bitrain.cli import config as C
from bitrain.cli.args import PROG, ArgParser
from bitrain.cli.rundir import default_run_dir, lock_run_dir, prepare_run_dir, save_final_weights
from bitrain.data.sets import DATA_SETS
from bitrain.errors import UserError
from bitrain.names import ARCH_OPTIONS

if TYPE_CHECKING:
    import torch


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; only flags actually given land in the namespace."""
    p.add_argument("--config", help="YAML file of option: value (flags given here override it)")
    for name, f in C.FIELDS.items():
        meta = f.metadata
        flags = (C.flag(name),) + tuple(meta["flags"])
        typ, _ = C._base_type(f.type)
        kw: dict[str, Any] = {"dest": name, "help": meta["help"]}
        if typ is bool:
            kw["action"] = "store_true"
        else:
            kw["metavar"] = name.upper()
            if meta["nargs"]:
                kw.update(nargs=meta["nargs"], const=meta["const"])
        p.add_argument(*flags, **kw)


def _explicit(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in C.FIELDS}


SCHEDULE_OPTIONS = ("lr", "lr_mode", "warmup_epochs", "warmup_lr", "lr_steps", "lr_factor")


def resolve_config(argv: Sequence[str]) -> tuple[C.TrainConfig, dict | None, Path | None]:
    """argv -> (config, resumed checkpoint payload or None, its path). Precedence: defaults <
    data-set defaults < resumed checkpoint's config < --config YAML < explicit flags."""
    p = ArgParser(
        prog=f"{PROG} train",
        argument_default=argparse.SUPPRESS,
        description="Train an image classifier (BMXNet v2 options).",
    )
    add_train_args(p)
    ns = p.parse_args(list(argv))
    flags = _explicit(ns)
    yaml_layer = C.load_yaml(ns.config) if getattr(ns, "config", None) else {}
    run_layer = {**yaml_layer, **flags}
    payload, ckpt_path = None, None
    resume = run_layer.get("resume")
    if resume:
        payload, ckpt_path, prefix = _find_resume(str(resume), run_layer.get("prefix"))
        if prefix is not None:
            run_layer.setdefault("prefix", str(prefix))
    ckpt_layer = C.check_keys(payload.get("config", {}), "the checkpoint's config") if payload else {}
    dataset = run_layer.get("dataset", ckpt_layer.get("dataset", "digits"))
    ds_layer = dict(DATA_SETS[dataset].defaults) if dataset in DATA_SETS else {}
    if any(k in run_layer for k in SCHEDULE_OPTIONS):  # who sets the schedule gets BMXNet's defaults for the rest
        for k in SCHEDULE_OPTIONS:
            ds_layer.pop(k, None)
    if "model" in run_layer or "model" in ckpt_layer:  # the default model's architecture options are its own
        for k in ARCH_OPTIONS:
            ds_layer.pop(k, None)
    cfg = C.from_layers(ds_layer, ckpt_layer, run_layer)
    if cfg.resume_states:
        warnings.warn("--resume-states is ignored: a bitrain checkpoint restores the optimizer itself", stacklevel=2)
    return cfg, payload, ckpt_path


def _find_resume(resume: str, prefix: str | None) -> tuple[dict | None, Path | None, Path | None]:
    from bitrain.train import checkpoint as ckpt

    if resume == "auto":
        if not prefix:
            raise UserError("--resume auto needs --prefix (the run directory to continue)")
        found = ckpt.find_resumable(Path(prefix) / "checkpoints")
        if found is None:
            print(f"--resume auto: nothing to resume in {prefix}; starting fresh", file=sys.stderr)
            return None, None, None
        return found[1], found[0], None
    path = Path(resume)
    payload = ckpt.load_checkpoint(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return payload, path, (None if prefix else run_dir)


def select_device(cfg: C.TrainConfig) -> torch.device:
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


def model_args(cfg: C.TrainConfig, info: Any) -> dict[str, Any]:
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


def main(argv: Sequence[str]) -> int:
    """``bitrain train``: train a model (BMXNet v2 options; bitrain train --help lists them)

    Returns the exit code.
    """
    cfg, payload, ckpt_path = resolve_config(argv)
    import torch

    from bitrain.data import build_data
    from bitrain.models import build_model
    from bitrain.train import checkpoint as ckpt
    from bitrain.train import dist
    from bitrain.train.callbacks import ConsoleLogger, CSVLogger, ProgressETA, TensorBoardLogger
    from bitrain.train.optim import build_optimizer
    from bitrain.train.trainer import Trainer, TrainerStop

    if cfg.gpus and len(C.parse_ints("gpus", cfg.gpus)) > 1 and "WORLD_SIZE" not in os.environ:
        from bitrain.cli.launch import launch_ranks  # one process per GPU through torch.distributed.run

        return launch_ranks(list(argv), nproc=len(C.parse_ints("gpus", cfg.gpus)))
    device = select_device(cfg)
    info_d = dist.init_from_env(device.type, device=device)
    torch.manual_seed(cfg.seed + info_d.rank)
    train_loader, val_loader, info = build_data(
        cfg.dataset,
        data_dir=cfg.data_dir,
        batch_size=cfg.batch_size,
        device=device,
        seed=cfg.seed,
        rank=info_d.rank,
        world_size=info_d.world_size,
        num_workers=cfg.num_workers,
        augmentation=cfg.augmentation,
        channels_last=cfg.channels_last,
        dummy_shape=tuple(C.parse_ints("dummy_shape", cfg.dummy_shape)),
        dummy_classes=cfg.dummy_classes,
        dummy_size=cfg.dummy_size,
        **({"image_size": cfg.image_size} if DATA_SETS[cfg.dataset].folder else {}),
    )
    margs = model_args(cfg, info)
    model = build_model(**margs)
    if cfg.dry_run or cfg.plot_network:
        print_summary(model, info, cfg.plot_network)
        if cfg.dry_run:
            return 0

    run_dir = Path(cfg.prefix) if cfg.prefix else default_run_dir(cfg.model, cfg.dataset)
    optimizer = build_optimizer(
        model,
        cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        wd=cfg.wd,
        bop_threshold=cfg.bop_threshold,
        bop_gamma=cfg.bop_gamma,
    )
    trainer = Trainer(
        model,
        optimizer,
        train_loader,
        val_loader,
        epochs=cfg.epochs,
        lr=cfg.lr,
        lr_mode=cfg.lr_mode,
        lr_factor=cfg.lr_factor,
        lr_steps=C.parse_floats("lr_steps", cfg.lr_steps),
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        run_dir=run_dir,
        device=device,
        dtype=cfg.dtype,
        compile=cfg.compile or cfg.mode != "imperative",
        channels_last=cfg.channels_last,
        sync_bn=cfg.sync_bn,
        label_smoothing=cfg.label_smoothing,
        mixup_alpha=cfg.mixup_alpha if cfg.mixup else 0.0,
        mixup_off_epoch=cfg.mixup_off_epoch,
        clip_grad_norm=cfg.clip_grad_norm,
        clip_latent_weights=cfg.clip_latent_weights,
        bn_recalibrate=cfg.bn_recalibrate,
        log_interval=cfg.log_interval,
        teacher=load_teacher(cfg.teacher, margs) if cfg.teacher else None,
        distill_temperature=cfg.distill_temperature,
        distill_alpha=cfg.distill_alpha,
        save_frequency=cfg.save_frequency,
        checkpoint_interval=cfg.checkpoint_interval,
        checkpoint_minutes=cfg.checkpoint_minutes,
        interrupt_at=cfg.interrupt_at,
        test_run=cfg.test_run,
        skip_nonfinite=cfg.skip_nonfinite,
        seed=cfg.seed,
        start_epoch=cfg.start_epoch,
        profile=cfg.profile,
        checkpoint_name=f"{cfg.model}_{cfg.bits}bit",
        checkpoint_extra={
            "config": cfg.to_dict(include_run_control=False),
            "model_args": margs,
            "data": {
                "dataset": info.name,
                "mean": list(info.mean),
                "std": list(info.std),
                "image_size": info.image_size,
                "num_classes": info.num_classes,
            },
        },
    )
    if payload is not None:  # applied once; a checkpoint of another model fails here, before the run dir is touched
        _load_or_explain(trainer, payload, ckpt_path)
    elif cfg.init_from:  # a fresh run from other weights (a resumed one has its own in the checkpoint)
        init_weights_from(model, cfg.init_from)
    run_lock = lock_run_dir(run_dir) if info_d.is_main else None  # one run per --prefix, before anything in it changes
    if run_lock is not None and cfg.resume == "auto":
        _check_still_newest(run_lock, run_dir, payload, ckpt_path)
    if info_d.is_main:
        try:  # --resume with nothing to resume yet (e.g. killed before the first checkpoint) starts fresh there
            prepare_run_dir(
                run_dir,
                resuming=payload is not None or cfg.resume is not None,
                overwrite=cfg.overwrite,
                log_name=cfg.log,
            )
            ckpt.clean_stale_temp_files(run_dir / "checkpoints")
            C.dump_yaml(cfg, run_dir / "config.yaml")
        except OSError as e:
            raise UserError(f"--prefix {run_dir} is not writable: {e.strerror or e}") from None
    dist.barrier()

    callbacks: list = []
    if info_d.is_main:
        live = console.live()
        progress = ProgressETA(cfg.progress, live=live)
        tb_dir = Path(cfg.write_summary) if cfg.write_summary else run_dir / "tb"
        callbacks = [
            progress,
            ConsoleLogger(run_dir / cfg.log, console=progress.console),
            CSVLogger(run_dir / "metrics.csv"),
            TensorBoardLogger(tb_dir, histograms=cfg.write_summary is not None),
        ]
    trainer.attach(callbacks, payload)  # a resumed run's logs continue where its checkpoint left them
    say = trainer.message
    if payload is not None:
        s = trainer.state
        say(f"resumed from {ckpt_path}: epoch {s.epoch}, batch {s.batch}, step {s.step}")
    say(
        f"bitrain: training {cfg.model} ({cfg.bits}-bit weights, {cfg.bits_a}-bit activations) on {info.name} "
        f"({info.num_train} train / {info.num_val} val) on {device}, world size {info_d.world_size}; run dir {run_dir}"
    )
    interrupted = False
    try:
        result = trainer.fit()
        if info_d.is_main:
            save_final_weights(model, run_dir / "model.safetensors", margs)
            say(f"[Done] average epoch time (first epoch left out): {result['avg_epoch_time']:.3f}s")
            say(f"[Done] best validation top-1: {result['best_acc']:.4f}; run dir: {run_dir}")
        return 0
    except TrainerStop as stop:
        say(str(stop))
        interrupted = stop.exit_code == 3
        if interrupted:
            say(f"checkpoint saved; resume with: bitrain train --prefix {run_dir} --resume auto")
        else:
            print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_code
    except ckpt.CheckpointWriteError as e:  # disk full / read-only: one line, the previous checkpoint kept
        print(f"{PROG}: error: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        _close(callbacks)
        if run_lock is not None:
            run_lock.close()
        if interrupted:  # ranks leave together: torchrun stops the others when the first exits non-zero
            dist.barrier()
        dist.cleanup()


def _check_still_newest(run_lock: Any, run_dir: Path, payload: dict | None, ckpt_path: Path | None) -> None:
    """--resume auto read its checkpoint before it held the lock: a run that ended in between may have
    written a newer one. Refuse to go on from a stale one (nothing is lost: run the command again)."""
    from bitrain.train import checkpoint as ckpt

    found = ckpt.find_resumable(run_dir / "checkpoints")
    now = None if found is None else (found[0], found[1].get("trainer", {}).get("step"))
    then = None if payload is None else (ckpt_path, payload.get("trainer", {}).get("step"))
    if now == then:
        return
    run_lock.close()
    raise UserError(
        f"--resume auto: the checkpoints in {run_dir} changed while this run started (another run there "
        "just ended); run the same command again to continue from the newest"
    )


def _load_or_explain(trainer: Any, payload: dict, path: Path | None) -> None:
    try:
        trainer.load_state_dict(payload)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:400]
        raise UserError(f"checkpoint {path} does not match this model/config: {detail}") from None


def _close(callbacks: list) -> None:
    for cb in callbacks:
        cb.close()


def print_summary(model: Any, info: Any, plot_prefix: str | None) -> None:
    """The summary table (and, with a prefix, the network graph files) on stdout."""
    from bitrain.binary.summary import plot_network, summarize

    shape = (info.in_channels, info.image_size, info.image_size)
    print(summarize(model, shape).format())
    if plot_prefix:
        print(plot_network(model, shape, plot_prefix))


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


def init_weights_from(model: Any, path: str) -> None:
    """``--init-from``: the weights of another run into ``model`` (same names and shapes; other hyper-parameters,
    e.g. bits, may differ: step 2 of Real-to-Binary / Bi-Real training starts from step 1's weights)."""
    from bitrain.cli.reader import read_state_dict

    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"--init-from {path}: its weights do not fit the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}{'...' if len(missing) + len(unexpected) > 6 else ''})"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise UserError(f"--init-from {path}: shapes differ ({'; '.join(wrong[:3])})")
    model.load_state_dict(state)
