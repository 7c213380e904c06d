"""The training configuration: one frozen dataclass, YAML in and out, type-checked values.

Precedence (lowest first): field defaults < data-set defaults < the resumed checkpoint's config
< ``--config FILE.yaml`` < flags given on the command line. Every value is checked here, once,
with an error that names the option and the accepted values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bitrain.data.sets import DATA_SETS
from bitrain.errors import UserError, parse_list, suggest
from bitrain.names import (
    APPROXIMATIONS,
    AUGMENTATIONS,
    BITS,
    DTYPES,
    INITIALIZATIONS,
    KBIT_QUANTIZERS,
    LR_MODES,
    OPTIMIZERS,
    STEMS,
)


def _f(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    choices: tuple | None = None,
    nargs: str | None = None,
    const: Any = None,
    run_control: bool = False,
):
    meta = {
        "help": help,
        "flags": flags,
        "choices": choices,
        "nargs": nargs,
        "const": const,
        "run_control": run_control,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``bitrain train`` (BMXNet v2 names; docs/migration.md maps them flag by flag)."""

    # model
    model: str | None = _f(None, "model name (bitrain models lists them); default: a small net for the data set")
    bits: int = _f(1, "weight bits of the quantized layers (32 = full precision)", choices=BITS)
    bits_a: int = _f(1, "activation bits of the quantized layers (32 = full precision)", choices=BITS)
    activation_method: str = _f(
        "det_sign", "activation quantizer (det_sign, approx_sign, ...)", flags=("--activation",)
    )
    weight_quantization: str = _f("det_sign", "weight quantizer")
    clip_threshold: float = _f(1.0, "gradient cancel: zero the gradient where |x| > t")
    approximation: str = _f("", "scaling: '' | xnor | binet", choices=APPROXIMATIONS)
    initial_layers: str = _f(
        "imagenet", "stem: imagenet | grouped_stem (thumbnail is automatic below 50 px)", choices=STEMS
    )
    initialization: str = _f("gaussian", "weight initialisation", choices=INITIALIZATIONS)
    fp_downsample_sc: bool = _f(False, "ResNetE: full-precision downsample shortcut")
    pool_downsample_sc: bool = _f(False, "ResNetE: pooling in the downsample shortcut")
    downsample_sc_groups: int | None = _f(None, "ResNetE: groups of the downsample shortcut conv")
    slices: int | None = _f(None, "ResNetE: number of binary slices")
    reduction: str | None = _f(None, "DenseNet/MeliusNet: transition reduction factors")
    growth_rate: int | None = _f(None, "DenseNet/MeliusNet: growth rate")
    init_features: int | None = _f(None, "DenseNet/MeliusNet: features after the stem")
    downsample_structure: str | None = _f(None, "DenseNet/MeliusNet: downsample structure")
    block_config: str | None = _f(None, "DenseNet/MeliusNet: layers per block, comma separated")
    dilated: bool = _f(False, "DenseNet/MeliusNet: dilated instead of strided downsampling")
    # data
    dataset: str = _f("digits", "data set", choices=tuple(DATA_SETS))
    data_dir: str | None = _f(None, "data set folder", flags=("--data-path",))
    batch_size: int = _f(32, "batch size per device (global = per device x world size)")
    num_workers: int = _f(4, "loader worker processes (image folders)", flags=("-j", "--num-worker"))
    augmentation: str = _f(
        "medium",
        "augmentation: low/medium/high (ImageNet); none turns CIFAR's off; "
        "crop, crop-flip add it to digits/MNIST/dummy",
        choices=AUGMENTATIONS,
    )
    image_size: int = _f(224, "imagenet/imagefolder: training input size in px")
    dummy_shape: str = _f("3,32,32", "dummy data set: C,H,W")
    dummy_classes: int = _f(10, "dummy data set: number of classes")
    dummy_size: int = _f(1024, "dummy data set: number of training images")
    # optimisation
    epochs: int | None = _f(None, "epochs (default: 10 for digits, 120 otherwise)")
    optimizer: str = _f("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = _f(0.01, "learning rate")
    lr_mode: str = _f("step", "lr schedule", choices=LR_MODES)
    lr_factor: float = _f(0.1, "step mode: factor per lr step")
    lr_steps: str = _f("30,60,90", "step mode: epochs at which the lr drops, comma separated")
    warmup_epochs: float = _f(0.0, "linear warmup epochs")
    warmup_lr: float = _f(0.0, "lr at the start of the warmup")
    momentum: float = _f(0.9, "momentum (sgd, nag)")
    wd: float = _f(0.0, "weight decay (not for BatchNorm, biases, binary weights)", flags=("--weight-decay",))
    label_smoothing: float = _f(0.0, "label smoothing (flag alone: 0.1)", nargs="?", const=0.1)
    mixup: bool = _f(False, "mixup training")
    mixup_alpha: float = _f(0.2, "mixup Beta(alpha, alpha)")
    mixup_off_epoch: int = _f(0, "epoch from which mixup is off (0: never)")
    clip_grad_norm: float | None = _f(None, "clip the gradient norm to this value")
    clip_latent_weights: float | None = _f(None, "clamp binary layers' latent weights to [-v, v] after each step")
    bn_recalibrate: int = _f(
        20,
        "re-estimate BatchNorm statistics over the first N train batches before each "
        "validation, so val top-1 is that of the saved weights (0: BMXNet's running averages)",
    )
    teacher: str | None = _f(
        None,
        "knowledge distillation from this model (a checkpoint, model.safetensors or run directory; eval mode, no grad)",
    )
    distill_temperature: float = _f(1.0, "distillation: softmax temperature T (loss scaled by T^2)")
    distill_alpha: float = _f(
        1.0, "distillation: weight of the teacher's KL; 1 - alpha goes to the label loss (ReActNet: 1)"
    )
    init_from: str | None = _f(
        None,
        "start from these weights (a checkpoint or model.safetensors; shapes checked), "
        "e.g. step 2 of a two-step binary training",
    )
    bop_threshold: float = _f(1e-8, "Bop: flip threshold")
    bop_gamma: float = _f(1e-4, "Bop: adaptivity rate")
    # run
    prefix: str | None = _f(None, "run directory (default runs/<model>-<dataset>-<time>)", run_control=True)
    seed: int = _f(123, "random seed")
    start_epoch: int = _f(0, "epoch to start at (resume sets it by itself)", run_control=True)
    dtype: str = _f("float32", "compute dtype (bfloat16/float16 through autocast)", choices=DTYPES)
    gpus: str | None = _f(
        None, "GPU ids, e.g. 0 or 0,1 (several: one process each through torchrun); default: GPU 0 if present"
    )
    cpu: bool = _f(False, "train on the CPU")
    compile: bool = _f(False, "torch.compile the model (BMXNet's hybridize)")
    mode: str = _f(
        "imperative", "BMXNet's mode: hybrid/symbolic mean --compile", choices=("imperative", "hybrid", "symbolic")
    )
    channels_last: bool = _f(False, "channels_last memory format")
    sync_bn: bool = _f(False, "synchronised BatchNorm across ranks")
    dry_run: bool = _f(False, "build the model, print its summary, exit", run_control=True)
    test_run: bool = _f(False, "one batch per epoch, train and val")
    interrupt_at: int | None = _f(None, "after validating epoch N-1: save and exit with code 3", run_control=True)
    log: str = _f("train.log", "log file name inside the run directory")
    log_interval: int = _f(50, "batches between log lines (0: none)")
    plot_network: str | None = _f(None, "write the summary (and graph) to PREFIX.*", run_control=True)
    profile: bool = _f(False, "torch.profiler trace of the first steps into RUN/profile", flags=("--builtin-profiler",))
    progress: str | None = _f(None, "file overwritten with 'Epoch ETA: X, Train ETA: Y'")
    resume: str | None = _f(None, "checkpoint path, or 'auto' for the newest in --prefix", run_control=True)
    resume_states: str | None = _f(None, "ignored: a bitrain checkpoint restores the optimizer too", run_control=True)
    save_frequency: int | None = _f(None, "epochs between numbered checkpoints (default 10; 1 for imagenet)")
    checkpoint_interval: int = _f(0, "also save last.pt every N steps inside an epoch (0: off)")
    checkpoint_minutes: float = _f(0.0, "also save last.pt every M minutes inside an epoch (0: off)")
    write_summary: str | None = _f(
        None, "TensorBoard histograms too; optional value: event folder", nargs="?", const=""
    )
    skip_nonfinite: bool = _f(False, "skip steps whose loss is NaN/inf instead of stopping")
    overwrite: bool = _f(False, "reuse a run directory that holds another run", run_control=True)

    def with_(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self, include_run_control: bool = True) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if include_run_control or not f.metadata.get("run_control")
        }


