"""``bitrain predict MODEL IMAGE...|DIR``: the top-k classes of each image, with their probabilities.

MODEL is anything ``bitrain eval`` reads (a checkpoint, a run directory, a run's model.safetensors, a
packed 1-bit export), loaded through ``cli/reader.py``: a packed export runs its packed layers. Each
image goes through the validation transform of the data set the model was trained on (its recorded
config, else ``--dataset``):

- image folders (imagenet, imagefolder): ``imagefolder.transform`` as validation does it (short side
  to ceil(size / 0.875), centre crop), RGB, ImageNet mean/std;
- the in-memory sets (digits, mnist, fashion-mnist, cifar10/100, dummy): validation takes their
  images as they are, so an image of the model's size is used pixel for pixel; another size is
  scaled (short side) and centre-cropped to it first. Grayscale for 1-channel models.

Class names come from the data set's record (``data/sets.py``); an image folder's are its
``train/<class>`` folder names, read from its data folder when that is there; else class indices.
A folder argument is walked recursively in sorted order for the image folders' file extensions.
Bad inputs (missing, not an image, corrupt) get one line on stderr each and the rest go on.
Exit codes: 0 every image predicted; 1 some inputs could not be read (the others are printed);
2 bad usage, an unreadable model, or not one image readable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bitrain import console
from bitrain.cli.args import PROG
from bitrain.cli.reader import ENGINE_HELP, ENGINES, load_model
from bitrain.data.imagefolder import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, class_folders, transform
from bitrain.data.loader import normalize_affine, normalize_batch
from bitrain.data.sets import DATA_SETS
from bitrain.deploy.memory import keep_freed_memory_on
from bitrain.errors import UserError


def image_files(inputs: Sequence[str | Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image paths, [(input, why it gives none)]): files as given; a folder's files with an image
    extension, recursively, sorted by path. A missing path or an image-less folder is an error."""
    files: list[str] = []
    bad: list[tuple[str, str]] = []
    for arg in map(str, inputs):
        if os.path.isdir(arg):
            found = []
            for dirpath, dirnames, filenames in os.walk(arg, followlinks=True):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
            files += sorted(found)
            if not found:
                bad.append((arg, f"a folder without image files ({', '.join(IMAGE_EXTENSIONS)})"))
        elif os.path.isfile(arg):
            files.append(arg)
        else:
            bad.append((arg, "no such file or folder"))
    return files, bad


