"""Why a binary net's validation swings, measured: running BatchNorm statistics against re-estimated ones.

Trains ``tiny_resnet_e`` (binary) at BMXNet's defaults (Adam, lr 0.01, batch 32, step schedule: constant
over these epochs) on a fixed Fashion-MNIST subset (the first 400 train / 100 test images of each class,
4,000 / 1,000) and after every epoch validates the same weights three ways: with the running statistics
(momentum 0.1, what BMXNet reports), with statistics re-estimated over K fixed train batches (what
``--bn-recalibrate K`` does), and with each val batch's own statistics. Prints one row per epoch and
the mean epoch-to-epoch change of each, side by side.

    python benchmarks/bench_bn_validation.py [--epochs 15] [--k 10] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from bitrain import build_model, build_optimizer
from bitrain.data.cache import default_data_dir
from bitrain.data.loader import DeviceLoader
from bitrain.data.mnist import load_mnist
from bitrain.train.evaluation import evaluate, recalibrate_bn
from bitrain.train.options import LoopOptions
from bitrain.train.trainer import Trainer


def _subset(x: np.ndarray, y: np.ndarray, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--k", type=int, default=10, help="re-estimation batches")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: bitrain's search path)")
    ns = p.parse_args(argv)
    torch.manual_seed(123)
    root = default_data_dir() if ns.data_dir is None else Path(ns.data_dir)
    x_tr, y_tr, x_va, y_va = load_mnist("fashion-mnist", root)
    (xt, yt), (xv, yv) = _subset(x_tr, y_tr, 400), _subset(x_va, y_va, 100)
    norm = {"mean": (0.0,), "std": (1.0,)}
    train = DeviceLoader(xt, yt, batch_size=32, train=True, seed=123, **norm)
    val = DeviceLoader(xv, yv, batch_size=32, train=False, **norm)
    model = build_model("tiny_resnet_e", num_classes=10, in_channels=1, image_size=28)
    opt = build_optimizer(model, "adam", lr=0.01)
    trainer = Trainer(model, opt, train, None, epochs=0, options=LoopOptions(log_interval=0))
    rows = []
    print(f"{'epoch':>5} {'running':>8} {'re-est K=' + str(ns.k):>11} {'batch stats':>11} {'re-est s':>9}")
    for epoch in range(ns.epochs):
        trainer.epochs = epoch + 1
        trainer.fit()
        running = evaluate(model, val)["acc1"]
        fresh = copy.deepcopy(model)
        t0 = time.perf_counter()
        train.set_epoch(0)
        recalibrate_bn(fresh, train, ns.k)
        seconds = time.perf_counter() - t0
        recal = evaluate(fresh, val)["acc1"]
        per_batch = copy.deepcopy(model).train()
        with torch.no_grad():
            val.set_epoch(0)
            correct = sum(int((per_batch(x).argmax(1) == y).sum()) for x, y in val)
        rows.append((running, recal, correct / len(yv)))
        print(f"{epoch:>5} {running:>8.4f} {recal:>11.4f} {rows[-1][2]:>11.4f} {seconds:>9.2f}", flush=True)
    a = np.array(rows)
    swing = np.abs(np.diff(a, axis=0)).mean(axis=0) * 100
    print(
        f"mean epoch-to-epoch change, points: running {swing[0]:.1f}, re-estimated {swing[1]:.1f}, "
        f"batch stats {swing[2]:.1f}"
    )
    print(
        f"final: running {a[-1, 0]:.4f}, re-estimated {a[-1, 1]:.4f}; mean shortfall of running "
        f"{(a[:, 1] - a[:, 0]).mean() * 100:.1f} points"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
