"""Running a plan of stages (``bitrain/cli/stages.py``) in one run directory:

    RUN/config.yaml                  the stages (the command line folded in), so --resume auto finds them
    RUN/metrics.csv, RUN/tb/, log    continuous over the stages (a ``stage`` column; TensorBoard's step
                                     counts samples from the first stage's start)
    RUN/stages/NAME/checkpoints/     each stage's last.pt, best.pt (and numbered files)
    RUN/stages/NAME/model.safetensors  each stage's final model (the next stage starts from it)
    RUN/stages/finished.json         the finished stages, in order, with where the logs stood (atomic)
    RUN/model.safetensors            the last stage's final model

``--resume auto`` skips the finished stages and resumes the first unfinished one from its last.pt (or
starts it from the stage before's final model). Each stage seeds as a fresh run does, so a resumed run
ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bitrain.cli import config as C
from bitrain.cli.args import PROG
from bitrain.cli.loggers import end_run, make_loggers, run_files
from bitrain.cli.stages import Plan, Stage, format_plan
from bitrain.errors import UserError
from bitrain.files import atomic_write_bytes
from bitrain.train.callbacks import CSV_COLUMNS, CSVLogger
from bitrain.train.preempt import StopFlag
from bitrain.train.tracking import TrackingLogger


@dataclass(frozen=True)
class Steps:
    """``bitrain train``'s steps a stage runs through (passed in by ``cli/train.py``, which imports this module)."""

    build_run: Callable[[Any], Any]  # config -> Run (device, data, model)
    build_trainer: Callable[[Any], Any]  # Run -> Trainer
    restore: Callable[..., None]  # (run, trainer, payload, path): a checkpoint, or --init-from's weights
    print_summary: Callable[..., None]  # (model, info, plot_prefix)


STAGES_DIR = "stages"
MARKER = "finished.json"


class StageCSVLogger(CSVLogger):
    """``metrics.csv`` of a run in stages: a ``stage`` column, epochs and steps counted from the first
    stage's start (``samples`` is so already: each stage starts where the one before left it)."""

    COLUMNS = (*CSV_COLUMNS, "stage")

    def __init__(self, path: str | Path, stage: str, epoch_offset: int = 0, step_offset: int = 0) -> None:
        new = not Path(path).exists() or Path(path).stat().st_size == 0
        super().__init__(path)
        self.stage, self.epoch_offset, self.step_offset = stage, epoch_offset, step_offset
        self.writer.fieldnames = self.COLUMNS
        if new:  # the header with the stage column
            self.file.truncate(0)
            self.file.seek(0)
            self.writer.writeheader()
            self.file.flush()

    def on_row(self, row: dict[str, Any]) -> None:
        row = {**row, "stage": self.stage, "epoch": row["epoch"] + self.epoch_offset}
        row["step"] = row["step"] + self.step_offset
        self.writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in self.COLUMNS})
        self.file.flush()


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / STAGES_DIR / name


def read_finished(run_dir: Path) -> list[dict[str, Any]]:
    """The finished stages' records, in order ([] when none)."""
    path = run_dir / STAGES_DIR / MARKER
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))["finished"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({e}); rerun a stage with --stage NAME") from None


def write_finished(run_dir: Path, finished: list[dict[str, Any]]) -> None:
    path = run_dir / STAGES_DIR / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"finished": finished}, indent=1).encode())


def main(plan: Plan, steps: Steps) -> int:
    """Run ``plan`` (or list it under ``--dry-run``); returns the exit code."""
    last = plan.stages[-1].cfg
    if last.dry_run or last.plot_network:
        print(format_plan(plan))
        run = steps.build_run(last)
        steps.print_summary(run.model, run.info, last.plot_network)
        if last.dry_run:
            return 0
    from bitrain.cli.build import select_device
    from bitrain.cli.rundir import lock_run_dir
    from bitrain.train import dist

    device = select_device(plan.stages[0].cfg)
    main_rank = dist.init_from_env(device.type, device=device).is_main  # under torchrun: every rank runs this
    lock = lock_run_dir(plan.run_dir) if main_rank else None
    rc, callbacks = 1, []
    try:
        if main_rank:
            finished, first = _open_run_dir(plan)
        dist.barrier()
        if not main_rank:  # what rank 0 decided, from the files it wrote
            finished = read_finished(plan.run_dir)
            first = plan.names.index(plan.start) if plan.start is not None else len(finished)
        if main_rank and first == len(plan.stages):
            print(f"all {first} stages of {plan.run_dir} have finished; --stage NAME reruns one")
        callbacks = _make_loggers(plan) if main_rank else []  # one set for the stages this process runs
        with StopFlag() as between:  # SIGTERM & co. outside a stage's loop (its own flag takes them inside)
            for k in range(first, len(plan.stages)):
                rc = _run_stage(plan, k, finished, steps, main_rank, callbacks, continues=k == first, stop=between)
                if rc in (0, 3):  # the next stage reads this stage's model; interrupted ranks leave together
                    dist.barrier()
                if rc != 0:
                    return rc
        rc = 0
        return 0
    finally:
        last = stage_dir(plan.run_dir, plan.names[-1])
        end_run(callbacks, rc, run_files(plan.run_dir, last / "checkpoints"))
        for cb in callbacks:
            cb.close()
        if lock is not None:
            lock.close()
        dist.cleanup()


