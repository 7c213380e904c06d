"""``bitrain train``: BMXNet v2 flag names over the Python API.

``main`` is a page of named steps: resolve the config (``cli/resolve.py``) -> build the run (the
builders of ``cli/build.py`` turn config fields into the data, the model and the Trainer's parts) ->
restore a checkpoint -> open the run directory -> fit -> the exit code.
Exit codes: 0 done, 2 bad usage/config/data/checkpoint (one line, no traceback), 3 interrupted
with a resumable checkpoint, 1 anything else (non-finite loss included).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitrain.cli import config as C
from bitrain.cli.args import PROG
from bitrain.cli.build import (
    build_loaders,
    build_loop_options,
    build_loss,
    build_optim,
    build_placement,
    build_saver,
    build_schedule,
    build_stop,
    checkpoint_extra,
    load_teacher,
    model_args,
    select_device,
)
from bitrain.cli.loggers import check_loggers, end_run, make_loggers, run_files
from bitrain.cli.resolve import add_train_args, resolve_config
from bitrain.cli.rundir import default_run_dir, lock_run_dir, prepare_run_dir, save_final_weights
from bitrain.errors import UserError

if TYPE_CHECKING:
    import torch

    from bitrain.train.trainer import Trainer

# the names other commands and tests import from here
__all__ = ["main", "add_train_args", "resolve_config", "select_device", "model_args", "print_summary"]
__all__ += ["load_teacher", "init_weights_from"]


@dataclass
class Run:
    """What one rank's run is made of, before the Trainer."""

    cfg: C.TrainConfig
    device: torch.device
    dist_info: Any  # train.dist.DistInfo: rank, world_size, is_main
    train_loader: Any
    val_loader: Any
    info: Any  # data.DataInfo
    model_args: dict[str, Any]
    model: Any
    run_dir: Path


def main(argv: Sequence[str]) -> int:
    """``bitrain train``: train a model (BMXNet v2 options; bitrain train --help lists them)

    Returns the exit code.
    """
    from bitrain.cli.stages import plan_from_argv

    plan = plan_from_argv(argv)  # a --config with stages: runs them all, in one run directory
    if plan is not None:
        check_loggers(plan.stages[0].cfg)  # --logger mlflow/wandb installed, before anything runs
        gpus = C.parse_ints("gpus", plan.stages[0].cfg.gpus) if plan.stages[0].cfg.gpus else []
        if len(gpus) > 1 and "WORLD_SIZE" not in os.environ and not plan.stages[0].cfg.dry_run:
            from bitrain.cli.launch import launch_ranks

            return launch_ranks(list(argv), nproc=len(gpus))
        from bitrain.cli.stages_run import Steps
        from bitrain.cli.stages_run import main as run_stages

        return run_stages(plan, Steps(build_run, build_trainer, restore, print_summary))
    cfg, payload, ckpt_path = resolve_config(argv)  # flags, YAML, the resumed checkpoint's config
    check_loggers(cfg)  # --logger mlflow/wandb installed, before anything runs
    gpus = C.parse_ints("gpus", cfg.gpus) if cfg.gpus else []
    if len(gpus) > 1 and "WORLD_SIZE" not in os.environ:
        from bitrain.cli.launch import launch_ranks  # one process per GPU through torch.distributed.run

        return launch_ranks(list(argv), nproc=len(gpus))
    run = build_run(cfg)  # device, process group, data, model
    if cfg.dry_run or cfg.plot_network:
        print_summary(run.model, run.info, cfg.plot_network)
        if cfg.dry_run:
            return 0
    trainer = build_trainer(run)  # optimizer, schedule, loss, saver, placement, stop policy, options
    restore(run, trainer, payload, ckpt_path)  # before the run directory is touched
    run_lock = open_run_dir(run, payload, ckpt_path)  # locked, prepared, config.yaml written
    callbacks = attach_loggers(run, trainer)  # a resumed run's logs continue where its checkpoint left them
    announce(run, trainer, ckpt_path if payload is not None else None)
    return fit(run, trainer, callbacks, run_lock)  # the exit code


def build_run(cfg: C.TrainConfig) -> Run:
    """This rank's device and process group, the data and the model (seeded per rank)."""
    import torch

    from bitrain.models import build_model
    from bitrain.train import dist

    device = select_device(cfg)
    dist_info = dist.init_from_env(device.type, device=device)
    torch.manual_seed(cfg.seed + dist_info.rank)
    train_loader, val_loader, info = build_loaders(cfg, device, dist_info.rank, dist_info.world_size)
    margs = model_args(cfg, info)
    model = build_model(**margs)
    run_dir = Path(cfg.prefix) if cfg.prefix else default_run_dir(cfg.model, cfg.dataset)
    return Run(cfg, device, dist_info, train_loader, val_loader, info, margs, model, run_dir)