FIELDS = {f.name: f for f in fields(TrainConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: str) -> tuple[type, bool]:
    """'int | None' -> (int, True)."""
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    return {"int": int, "float": float, "str": str, "bool": bool}[names[0]], optional


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
    if name == "approximation" and value == "abc":
        raise UserError("--approximation abc is not supported (BMXNet crashes on it); use '', xnor or binet")
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
    """Range checks that need more than the type."""

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
    need(0 <= cfg.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.mixup_alpha > 0, f"--mixup-alpha must be positive, got {cfg.mixup_alpha}")
    need(cfg.clip_threshold > 0, f"--clip-threshold must be positive, got {cfg.clip_threshold}")
    need(cfg.log_interval >= 0, f"--log-interval must be >= 0, got {cfg.log_interval}")
    need(cfg.num_workers >= 0, f"--num-worker must be >= 0, got {cfg.num_workers}")
    need(cfg.bn_recalibrate >= 0, f"--bn-recalibrate must be >= 0, got {cfg.bn_recalibrate}")
    need(cfg.distill_temperature > 0, f"--distill-temperature must be positive, got {cfg.distill_temperature}")
    need(0 <= cfg.distill_alpha <= 1, f"--distill-alpha must be in [0, 1], got {cfg.distill_alpha}")
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
    need(cfg.dummy_classes >= 2, f"--dummy-classes must be at least 2, got {cfg.dummy_classes}")
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
    need(cfg.dummy_size >= 1, f"--dummy-size must be at least 1, got {cfg.dummy_size}")
    need(cfg.image_size >= 8, f"--image-size must be at least 8, got {cfg.image_size}")
    if cfg.gpus:
        parse_ints("gpus", cfg.gpus)
    return cfg


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
    path = Path(path)
    if not path.is_file() and path.parent == Path(".") and path.suffix in ("", ".yaml"):
        if path.stem in list_recipes():
            return load_yaml(RECIPES_DIR / f"{path.stem}.yaml")
        raise UserError(
            f"--config {path} does not exist and is not a recipe{suggest(path.stem, list_recipes())}; "
            f"recipes: {', '.join(list_recipes())}"
        )
    if not path.is_file():
        raise UserError(f"--config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option: value")
    return check_keys(data, str(path))


def dump_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved configuration, without run-control options, so ``--config`` repeats the run."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(include_run_control=False), sort_keys=False), encoding="utf-8")
