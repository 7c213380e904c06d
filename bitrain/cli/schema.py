"""The option schema of ``bitrain train``: one frozen dataclass, ``TrainConfig``, whose fields are the
options (default, help, extra flags, choices from ``bitrain.names``). To add a flag, add a field here;
``bitrain.cli.config`` loads and checks values against it, ``bitrain.cli.resolve`` makes the parser
from it. Torch-free (``bitrain --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from bitrain.binary.layer_config import DEFAULTS as LAYER
from bitrain.data.sets import DATA_SETS
from bitrain.names import (
    APPROXIMATIONS,
    AUGMENTATIONS,
    BITS,
    DEFAULT_LOGGERS,
    DTYPES,
    INITIALIZATIONS,
    LOGGERS,
    LR_MODES,
    OPTIMIZERS,
    STEMS,
)
from bitrain.train.schedules import DEFAULT_LR_STEPS


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
    bits: int = _f(LAYER.bits, "weight bits of the quantized layers (32 = full precision)", choices=BITS)
    bits_a: int = _f(LAYER.bits_a, "activation bits of the quantized layers (32 = full precision)", choices=BITS)
    activation_method: str = _f(
        LAYER.activation_method, "activation quantizer (det_sign, approx_sign, ...)", flags=("--activation",)
    )
    weight_quantization: str = _f(LAYER.weight_quantization, "weight quantizer")
    clip_threshold: float = _f(LAYER.clip_threshold, "gradient cancel: zero the gradient where |x| > t")
    approximation: str = _f(LAYER.approximation, "scaling: '' | xnor | binet", choices=APPROXIMATIONS)
    initial_layers: str = _f(
        STEMS[0], "stem: imagenet | grouped_stem (thumbnail is automatic below 50 px)", choices=STEMS
    )
    initialization: str = _f(INITIALIZATIONS[0], "weight initialisation", choices=INITIALIZATIONS)
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
    lr_steps: str = _f(
        ",".join(f"{e:g}" for e in DEFAULT_LR_STEPS), "step mode: epochs at which the lr drops, comma separated"
    )
    warmup_epochs: float = _f(0.0, "linear warmup epochs")
    warmup_lr: float = _f(0.0, "lr at the start of the warmup")
    momentum: float = _f(0.9, "momentum (sgd, nag)")
    wd: float = _f(0.0, "weight decay (not for BatchNorm, biases, binary weights)", flags=("--weight-decay",))
    label_smoothing: float = _f(0.0, "label smoothing (flag alone: 0.1)", nargs="?", const=0.1)
    mixup: bool = _f(False, "mixup training")
    mixup_alpha: float = _f(0.2, "mixup Beta(alpha, alpha)")
    mixup_off_epoch: int = _f(0, "epoch from which mixup and CutMix are off (0: never)")
    cutmix: float | None = _f(
        None,
        "CutMix: lambda ~ Beta(a, a) for this a (timm --cutmix, e.g. 1.0), lambda corrected to the box's area as timm",
    )
    mixup_switch_prob: float = _f(0.5, "with --mixup and --cutmix both on: the probability of CutMix at a step (timm)")
    accumulate: int = _f(
        1,
        "micro-batches of --batch-size per optimizer step (timm --grad-accum-steps, Lightning accumulate_grad_batches): "
        "global batch = batch size x world size x this; the schedule, --log-interval and checkpoints count optimizer "
        "steps; an epoch's last, shorter window steps too",
    )
    model_ema: float | None = _f(
        None, "keep an exponential moving average of the weights with this decay (timm --model-ema-decay), e.g. 0.9998"
    )
    model_ema_warmup: bool = _f(False, "EMA decay warmup: min(decay, (1 + step) / (10 + step)) (timm)")
    model_ema_eval: bool = _f(False, "the EMA picks best.pt and is the exported model.safetensors (default: the model)")
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
    logger: str = _f(
        DEFAULT_LOGGERS,
        f"where the metrics go, a comma list of {', '.join(LOGGERS)} (Lightning's loggers, timm's --log-wandb); "
        "mlflow and wandb are extras: pip install 'bitrain[mlflow]' / 'bitrain[wandb]'",
    )
    mlflow_uri: str | None = _f(
        None,
        "--logger mlflow: tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///RUN/mlflow.db, artifacts in RUN/mlruns)",
    )
    mlflow_experiment: str | None = _f(
        None,
        "--logger mlflow: experiment name (default $MLFLOW_EXPERIMENT_NAME, else bitrain); the run is named after RUN",
    )
    wandb_project: str | None = _f(
        None,
        "--logger wandb: project (default $WANDB_PROJECT, else bitrain); offline into RUN/wandb without a W&B login",
    )
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


def _base_type(annotation: str) -> tuple[type, bool]:
    """'int | None' -> (int, True)."""
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    return {"int": int, "float": float, "str": str, "bool": bool}[names[0]], optional
