"""``bitrain eval``: top-1, top-5 and mean loss of a trained model on a data set split.

Accepts a training checkpoint (``*.pt``, loaded weights-only and checksum-verified), the run's
final float weights (``model.safetensors``), a packed 1-bit export (``bitrain export``), or a run
directory (its ``checkpoints/best.pt``, else ``last.pt``, else ``model.safetensors``).
The data pipeline is the training one: same data set reader, normalisation and validation
transform; ``--split train`` reads the train split in fixed order without augmentation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bitrain import console
from bitrain.cli.reader import ENGINE_HELP, ENGINES, load_model
from bitrain.cli.train import select_device
from bitrain.data.sets import DATA_SETS
from bitrain.deploy.memory import keep_freed_memory_on
from bitrain.errors import UserError
from bitrain.names import DTYPES
from bitrain.train.evaluation import autocast_dtype

SPLITS = ("val", "train")
# options of the checkpoint's training config that select and shape the data
_DATA_KEYS = (
    "dataset",
    "data_dir",
    "dummy_shape",
    "dummy_classes",
    "dummy_size",
    "image_size",
    "num_workers",
    "batch_size",
    "seed",
)


def eval_loader(loader: Any, info: Any, *, batch_size: int, num_workers: int = 0) -> Any:
    """A fixed-order, augmentation-free loader over the samples of ``loader`` (train or val)."""
    from bitrain.data.loader import DeviceLoader

    if isinstance(loader, DeviceLoader):
        # built with augmentation "none": images hold the raw, unpadded uint8 samples
        return DeviceLoader(
            loader.images,
            loader.labels,
            batch_size=batch_size,
            train=False,
            mean=info.mean,
            std=info.std,
            dtype=loader.dtype,
        )
    from bitrain.data.imagefolder import ImageFolderDataset, ImageFolderLoader

    if isinstance(loader, ImageFolderLoader):
        ds = loader.dataset
        fixed = ImageFolderDataset(ds.paths, ds.labels, size=ds.size, augmentation="none", train=False, seed=ds.seed)
        return ImageFolderLoader(
            fixed,
            batch_size=batch_size,
            device=loader.device,
            seed=ds.seed,
            rank=0,
            world_size=1,
            num_workers=num_workers,
            dtype=loader.dtype,
            channels_last=False,
        )
    raise TypeError(f"eval_loader: unsupported loader type {type(loader).__name__}")


def _data_options(model_args: dict, config: dict, overrides: dict) -> dict[str, Any]:
    opts = {k: config[k] for k in _DATA_KEYS if config.get(k) is not None}
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if "dataset" not in opts:
        raise UserError(
            "this file does not record its data set (no training config next to it); "
            "pass --dataset (digits, dummy, mnist, fashion-mnist, cifar10, cifar100, imagenet, imagefolder)"
        )
    if opts["dataset"] == "dummy" and "dummy_shape" not in opts:  # an export alone: the model's input shape
        size = model_args.get("image_size", 32)
        opts["dummy_shape"] = f"{model_args.get('in_channels', 3)},{size},{size}"
        opts.setdefault("dummy_classes", model_args.get("num_classes", 10))
    if opts["dataset"] in DATA_SETS and DATA_SETS[opts["dataset"]].folder:
        opts.setdefault("image_size", model_args.get("image_size", 224))
    return opts


def _check_fits(model_args: dict, info: Any, dataset: str) -> None:
    for key, have in (
        ("num_classes", info.num_classes),
        ("in_channels", info.in_channels),
        ("image_size", info.image_size),
    ):
        want = model_args.get(key)
        if want is not None and want != have:
            raise UserError(
                f"--dataset {dataset}: the model was built for {key}={want}, the data set has "
                f"{key}={have}; evaluate on the data set it was trained on"
            )


def evaluate_file(
    path: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "val",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    engine: str | None = None,
) -> dict[str, Any]:
    """Top-1/top-5/loss of the model in ``path`` on ``split`` of its data set (or ``dataset``).

    Returns ``{"acc1", "acc5", "loss", "samples", "split", "dataset", "model", "source"}``;
    accuracies are fractions in [0, 1], the loss is the mean cross-entropy per sample.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not valid; choose from: {', '.join(SPLITS)}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    model, margs, config, _, source = load_model(path, engine)
    opts = _data_options(margs, config, {"dataset": dataset, "data_dir": data_dir, "num_workers": num_workers})
    bs = int(batch_size or opts.get("batch_size") or 128)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from bitrain.cli.config import parse_ints
    from bitrain.data import build_data
    from bitrain.train.evaluation import evaluate

    name = str(opts["dataset"])
    workers = int(opts.get("num_workers", 0))
    # batch size 1 here: these loaders only supply the samples (a train-split check must not fire)
    train, val, info = build_data(
        name,
        data_dir=opts.get("data_dir"),
        batch_size=1,
        device=dev,
        seed=int(opts.get("seed", 123)),
        num_workers=workers,
        augmentation="none",
        dummy_shape=tuple(parse_ints("dummy_shape", opts.get("dummy_shape", "3,32,32"))),
        dummy_classes=int(opts.get("dummy_classes", 10)),
        dummy_size=int(opts.get("dummy_size", 1024)),
        **({"image_size": int(opts["image_size"])} if name in DATA_SETS and DATA_SETS[name].folder else {}),
    )
    _check_fits(margs, info, name)
    loader = eval_loader(train if split == "train" else val, info, batch_size=bs, num_workers=workers)
    loader.set_epoch(0)
    model = model.to(dev)
    batches = console.progress(loader, f"eval {split}") if progress else loader
    m = evaluate(model, batches, device=dev, amp_dtype=amp_dtype)
    return {**m, "split": split, "dataset": name, "model": margs.get("name"), "source": str(source)}