def build_trainer(run: Run) -> Trainer:
    """The optimizer, the teacher and the Trainer's parts, each from its builder."""
    from bitrain.train.trainer import Trainer

    cfg = run.cfg
    optimizer = build_optim(cfg, run.model)
    teacher = load_teacher(cfg.teacher, run.model_args) if cfg.teacher else None
    stop = build_stop(cfg)
    return Trainer(
        run.model,
        optimizer,
        run.train_loader,
        run.val_loader,
        epochs=cfg.epochs,
        schedule=build_schedule(cfg, stop.steps_per_epoch(run.train_loader, cfg.accumulate)),
        loss=build_loss(cfg, teacher),
        saver=build_saver(cfg, run.run_dir, checkpoint_extra(cfg, run.model_args, run.info)),
        placement=build_placement(cfg, run.device),
        stop=stop,
        options=build_loop_options(cfg, run.run_dir),
    )


def restore(run: Run, trainer: Trainer, payload: dict | None, ckpt_path: Path | None) -> None:
    """A resumed checkpoint into the trainer (a checkpoint of another model fails here, with one line),
    or ``--init-from``'s weights into a fresh run's model."""
    if payload is not None:
        try:
            trainer.load_state_dict(payload)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])[:400]
            raise UserError(f"checkpoint {ckpt_path} does not match this model/config: {detail}") from None
    elif run.cfg.init_from:  # a resumed run has its own weights in the checkpoint
        init_weights_from(run.model, run.cfg.init_from)


def open_run_dir(run: Run, payload: dict | None, ckpt_path: Path | None) -> Any:
    """Lock the run directory (rank 0; one run per --prefix), check a --resume auto checkpoint is still
    the newest, prepare the folder and write config.yaml; returns the lock (None on other ranks)."""
    from bitrain.train import checkpoint as ckpt
    from bitrain.train import dist

    cfg, run_dir = run.cfg, run.run_dir
    run_lock = lock_run_dir(run_dir) if run.dist_info.is_main else None  # before anything in it changes
    if run_lock is not None and cfg.resume == "auto":
        _check_still_newest(run_lock, run_dir, payload, ckpt_path)
    if run.dist_info.is_main:
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
    return run_lock


def attach_loggers(run: Run, trainer: Trainer) -> list:
    """Progress, console + log file and ``--logger``'s (metrics.csv and TensorBoard by default; MLflow,
    W&B) on rank 0, attached to the trainer."""
    cfg = run.cfg
    params = cfg.to_dict(include_run_control=False)  # what config.yaml holds
    callbacks = make_loggers(cfg, run.run_dir, params) if run.dist_info.is_main else []
    trainer.attach(callbacks)
    return callbacks


def announce(run: Run, trainer: Trainer, resumed_from: Path | None) -> None:
    """The run's first lines: where a resumed run continues, what trains on what."""
    cfg, info, s = run.cfg, run.info, trainer.state
    if resumed_from is not None:
        trainer.message(f"resumed from {resumed_from}: epoch {s.epoch}, batch {s.batch}, step {s.step}")
    trainer.message(
        f"bitrain: training {cfg.model} ({cfg.bits}-bit weights, {cfg.bits_a}-bit activations) on {info.name} "
        f"({info.num_train} train / {info.num_val} val) on {run.device}, world size {run.dist_info.world_size}; "
        f"run dir {run.run_dir}"
    )


def fit(run: Run, trainer: Trainer, callbacks: list, run_lock: Any) -> int:
    """``trainer.fit()``, the final weights and the last lines; returns the exit code. The loggers,
    the lock and the process group are closed whatever happens."""
    from bitrain.train import checkpoint as ckpt
    from bitrain.train import dist
    from bitrain.train.state import TrainerStop

    say, run_dir = trainer.message, run.run_dir
    interrupted, rc = False, 1
    try:
        result = trainer.fit()
        if run.dist_info.is_main:
            save_final_weights(trainer.final_model, run_dir / "model.safetensors", run.model_args)
            say(f"[Done] average epoch time (first epoch left out): {result['avg_epoch_time']:.3f}s")
            say(f"[Done] best validation top-1: {result['best_acc']:.4f}; run dir: {run_dir}")
        rc = 0
        return 0
    except TrainerStop as stop:
        say(str(stop))
        interrupted, rc = stop.exit_code == 3, stop.exit_code
        if interrupted:
            say(f"checkpoint saved; resume with: bitrain train --prefix {run_dir} --resume auto")
        else:
            print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_code
    except ckpt.CheckpointWriteError as e:  # disk full / read-only: one line, the previous checkpoint kept
        print(f"{PROG}: error: {e.strerror}", file=sys.stderr)
        return 1
    finally:
        end_run(callbacks, rc, run_files(run_dir, trainer.saver.folder if trainer.saver else run_dir / "checkpoints"))
        for cb in callbacks:
            cb.close()
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


def print_summary(model: Any, info: Any, plot_prefix: str | None) -> None:
    """The summary table (and, with a prefix, the network graph files) on stdout."""
    from bitrain.binary.summary import plot_network, summarize

    shape = (info.in_channels, info.image_size, info.image_size)
    print(summarize(model, shape).format())
    if plot_prefix:
        print(plot_network(model, shape, plot_prefix))


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
