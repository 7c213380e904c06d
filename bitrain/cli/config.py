"""Loading ``bitrain train``'s configuration: value layers (YAML files, recipes, a checkpoint's config,
flags) merged, type-checked against the schema (``bitrain.cli.schema``) and range-checked into one
frozen ``TrainConfig``.

Precedence (lowest first): field defaults < data-set defaults < the resumed checkpoint's config
< ``--config FILE.yaml`` < flags given on the command line. Every value is checked once, with an
error that names the option and the accepted values: here, or (the loss options, ``bn_recalibrate``,
the dummy data set's classes) where the API checks them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bitrain.binary.layer_config import check_approximation
from bitrain.cli.schema import FIELDS, TrainConfig, _base_type
from bitrain.errors import UserError, parse_list, suggest
from bitrain.names import KBIT_QUANTIZERS, LOGGERS, flag

__all__ = [
    "FIELDS",
    "TrainConfig",
    "coerce",
    "check_keys",
    "validate",
    "parse_floats",
    "parse_ints",
    "parse_loggers",
    "from_layers",
    "RECIPES_DIR",
    "list_recipes",
    "load_yaml",
    "read_yaml",
    "resolve_yaml_path",
    "dump_yaml",
]


def coerce(name: str, value: Any) -> Any:
    """Check/convert one value for field ``name``; UserError naming the option otherwise."""
    f = FIELDS[name]
    typ, optional = _base_type(f.type)
    opt = flag(name)
    if value is None:
        if optional:
            return None
        raise UserError(f"{opt} needs a value")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{opt} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{opt} must be an integer, got {value!r}")
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise UserError(f"{opt} must be an integer, got {value!r}") from None
    elif typ is float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{opt} must be a number, got {value!r}") from None
    elif typ is str:
        if isinstance(value, (list, tuple)):  # YAML lists for comma-separated options
            value = ",".join(str(v) for v in value)
        value = str(value)
    if name == "approximation":
        check_approximation(value)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        shown = ", ".join(repr(c) if c == "" else str(c) for c in choices)
        raise UserError(f"{opt} {value!r} is not valid; choose from: {shown}")
    return value


def check_keys(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise '-' to '_' and refuse unknown keys with a did-you-mean."""
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS:
            raise UserError(f"unknown option {k!r} in {source}{suggest(key, FIELDS)}")
        out[key] = v
    return out


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks that need more than the type (those the API needs too live with the API: the loss
    options in ``train.loss.Loss``, ``bn_recalibrate`` in ``train.options.LoopOptions``, the dummy data
    set's classes and size in ``data.build``)."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(msg)

    need(cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}")
    need(cfg.epochs is None or cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.warmup_lr >= 0, f"--warmup-lr must be >= 0, got {cfg.warmup_lr}")
    need(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    need(cfg.wd >= 0, f"--wd must be >= 0, got {cfg.wd}")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    need(0 < cfg.lr_factor <= 1, f"--lr-factor must be in (0, 1], got {cfg.lr_factor}")
    need(cfg.clip_threshold > 0, f"--clip-threshold must be positive, got {cfg.clip_threshold}")
    need(cfg.log_interval >= 0, f"--log-interval must be >= 0, got {cfg.log_interval}")
    need(cfg.num_workers >= 0, f"--num-worker must be >= 0, got {cfg.num_workers}")
    need(cfg.start_epoch >= 0, f"--start-epoch must be >= 0, got {cfg.start_epoch}")
    need(cfg.checkpoint_interval >= 0, f"--checkpoint-interval must be >= 0, got {cfg.checkpoint_interval}")
    need(cfg.checkpoint_minutes >= 0, f"--checkpoint-minutes must be >= 0, got {cfg.checkpoint_minutes}")
    need(
        cfg.save_frequency is None or cfg.save_frequency >= 0,
        f"--save-frequency must be >= 0, got {cfg.save_frequency}",
    )
    need(cfg.interrupt_at is None or cfg.interrupt_at >= 1, f"--interrupt-at must be >= 1, got {cfg.interrupt_at}")
    need(
        cfg.clip_grad_norm is None or cfg.clip_grad_norm > 0,
        f"--clip-grad-norm must be positive, got {cfg.clip_grad_norm}",
    )
    for bits_name, method_name in (("bits", "weight_quantization"), ("bits_a", "activation_method")):
        bits, method = getattr(cfg, bits_name), getattr(cfg, method_name)
        if 1 < bits < 32 and method not in KBIT_QUANTIZERS:
            raise UserError(
                f"{flag(bits_name)} {bits} needs a k-bit {flag(method_name)} "
                f"({', '.join(KBIT_QUANTIZERS)}); {method!r} is a 1-bit quantizer"
            )
    parse_floats("lr_steps", cfg.lr_steps)
    shape = parse_ints("dummy_shape", cfg.dummy_shape)
    need(
        len(shape) == 3 and all(s > 0 for s in shape) and shape[1] == shape[2],
        f"--dummy-shape must be C,H,W with H == W, got {cfg.dummy_shape!r}",
    )
    need(cfg.image_size >= 8, f"--image-size must be at least 8, got {cfg.image_size}")
    if cfg.gpus:
        parse_ints("gpus", cfg.gpus)
    loggers = parse_loggers(cfg.logger)
    need(
        cfg.write_summary is None or "tensorboard" in loggers,
        f"--write-summary writes TensorBoard histograms; --logger {cfg.logger} has no tensorboard",
    )
    return cfg


def parse_loggers(text: str) -> tuple[str, ...]:
    """``--logger``'s comma list -> the logger names, each once, in order; UserError for an unknown one."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if not names:
        raise UserError(f"--logger needs at least one of: {', '.join(LOGGERS)}")
    for n in names:
        if n not in LOGGERS:
            raise UserError(f"--logger {n!r} is not a logger{suggest(n, LOGGERS)}; choose from: {', '.join(LOGGERS)}")
    return tuple(dict.fromkeys(names))


def parse_floats(name: str, text: str) -> list[float]:
    """A comma-separated config value (field ``name``) as floats."""
    return parse_list(flag(name), text, float)


def parse_ints(name: str, text: str) -> list[int]:
    """A comma-separated config value (field ``name``) as integers."""
    return parse_list(flag(name), text, int)


def from_layers(*layers: dict[str, Any]) -> TrainConfig:
    """Merge value layers (later wins), type-check each value, range-check the result."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return validate(TrainConfig(**{k: coerce(k, v) for k, v in merged.items()}))


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"  # package data (pyproject: recipes/*.yaml)


def list_recipes() -> list[str]:
    """Names of the recipes packaged in ``bitrain/recipes/`` (``--config NAME`` loads one)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Option layer from a YAML file, or from a packaged recipe when ``path`` is a recipe name."""
    return check_keys(read_yaml(path), str(resolve_yaml_path(path)))


def resolve_yaml_path(path: str | Path) -> Path:
    """``--config``'s file: ``path`` itself, or the packaged recipe it names; UserError when neither."""
    path = Path(path)
    if not path.is_file() and path.parent == Path(".") and path.suffix in ("", ".yaml"):
        if path.stem in list_recipes():
            return RECIPES_DIR / f"{path.stem}.yaml"
        raise UserError(
            f"--config {path} does not exist and is not a recipe{suggest(path.stem, list_recipes())}; "
            f"recipes: {', '.join(list_recipes())}"
        )
    if not path.is_file():
        raise UserError(f"--config {path} does not exist")
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``--config`` file or recipe, keys unchecked (a recipe with ``stages:`` is read so)."""
    path = resolve_yaml_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option: value")
    return data


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved configuration, without run-control options, so ``--config`` repeats the run."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(include_run_control=False), sort_keys=False), encoding="utf-8")