def _open_run_dir(plan: Plan) -> tuple[list[dict[str, Any]], int]:
    """Prepare the run directory for a fresh, resumed or ``--stage`` run; returns the finished stages'
    records and the index of the stage to run first."""
    from bitrain.cli.rundir import RUN_OUTPUTS, prepare_run_dir

    run_dir, cfg = plan.run_dir, plan.stages[0].cfg
    resuming = cfg.resume == "auto" or plan.start is not None
    saved = run_dir / "config.yaml"
    if resuming and saved.is_file() and "stages" not in (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}):
        raise UserError(
            f"--prefix {run_dir} holds a run without stages; continue it without a stages --config, "
            "or pass --overwrite (without --resume) to start over there"
        )
    finished = read_finished(run_dir) if resuming else []
    done = [r["name"] for r in finished]
    if done != plan.names[: len(done)]:
        raise UserError(
            f"--prefix {run_dir}: its finished stages ({', '.join(done)}) are not the first stages of "
            f"{plan.source} ({', '.join(plan.names)})"
        )
    first = len(done)
    if plan.start is not None:
        first = plan.names.index(plan.start)
        if first > len(done):
            raise UserError(
                f"--stage {plan.start}: stage {plan.names[first - 1]!r} before it has not finished in {run_dir}"
            )
        finished = finished[:first]
    kept = (stage_dir(run_dir, plan.names[0]) / "checkpoints" / "last.pt").is_file()
    fresh = first == 0 and (plan.start is not None or not kept)
    try:
        prepare_run_dir(run_dir, resuming=resuming, overwrite=cfg.overwrite, log_name=cfg.log)
        if fresh and resuming:  # nothing kept: the logs start over too
            for name in (*RUN_OUTPUTS, cfg.log):
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        redo = first if plan.start is not None else first + 1  # --stage reruns NAME; later ones are stale
        for name in plan.names[redo:]:
            shutil.rmtree(stage_dir(run_dir, name), ignore_errors=True)
        write_finished(run_dir, finished)
        text = yaml.safe_dump(plan.config_yaml(), sort_keys=False)
        atomic_write_bytes(run_dir / "config.yaml", text.encode())
    except OSError as e:
        raise UserError(f"--prefix {run_dir} is not writable: {e.strerror or e}") from None
    return finished, first


def _stage_config(plan: Plan, k: int) -> C.TrainConfig:
    """Stage k's config with its start (the stage before's final model) and teacher as files."""
    stage: Stage = plan.stages[k]
    changes: dict[str, Any] = {"prefix": str(plan.run_dir)}
    if k > 0:
        changes["init_from"] = str(stage_dir(plan.run_dir, plan.names[k - 1]) / "model.safetensors")
    if stage.teacher_stage is not None:
        changes["teacher"] = str(stage_dir(plan.run_dir, stage.teacher_stage) / "model.safetensors")
    return stage.cfg.with_(**changes)


