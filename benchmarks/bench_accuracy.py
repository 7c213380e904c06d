"""Accuracy benchmark: run packaged recipes with ``bitrain train --config NAME`` and print one table.

    python benchmarks/bench_accuracy.py [RECIPE...] [--out DIR] [--extra "--epochs 2"] [--reuse]

For each recipe: model, bits (weights/activations), trainable parameters, model size (1-bit weights at
1/32), share of binary MACs, epochs, wall time, best and final val top-1, and the published figure
beside it. Without RECIPE it runs the ones whose data is on this machine (digits, mnist and
fashion-mnist when their files are found). Each run is a real ``bitrain train`` process; its run
directory stays in ``--out`` (default ``runs/bench-accuracy``) for ``bitrain eval`` / ``bitrain plot``;
``--reuse`` tabulates finished run directories there instead of training again (wall time from the
first to the last line of their train.log).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

# the published figure each recipe is measured against (REFERENCE.md §3)
PUBLISHED = {
    "digits": "none (smoke run; target >= 97 %)",
    "mnist": "binary LeNet-class nets about 98-99 %",
    "fashion_mnist": "binary CBCNN 92.86 % (0.48 M params); float ResNet-18 94.9 %",
    "fashion_mnist_float": "float ResNet-18 94.9 %; best float about 96.9 %",
    "fashion_mnist_distilled": "binary CBCNN 92.86 %",
    "cifar10_resnet18": "BMXNet ResNet-18 binary 87.9 %, its recipe about 90 %",
    "imagenet_resnete18": "BMXNet ResNetE-18 60.0-60.6 %",
    "imagenet_densenet28": "BMXNet BinaryDenseNet-28 61.7-62.6 %",
    "imagenet_meliusnet22": "BMXNet MeliusNet-22 62.9-63.6 %",
}


def _available(recipe: str) -> bool:
    """Whether the recipe's data is on this machine (so the default set runs without downloads)."""
    from bitrain.cli.config import load_yaml

    dataset = load_yaml(recipe).get("dataset", "digits")
    if dataset == "digits":
        return True
    if dataset in ("mnist", "fashion-mnist"):
        from bitrain.data.cache import default_data_dir, find_file
        from bitrain.data.mnist import FILES, SUBDIRS, SYSTEM_DIRS

        root = default_data_dir()
        folders = (root, root / SUBDIRS[dataset], *SYSTEM_DIRS[dataset])
        return any((f / f"bitrain-{dataset}.npz").is_file() or all(find_file(f, n) for n in FILES) for f in folders)
    return False


def _row(recipe: str, run_dir: Path, seconds: float) -> dict[str, str]:
    from bitrain.binary.summary import summarize
    from bitrain.cli.reader import load_model

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        val = [float(r["acc1"]) for r in csv.DictReader(f) if r["split"] == "val"]
    loaded = load_model(run_dir / "model.safetensors")
    a = loaded.model_args
    s = summarize(loaded.model, (a["in_channels"], a["image_size"], a["image_size"]))
    trainable = sum(p.numel() for p in loaded.model.parameters())
    return {
        "recipe": recipe,
        "model": str(cfg["model"]),
        "bits W/A": f"{cfg['bits']}/{cfg['bits_a']}",
        "params": f"{trainable / 1e6:.2f}M",
        "size": f"{s.size_bytes / 2**20:.2f} MiB",
        "binary MACs": f"{100 * s.binary_mac_share:.1f} %",
        "epochs": str(len(val)),
        "wall": f"{seconds / 60:.1f} min",
        "best val": f"{100 * max(val):.2f} %",
        "final val": f"{100 * val[-1]:.2f} %",
        "published": PUBLISHED.get(recipe, "-"),
    }


def _logged_seconds(log: Path) -> float:
    """Seconds from the first to the last line of a run's train.log (its lines start with asctime)."""
    stamps = [line[:23] for line in log.read_text(encoding="utf-8").splitlines() if line[:4].isdigit()]
    first, last = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def main(argv: list[str] | None = None) -> int:
    from bitrain.cli.config import list_recipes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", help=f"recipes (default: those with data here); all: {list_recipes()}")
    p.add_argument("--out", default="runs/bench-accuracy", help="folder for the run directories")
    p.add_argument("--extra", default="", help="more bitrain train flags for every run, e.g. '--epochs 2'")
    p.add_argument("--reuse", action="store_true", help="tabulate the finished runs in --out, train nothing")
    ns = p.parse_args(argv)
    recipes = ns.recipes or [r for r in list_recipes() if _available(r)]
    rows = []
    for recipe in recipes:
        run_dir = Path(ns.out) / recipe
        if ns.reuse:
            rows.append(_row(recipe, run_dir, _logged_seconds(run_dir / "train.log")))
            continue
        cmd = [sys.executable, "-m", "bitrain", "train", "--config", recipe, "--prefix", str(run_dir), "--overwrite"]
        cmd += shlex.split(ns.extra)
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"bench_accuracy: {recipe} exited {rc}", file=sys.stderr)
            return rc
        rows.append(_row(recipe, run_dir, time.perf_counter() - t0))
    if rows:
        keys = list(rows[0])
        widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
        print("| " + " | ".join(k.ljust(widths[k]) for k in keys) + " |")
        print("|" + "|".join("-" * (widths[k] + 2) for k in keys) + "|")
        for r in rows:
            print("| " + " | ".join(r[k].ljust(widths[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
