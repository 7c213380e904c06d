"""``bitrain train``'s argv -> one ``TrainConfig``: the parser made from the schema, the layers merged in
their order, and the checkpoint to resume read once (its config is one of the layers)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitrain.cli import config as C
from bitrain.cli.args import PROG, ArgParser
from bitrain.data.sets import DATA_SETS
from bitrain.errors import UserError
from bitrain.names import ARCH_OPTIONS, flag

#: who sets one of these gets BMXNet's defaults for the rest (not the data set's)
SCHEDULE_OPTIONS = ("lr", "lr_mode", "warmup_epochs", "warmup_lr", "lr_steps", "lr_factor")


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; only flags actually given land in the namespace."""
    p.add_argument("--config", help="YAML file of option: value (flags given here override it)")
    p.add_argument("--stage", help="a --config with stages: start at (or rerun) stage NAME, from the one before it")
    for name, f in C.FIELDS.items():
        meta = f.metadata
        flags = (flag(name),) + tuple(meta["flags"])
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


def parse_train_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """argv -> (the namespace of the flags given, those of them that are TrainConfig fields)."""
    p = ArgParser(
        prog=f"{PROG} train",
        argument_default=argparse.SUPPRESS,
        description="Train an image classifier (BMXNet v2 options).",
    )
    add_train_args(p)
    ns = p.parse_args(list(argv))
    return ns, _explicit(ns)


def resolve_config(argv: Sequence[str]) -> tuple[C.TrainConfig, dict | None, Path | None]:
    """argv -> (config, resumed checkpoint payload or None, its path). Precedence: defaults <
    data-set defaults < resumed checkpoint's config < --config YAML < explicit flags."""
    ns, flags = parse_train_argv(argv)
    if getattr(ns, "stage", None):
        raise UserError("--stage NAME needs a --config whose YAML holds stages:")
    yaml_layer = C.load_yaml(ns.config) if getattr(ns, "config", None) else {}
    run_layer = {**yaml_layer, **flags}
    payload, ckpt_path = None, None
    resume = run_layer.get("resume")
    if resume:
        payload, ckpt_path, prefix = _find_resume(str(resume), run_layer.get("prefix"))
        if prefix is not None:
            run_layer.setdefault("prefix", str(prefix))
    ckpt_layer = C.check_keys(payload.get("config", {}), "the checkpoint's config") if payload else {}
    cfg = C.from_layers(dataset_layer(run_layer, ckpt_layer), ckpt_layer, run_layer)
    if cfg.resume_states:
        warnings.warn("--resume-states is ignored: a bitrain checkpoint restores the optimizer itself", stacklevel=2)
    return cfg, payload, ckpt_path


def dataset_layer(run_layer: dict[str, Any], ckpt_layer: dict[str, Any]) -> dict[str, Any]:
    """The data set's defaults under ``run_layer`` (YAML + flags) and a resumed checkpoint's config."""
    dataset = run_layer.get("dataset", ckpt_layer.get("dataset", "digits"))
    ds_layer = dict(DATA_SETS[dataset].defaults) if dataset in DATA_SETS else {}
    if any(k in run_layer for k in SCHEDULE_OPTIONS):  # who sets the schedule gets BMXNet's defaults for the rest
        for k in SCHEDULE_OPTIONS:
            ds_layer.pop(k, None)
    if "model" in run_layer or "model" in ckpt_layer:  # the default model's architecture options are its own
        for k in ARCH_OPTIONS:
            ds_layer.pop(k, None)
    return ds_layer


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
