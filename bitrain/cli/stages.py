"""Training in stages (issue 22): a ``--config`` whose YAML holds ``stages:``, checked into a plan
before anything runs (``bitrain/cli/stages_run.py`` runs it).

A stage is a mapping with a ``name`` and the options it changes; the top level holds what the stages
share. Each stage's options are ``data-set defaults < top level < the stage < command-line flags``.
Stage k > 0 starts from stage k-1's final weights (``--init-from``'s checks: names and shapes) with a
fresh optimizer and schedule; ``teacher:`` may name an earlier stage (its final model teaches).
Refused with one line (exit 2): an unknown option, a duplicate or unusable name, a teacher naming
itself, a later or no stage (and no file), a stage that changes the data set, and consecutive stages
whose models' weights do not fit each other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitrain.cli import config as C
from bitrain.cli.resolve import dataset_layer, parse_train_argv
from bitrain.errors import UserError, suggest
from bitrain.names import flag

STAGES_KEY = "stages"
#: run-control options a stage may not set (they belong to the whole command)
WHOLE_RUN = ("prefix", "resume", "overwrite", "dry_run", "plot_network", "resume_states", "gpus", "cpu")
WHOLE_RUN += ("logger", "mlflow_uri", "mlflow_experiment", "wandb_project")  # one set of loggers for all stages
#: options every stage must share (one data set for the whole run)
DATA_OPTIONS = ("dataset", "data_dir", "dummy_shape", "dummy_classes", "dummy_size", "image_size")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its resolved config (teacher as written) and the options it sets."""

    name: str
    cfg: C.TrainConfig
    options: dict[str, Any]
    teacher_stage: str | None  # the earlier stage whose final model teaches, or None


@dataclass(frozen=True)
class Plan:
    """A checked stages run: the shared options as written, the stages, the command line's flags."""

    source: str
    shared: dict[str, Any]
    stages: tuple[Stage, ...]
    flags: dict[str, Any]
    run_dir: Path
    start: str | None  # --stage NAME

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def config_yaml(self) -> dict[str, Any]:
        """What ``RUN/config.yaml`` holds: the flags folded in, the run-control options left out, so
        ``--config RUN/config.yaml`` (or ``--resume auto``) repeats the run."""
        control = {n for n, f in C.FIELDS.items() if f.metadata.get("run_control")}
        flags = {k: C.coerce(k, v) for k, v in self.flags.items()}  # typed, as a YAML file would hold them
        shared = {k: v for k, v in {**self.shared, **flags}.items() if k not in control}
        stages = [
            {"name": s.name, **{k: v for k, v in s.options.items() if k not in control and k not in self.flags}}
            for s in self.stages
        ]
        return {**shared, STAGES_KEY: stages}


def plan_from_argv(argv: Sequence[str]) -> Plan | None:
    """The plan when ``--config`` (or, with ``--resume auto``, ``--prefix``'s config.yaml) holds stages;
    None for a one-stage run."""
    ns, flags = parse_train_argv(argv)
    source = getattr(ns, "config", None)
    if source is None and flags.get("resume") == "auto" and flags.get("prefix"):
        saved = Path(flags["prefix"]) / "config.yaml"
        if saved.is_file() and STAGES_KEY in (C.read_yaml(saved) or {}):
            source = str(saved)
    if source is None:
        return None
    raw = C.read_yaml(source)
    if STAGES_KEY not in raw:
        return None
    if flags.get("resume") not in (None, "auto"):
        raise UserError("a run in stages resumes with --resume auto (each stage keeps its own checkpoints)")
    return make_plan(str(source), raw, flags, getattr(ns, "stage", None))


def make_plan(source: str, raw: dict[str, Any], flags: dict[str, Any], start: str | None = None) -> Plan:
    """Check a stages YAML (``raw``) with the command line's ``flags`` into a :class:`Plan`."""
    shared = C.check_keys({k: v for k, v in raw.items() if k != STAGES_KEY}, source)
    entries = raw[STAGES_KEY]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: stages: must be a non-empty list of mappings, each with a name")
    stages: list[Stage] = []
    for i, entry in enumerate(entries):
        stages.append(_stage(source, i, entry, shared, flags, [s.name for s in stages], entries))
    _check_same_data(stages)
    _check_weights_fit(stages)
    if start is not None and start not in [s.name for s in stages]:
        names = [s.name for s in stages]
        raise UserError(f"--stage {start}: no such stage{suggest(start, names)}; stages: {', '.join(names)}")
    prefix = stages[0].cfg.prefix  # a whole-run option: the same in every stage
    run_dir = Path(prefix) if prefix else _default_run_dir(stages[-1].cfg)
    return Plan(source, shared, tuple(stages), dict(flags), run_dir, start)


def _default_run_dir(cfg: C.TrainConfig) -> Path:
    from bitrain.cli.rundir import default_run_dir

    return default_run_dir(cfg.model, cfg.dataset)


