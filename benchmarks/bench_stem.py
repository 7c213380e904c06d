"""The ImageNet stem at inference, side by side: module order against pool first (``deploy.swaps``).

    python benchmarks/bench_stem.py [--threads 2] [--rounds 30]

resnet18_e1's stem (input BatchNorm, 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool) after
``channels_last_stem``, with BatchNorm weights of both signs, at batch 1 and 16: the two orders
interleaved round by round in one process, the median ms of each, their ratio, and whether the two
outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitrain.deploy.memory import keep_freed_memory
from bitrain.deploy.swaps import channels_last_stem
from bitrain.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(name="resnet18_e1", num_classes=1000, in_channels=3, image_size=224).eval()
    with torch.no_grad():  # trained stems have BatchNorm weights of both signs
        model.features[2].weight.copy_(torch.randn(64))
        model.features[2].running_var.uniform_(0.5, 1.5)
    channels_last_stem(model)
    stem, conv = model.features[:5], model.features[1]
    plan = conv.pool_first
    print(f"stem of resnet18_e1, 224 px, {args.threads} threads, {args.rounds} rounds, median ms per batch")
    for batch, reps in ((1, 20), (16, 2)):
        x = torch.randn(batch, 3, 224, 224)
        times: dict[str, list[float]] = {"module order": [], "pool first": []}
        outs = {}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, ms in times.items():
                    conv.__dict__["pool_first"] = plan if name == "pool first" else None
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        outs[name] = stem(x)
                    ms.append((time.perf_counter() - t0) / reps * 1e3)
        conv.__dict__["pool_first"] = plan
        a, b = (statistics.median(v) for v in times.values())
        same = torch.equal(outs["module order"], outs["pool first"])
        print(f"batch {batch}: module order {a:.3f}, pool first {b:.3f}, ratio {a / b:.2f}x, bit-identical: {same}")


if __name__ == "__main__":
    main()