def _run_stage(
    plan: Plan,
    k: int,
    finished: list[dict[str, Any]],
    steps: Steps,
    main_rank: bool,
    callbacks: list,
    continues: bool,
    stop: StopFlag,
) -> int:
    """Build, restore or start, train and record stage k; returns its exit code. ``continues``: the first
    stage this process runs (its loggers continue the files where the stage's checkpoint, or the stage
    before's record, left them)."""
    from bitrain.train import checkpoint as ckpt

    name, n = plan.names[k], len(plan.stages)
    cfg = _stage_config(plan, k)
    folder = stage_dir(plan.run_dir, name)
    run = dataclasses.replace(steps.build_run(cfg), run_dir=folder)  # the saver writes into RUN/stages/NAME
    trainer = steps.build_trainer(run)
    found = ckpt.find_resumable(folder / "checkpoints")
    payload, path = (found[1], found[0]) if found is not None else (None, None)
    steps.restore(run, trainer, payload, path)  # the stage's own checkpoint, else the stage before's weights
    before = finished[-1] if finished else {"epochs": 0, "steps": 0, "samples": 0, "callbacks": {}}
    if payload is None:
        trainer.state.samples = before["samples"]  # TensorBoard's axis goes on from the stage before
    if main_rank:
        ckpt.clean_stale_temp_files(folder / "checkpoints")
    for cb in callbacks:
        if isinstance(cb, StageCSVLogger):
            cb.stage, cb.epoch_offset, cb.step_offset = name, before["epochs"], before["steps"]
        if isinstance(cb, TrackingLogger):  # one tracker run for all the stages; a stage tag, its epochs go on
            cb.set_stage(name, k, before["epochs"])
        state = before["callbacks"].get(type(cb).__name__)
        if continues and payload is None and state:  # cut what a killed run logged after the stage before
            cb.load_state_dict(state)
    trainer.attach(callbacks)  # a resumed stage's loggers continue from its checkpoint
    c = run.cfg
    teacher = f", teacher {plan.stages[k].teacher_stage or c.teacher}" if c.teacher else ""
    start = f"from {plan.names[k - 1]}" if k > 0 else ("from " + c.init_from if c.init_from else "from scratch")
    trainer.message(
        f"[Stage {k + 1}/{n} {name}] {c.bits}-bit weights, {c.bits_a}-bit activations, {c.epochs} epochs, "
        f"{start}{teacher}; {n - k - 1} stage(s) after it"
    )
    if payload is not None:
        s = trainer.state
        trainer.message(f"[Stage {k + 1}/{n} {name}] resumed from {path}: epoch {s.epoch}, batch {s.batch}")
    if stop.received is not None:  # a signal between two stages: stop before this one trains
        trainer.message(f"received {stop.received} between stages: stopped before stage {k + 1}/{n} {name}")
        trainer.message(f"nothing lost; resume with: bitrain train --prefix {plan.run_dir} --resume auto")
        return 3
    rc = _fit(plan, k, run, trainer, main_rank)
    if rc == 0:  # after the stage's model: a kill in between redoes only the (finished) fit
        finished.append(_record(name, trainer, before, callbacks))
        if main_rank:
            write_finished(plan.run_dir, finished)
    return rc


def _make_loggers(plan: Plan) -> list:
    """Progress, console + log, and ``--logger``'s (metrics.csv with the stage column, TensorBoard, MLflow,
    W&B), for all the stages this process runs: one TensorBoard writer, one tracker run."""
    cfg = plan.stages[0].cfg
    return make_loggers(cfg, plan.run_dir, _params(plan), lambda path: StageCSVLogger(path, plan.names[0]))


def _params(plan: Plan) -> dict[str, Any]:
    """The trackers' parameters: the first stage's config, ``stages`` (their names), and each later
    stage's changes as ``NAME.option``."""
    first = plan.stages[0].cfg.to_dict(include_run_control=False)
    params: dict[str, Any] = {**first, "stages": ",".join(plan.names)}
    for stage in plan.stages[1:]:
        own = stage.cfg.to_dict(include_run_control=False)
        params.update({f"{stage.name}.{k}": v for k, v in own.items() if v != first.get(k)})
    return params


def _record(name: str, trainer: Any, before: dict[str, Any], callbacks: list) -> dict[str, Any]:
    """A finished stage: where the logs stand at its end (the next stage continues from there)."""
    s = trainer.state
    return {
        "name": name,
        "epochs": before["epochs"] + s.epoch,
        "steps": before["steps"] + s.step,
        "samples": s.samples,
        "best_acc": s.best_acc,
        "callbacks": {type(cb).__name__: cb.state_dict() for cb in callbacks if cb.state_dict()},
    }


def _fit(plan: Plan, k: int, run: Any, trainer: Any, main_rank: bool) -> int:
    """``trainer.fit()``, the stage's final model (and the run's, after the last stage); the exit code."""
    from bitrain.cli.rundir import save_final_weights
    from bitrain.train import checkpoint as ckpt
    from bitrain.train.state import TrainerStop

    say, name, last = trainer.message, plan.names[k], k == len(plan.stages) - 1
    try:
        result = trainer.fit()
        if not main_rank:
            return 0
        save_final_weights(run.model, stage_dir(plan.run_dir, name) / "model.safetensors", run.model_args)
        say(f"[Stage {k + 1}/{len(plan.stages)} {name}] done: best validation top-1 {result['best_acc']:.4f}")
        if last:
            save_final_weights(run.model, plan.run_dir / "model.safetensors", run.model_args)
            say(f"[Done] {len(plan.stages)} stages; best validation top-1 of the last: {result['best_acc']:.4f}")
            say(f"[Done] run dir: {plan.run_dir}")
        return 0
    except TrainerStop as stop:
        say(str(stop))
        if stop.exit_code == 3:
            say(f"checkpoint saved; resume with: bitrain train --prefix {plan.run_dir} --resume auto")
        elif main_rank:
            print(f"{PROG}: {stop}", file=sys.stderr)
        return stop.exit_code
    except ckpt.CheckpointWriteError as e:
        print(f"{PROG}: error: {e.strerror}", file=sys.stderr)
        return 1