def _stage(source: str, i: int, entry: Any, shared: dict, flags: dict, earlier: list[str], entries: list) -> Stage:
    """Stage ``i`` of ``entries`` checked: its name, its options, its teacher, its config."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise UserError(f"{source}: stage {i + 1} must be a mapping with a name: (and the options it changes)")
    name = entry["name"]
    if not _NAME.match(name):
        raise UserError(f"{source}: stage name {name!r} must be letters, digits, '_', '.' or '-' (a folder name)")
    if name in earlier:
        raise UserError(f"{source}: two stages are named {name!r}")
    where = f"stage {name!r} of {source}"
    options = C.check_keys({k: v for k, v in entry.items() if k != "name"}, where)
    for key in options:
        if key in WHOLE_RUN:
            raise UserError(f"{where}: {flag(key)} is for the whole run (top level)")
    if i > 0 and "init_from" in options:
        raise UserError(f"{where}: init_from is for the first stage; stage {i + 1} starts from stage {i}'s weights")
    merged = {**shared, **options, **flags}
    teacher, teacher_stage = merged.get("teacher"), None
    later = [e.get("name") for e in entries[i + 1 :] if isinstance(e, dict)]
    if isinstance(teacher, str) and teacher:
        if teacher in earlier:
            teacher_stage = teacher
        elif teacher == name:
            raise UserError(
                f"{where}: teacher {teacher!r} is this stage itself; a teacher is an earlier stage "
                "(a stage without one says teacher: null)"
            )
        elif teacher in later:
            raise UserError(f"{where}: teacher {teacher!r} is a later stage; a teacher is an earlier stage")
        elif not Path(teacher).exists():
            hint = suggest(teacher, earlier)
            raise UserError(
                f"{where}: teacher {teacher!r} is neither an earlier stage ({', '.join(earlier) or 'none'}) "
                f"nor a file or run directory{hint}"
            )
    cfg = C.from_layers(dataset_layer(merged, {}), merged)
    return Stage(name, cfg, options, teacher_stage)


def _check_same_data(stages: list[Stage]) -> None:
    first = stages[0]
    for s in stages[1:]:
        for key in DATA_OPTIONS:
            if getattr(s.cfg, key) != getattr(first.cfg, key):
                raise UserError(
                    f"stage {s.name!r} changes {key} ({getattr(first.cfg, key)!r} -> {getattr(s.cfg, key)!r}); "
                    "the stages of a run share one data set"
                )


def _nominal_info(cfg: C.TrainConfig) -> Any:
    """The data's shape as far as the model needs it, without reading the data (for the fit check)."""
    from types import SimpleNamespace

    from bitrain.data.sets import DATA_SETS

    ds = DATA_SETS[cfg.dataset]
    if cfg.dataset == "dummy":
        c, h, _ = C.parse_ints("dummy_shape", cfg.dummy_shape)
        return SimpleNamespace(num_classes=cfg.dummy_classes, in_channels=c, image_size=h)
    channels = len(ds.mean) if ds.mean else 3
    size = cfg.image_size if ds.folder else 32
    return SimpleNamespace(num_classes=ds.num_classes or 10, in_channels=channels, image_size=size)


def model_shapes(cfg: C.TrainConfig) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the state dict of ``cfg``'s model (built on the meta device; None if it cannot be)."""
    import torch

    from bitrain.cli.build import model_args
    from bitrain.models import build_model

    margs = model_args(cfg, _nominal_info(cfg))
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build_model(**margs)
            return {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except UserError:
            raise
        except Exception:
            continue
    return None


def _check_weights_fit(stages: list[Stage]) -> None:
    """Stage k's final weights must load into stage k+1's model: the same names and shapes."""
    shapes = [model_shapes(s.cfg) for s in stages]
    for (a, sa), (b, sb) in zip(zip(stages, shapes), zip(stages[1:], shapes[1:])):
        if sa is None or sb is None:
            continue
        missing, unexpected = sorted(set(sb) - set(sa)), sorted(set(sa) - set(sb))
        wrong = [f"{k}: {sa[k]} vs {sb[k]}" for k in sorted(set(sa) & set(sb)) if sa[k] != sb[k]]
        if missing or unexpected or wrong:
            detail = "; ".join(
                part
                for part in (
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"shapes differ ({'; '.join(wrong[:3])})" if wrong else "",
                )
                if part
            )
            raise UserError(f"stage {b.name!r} changes the model so stage {a.name!r}'s weights do not fit: {detail}")


def format_plan(plan: Plan) -> str:
    """The stages as a table: ``bitrain train --dry-run`` and ``bitrain summary --config`` print it."""
    n = len(plan.stages)
    lines = [f"{n} stages ({plan.source}); run dir {plan.run_dir}"]
    head = f"  {'#':>3}  {'stage':<16} {'model':<16} {'bits':>4} {'bits_a':>6} {'epochs':>6} {'lr':>9}  {'from':<16} teacher"
    lines.append(head)
    for k, s in enumerate(plan.stages):
        c = s.cfg
        teacher = f"stage {s.teacher_stage}" if s.teacher_stage else (c.teacher or "-")
        start = plan.stages[k - 1].name if k > 0 else (c.init_from or "scratch")
        lines.append(
            f"  {k + 1:>3}  {s.name:<16} {c.model or '-':<16} {c.bits:>4} {c.bits_a:>6} {c.epochs or '-':>6} "
            f"{c.lr:>9.3g}  {start:<16} {teacher}"
        )
    return "\n".join(lines)