class Predictor:
    """A trained model with the validation transform and class names of its data set."""

    def __init__(
        self,
        path: str | Path,
        *,
        dataset: str | None = None,
        data_dir: str | None = None,
        device: str | torch.device = "cpu",
        engine: str | None = None,
    ) -> None:
        model, margs, config, _, source = load_model(path, engine)
        self.source, self.model_name = source, str(margs.get("name"))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        name = dataset or config.get("dataset")
        if not name:
            raise UserError(
                f"{source} does not record its data set (no training config with it); "
                f"pass --dataset ({', '.join(DATA_SETS)})"
            )
        if name not in DATA_SETS:
            raise UserError(f"unknown --dataset {name!r}; valid: {', '.join(DATA_SETS)}")
        self.dataset, spec = str(name), DATA_SETS[name]
        self.folder = spec.folder
        self.channels = int(margs.get("in_channels", 3))
        self.size = int(margs.get("image_size") or config.get("image_size") or 224)
        self.num_classes = int(margs["num_classes"])
        if self.channels not in (1, 3):
            raise UserError(f"{source}: the model takes {self.channels}-channel images; predict reads grayscale or RGB")
        if self.folder:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        elif spec.mean is None:  # dummy: the same level for every channel
            from bitrain.data.build import DUMMY_MEAN, DUMMY_STD

            mean, std = (DUMMY_MEAN,) * self.channels, (DUMMY_STD,) * self.channels
        else:
            mean, std = spec.mean, spec.std
        if len(mean) != self.channels:
            raise UserError(
                f"--dataset {name} has {len(mean)}-channel images, the model takes {self.channels}; "
                "predict with the data set it was trained on"
            )
        self.scale, self.shift = normalize_affine(mean, std, self.device)
        self.classes, self.note = self._class_names(spec, data_dir or config.get("data_dir"))

    def _class_names(self, spec: Any, data_dir: str | None) -> tuple[list[str] | None, str | None]:
        names, where = list(spec.classes), f"the {spec.name} record"
        if not names and spec.folder:
            folder = Path(data_dir).expanduser() / "train" if data_dir else None
            if folder is None or not folder.is_dir():
                return None, f"class names: {folder or 'the data folder'} is not there (pass --data-dir); indices only"
            names, where = class_folders(folder), str(folder)
        if names and len(names) != self.num_classes:
            return None, f"class names: {where} has {len(names)}, the model {self.num_classes} classes; indices only"
        return names or None, None

    def read(self, path: str) -> np.ndarray:
        """One image as the model's uint8 (C, S, S) input before normalisation; raises on a bad file."""
        if self.folder:
            a = transform(path, self.size, "none", None)
        else:
            from PIL import Image, ImageOps

            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                if img.size != (self.size, self.size):
                    img = ImageOps.fit(img, (self.size, self.size), Image.BILINEAR)
                a = np.asarray(img)
        return (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """Softmax over the classes (float32, on the CPU) of a uint8 (B, C, S, S) batch."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        logits = self.model(normalize_batch(x, self.scale, self.shift, torch.float32, False))
        return logits.float().softmax(dim=1).cpu()

    def top(self, images: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Per image its ``k`` most probable classes, most probable first: ``{"class", "index", "prob"}``
        (``class`` is None where the names are not known)."""
        p, i = self.probabilities(images).topk(min(k, self.num_classes), dim=1)
        return [
            [{"class": self.classes[j] if self.classes else None, "index": j, "prob": q} for q, j in zip(ps, js)]
            for ps, js in zip(p.tolist(), i.tolist())
        ]


def _reason(e: Exception, path: str) -> str:
    why = str(e).replace(repr(path), "").replace(path, "")  # the line names the file once
    return "unreadable image (" + " ".join(f"{type(e).__name__}: {why}".split())[:200] + ")"


def predict_files(
    predictor: Predictor,
    paths: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    on_error: Callable[[str, str], None] = lambda path, why: None,
) -> Iterator[dict[str, Any]]:
    """``{"path", "top"}`` per readable image of ``paths``, in order, ``batch_size`` images per forward;
    ``on_error(path, why)`` for each file that does not decode."""
    for lo in range(0, len(paths), batch_size):
        good, arrays = [], []
        for path in paths[lo : lo + batch_size]:
            try:
                arrays.append(predictor.read(path))
                good.append(path)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                on_error(path, _reason(e, path))
        if arrays:
            yield from ({"path": p, "top": t} for p, t in zip(good, predictor.top(np.stack(arrays), top_k)))


def _line(result: dict[str, Any]) -> str:
    top = " | ".join(
        f"{c['class'] if c['class'] is not None else '#' + str(c['index'])} {c['prob']:.4f}" for c in result["top"]
    )
    return f"{result['path']}: {top}"


def main(argv: Sequence[str]) -> int:
    """``bitrain predict MODEL IMAGE...|DIR [--top-k 5] [--json] [--batch-size N] [--cpu]``."""
    from bitrain.cli.args import ArgParser
    from bitrain.cli.train import select_device

    p = ArgParser(
        prog=f"{PROG} predict",
        description="Top-k classes of images (files or folders) by a checkpoint, a run's model.safetensors, "
        "a packed export or a run directory, through the validation transform of its data set.",
    )
    p.add_argument(
        "model", help="checkpoint .pt, model.safetensors, packed export, .xml/.onnx export, or run directory"
    )
    p.add_argument("images", nargs="+", help="image files and/or folders (walked recursively)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON document: predictions and errors")
    p.add_argument("--dataset", help="data set of the model (default: the one it was trained on)")
    p.add_argument("--data-dir", "--data-path", dest="data_dir", help="image folder data set: its class names")
    p.add_argument("--cpu", action="store_true", help="predict on the CPU")
    p.add_argument("--gpus", help="GPU id to use, e.g. 0 (default: GPU 0 if present)")
    p.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    ns = p.parse_args(list(argv))
    for flag, value in (("--top-k", ns.top_k), ("--batch-size", ns.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    device = select_device(SimpleNamespace(cpu=ns.cpu, gpus=ns.gpus))
    keep_freed_memory_on(device)  # inference only: the activations' memory is reused between batches
    predictor = Predictor(ns.model, dataset=ns.dataset, data_dir=ns.data_dir, device=device, engine=ns.engine)
    if predictor.note:
        print(f"{PROG} predict: {predictor.note}", file=sys.stderr)
    errors: list[dict[str, str]] = []

    def skip(path: str, why: str) -> None:
        errors.append({"path": path, "error": why})
        print(f"{PROG} predict: skipping {path}: {why}", file=sys.stderr, flush=True)

    paths, bad = image_files(ns.images)
    for path, why in bad:
        skip(path, why)
    results = predict_files(predictor, paths, top_k=ns.top_k, batch_size=ns.batch_size, on_error=skip)
    predictions = []
    batches = -(-len(paths) // ns.batch_size)
    for r in results if ns.json or batches < 2 else console.progress(results, "predict", total=len(paths)):
        predictions.append(r)
        if not ns.json:
            print(_line(r), flush=True)
    if ns.json:
        doc = {
            "model": predictor.model_name,
            "source": str(predictor.source),
            "dataset": predictor.dataset,
            "predictions": predictions,
            "errors": errors,
        }
        print(json.dumps(doc))
    if not predictions:
        print(f"{PROG}: error: none of the {len(paths) + len(bad)} inputs held a readable image", file=sys.stderr)
        return 2
    if errors:
        n, m = len(predictions), len(errors)
        print(
            f"{PROG} predict: {n} image{'s' * (n != 1)} predicted, {m} input{'s' * (m != 1)} skipped", file=sys.stderr
        )
        return 1
    return 0