def main(argv: Sequence[str]) -> int:
    """``bitrain eval CHECKPOINT [--dataset D] [--data-dir DIR] [--split val|train] [--batch-size N]``."""
    from bitrain.cli.args import ArgParser

    p = ArgParser(
        prog="bitrain eval",
        description="Top-1, top-5 and loss of a checkpoint, a run's "
        "model.safetensors, a packed export or a run directory, on the validation (or train) split.",
    )
    p.add_argument(
        "checkpoint", help="checkpoint .pt, model.safetensors, packed export, .xml/.onnx export, or run directory"
    )
    p.add_argument("--dataset", help="data set (default: the one the model was trained on)")
    p.add_argument("--data-dir", "--data-path", dest="data_dir", help="data set folder")
    p.add_argument("--split", default="val", choices=SPLITS, help="split to evaluate (train: no augmentation)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the training one)")
    p.add_argument(
        "-j",
        "--num-worker",
        "--num-workers",
        dest="num_workers",
        type=int,
        help="loader worker processes (image folders)",
    )
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (autocast)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU")
    p.add_argument("--gpus", help="GPU id to use, e.g. 0 (default: GPU 0 if present)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    ns = p.parse_args(list(argv))
    device = select_device(SimpleNamespace(cpu=ns.cpu, gpus=ns.gpus))
    keep_freed_memory_on(device)  # inference only: the activations' memory is reused between batches
    amp = autocast_dtype(ns.dtype)
    r = evaluate_file(
        ns.checkpoint,
        dataset=ns.dataset,
        data_dir=ns.data_dir,
        split=ns.split,
        batch_size=ns.batch_size,
        device=device,
        amp_dtype=amp,
        num_workers=ns.num_workers,
        progress=True,
        engine=ns.engine,
    )
    if ns.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['source']}: {r['model']} on {r['dataset']} {r['split']} ({r['samples']} images): "
            f"top-1 {r['acc1']:.4f}  top-5 {r['acc5']:.4f}  loss {r['loss']:.4f}"
        )
    return 0
