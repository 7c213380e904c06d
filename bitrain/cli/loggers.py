"""``--logger``: the loggers a run writes to (made on rank 0, for ``bitrain train`` and for a run in
stages alike), and the check, before anything runs, that the trackers asked for are installed.

Default ``tensorboard,csv``: ``metrics.csv`` and ``RUN/tb``. ``mlflow`` and ``wandb`` are optional
extras (``bitrain/train/mlflow_logger.py``, ``bitrain/train/wandb_logger.py``), imported only when
asked for. The progress bar and the console/log file are always there.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bitrain import console
from bitrain.cli import config as C
from bitrain.errors import UserError


def tracker_modules(cfg: C.TrainConfig) -> dict[str, tuple[str, ...]]:
    """The modules each tracker in ``--logger`` needs: MLflow's SQLite store (the default one too)
    needs SQLAlchemy and Alembic besides the client."""
    need: dict[str, tuple[str, ...]] = {}
    names = C.parse_loggers(cfg.logger)
    if "mlflow" in names:
        uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:"
        need["mlflow"] = ("mlflow", "sqlalchemy", "alembic") if uri.startswith("sqlite:") else ("mlflow",)
    if "wandb" in names:
        need["wandb"] = ("wandb",)
    return need


def check_loggers(cfg: C.TrainConfig) -> None:
    """UserError (exit 2, one line) when a tracker in ``--logger`` cannot be imported; imports them
    (only those asked for), so a broken install is found here too and not after the first epoch."""
    for name, modules in tracker_modules(cfg).items():
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                why = "is not installed" if isinstance(e, ModuleNotFoundError) else f"does not import ({e})"
                raise UserError(
                    f"--logger {name} needs the {module} package, which {why}: pip install 'bitrain[{name}]'"
                ) from None


def make_loggers(
    cfg: C.TrainConfig,
    run_dir: Path,
    params: dict[str, Any],
    csv_logger: Callable[[Path], Any] | None = None,
) -> list:
    """The progress bar, console + log file, and the loggers of ``--logger``, in a fixed order (CSV,
    TensorBoard, MLflow, W&B). ``params``: what the trackers log as the run's parameters;
    ``csv_logger``: makes the ``metrics.csv`` logger (a run in stages has its own)."""
    from bitrain.train.callbacks import ConsoleLogger, CSVLogger, ProgressETA, TensorBoardLogger

    names = C.parse_loggers(cfg.logger)
    progress = ProgressETA(cfg.progress, live=console.live())
    log = ConsoleLogger(run_dir / cfg.log, console=progress.console)
    callbacks: list = [progress, log]
    if "csv" in names:
        callbacks.append((csv_logger or CSVLogger)(run_dir / "metrics.csv"))
    if "tensorboard" in names:
        tb_dir = Path(cfg.write_summary) if cfg.write_summary else run_dir / "tb"
        callbacks.append(TensorBoardLogger(tb_dir, histograms=cfg.write_summary is not None))
    if "mlflow" in names:
        from bitrain.train.mlflow_logger import MLflowLogger

        options = dict(uri=cfg.mlflow_uri, experiment=cfg.mlflow_experiment, say=log.on_message)
        callbacks.append(MLflowLogger(run_dir, params, **options))
    if "wandb" in names:
        from bitrain.train.wandb_logger import WandbLogger

        callbacks.append(WandbLogger(run_dir, params, project=cfg.wandb_project, say=log.on_message))
    return callbacks


def run_files(run_dir: Path, checkpoints: Path) -> dict[str, Path]:
    """A finished run's files for the trackers, by their name in the run directory: the final weights,
    the best checkpoint (of the last stage, in a run in stages) and the config."""
    files = {"model.safetensors": run_dir / "model.safetensors", "config.yaml": run_dir / "config.yaml"}
    best = checkpoints / "best.pt"
    try:
        files[best.relative_to(run_dir).as_posix()] = best
    except ValueError:  # checkpoints outside the run directory
        files[f"checkpoints/{best.name}"] = best
    return files


def end_run(callbacks: list, exit_code: int, files: dict[str, Path]) -> None:
    """Every callback's ``on_run_end`` (the trackers finish their run, with the files after exit 0)."""
    for cb in callbacks:
        cb.on_run_end(exit_code, files if exit_code == 0 else {})
