"""Loader throughput next to the training step it feeds.

1. Device-resident loader at CIFAR shape (50,000 x 3x32x32 random uint8, batch 128, pad-4 crop +
   flip, normalise) vs. a ResNet-18 (bitrain's resnet18_v1) training step at the same batch; the
   ratio must stay far above 1 (target >= 20) for the loader never to be the bottleneck.
2. Image-folder loader: generated JPEGs, 224x224, medium augmentation, samples/sec per worker.

    python benchmarks/bench_loader.py [--device cuda] [--bits 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bitrain.data.imagefolder import build_imagefolder
from bitrain.data.loader import DeviceLoader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device_loader(device: torch.device, n: int, batch: int, epochs: int, channels_last: bool) -> float:
    """Samples/sec of full train epochs (the first one, with its plan upload, is warm-up)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = DeviceLoader(
        images,
        labels,
        batch_size=batch,
        train=True,
        pad=4,
        flip=True,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010),
        channels_last=channels_last,
    )
    acc = torch.zeros((), device=device)
    for x, _ in loader:  # warm-up epoch
        acc += x[0, 0, 0, 0]
    _sync(device)
    t0 = time.perf_counter()
    for e in range(1, epochs + 1):
        loader.set_epoch(e)
        for x, _ in loader:
            acc += x[0, 0, 0, 0]  # consume without a host sync
    _sync(device)
    return epochs * loader.num_samples / (time.perf_counter() - t0)


def bench_train_step(device: torch.device, batch: int, steps: int, bits: int, channels_last: bool) -> float:
    """Samples/sec of forward + backward + SGD step of resnet18_v1 at CIFAR shape."""
    from bitrain.models import build_model

    model = build_model("resnet18_v1", num_classes=10, in_channels=3, image_size=32, bits=bits, bits_a=bits).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(max(2, steps // 5)):  # warm-up (cudnn autotune, allocator)
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def bench_imagefolder(device: torch.device, workers: int, n_images: int, batch: int) -> float:
    """Samples/sec of one train epoch over generated 500x375 JPEGs, 224 px, medium augmentation."""
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in range(4):
                d = os.path.join(root, split, f"c{c}")
                os.makedirs(d)
                for i in range(n_images // 4 if split == "train" else 1):
                    # smooth content compresses like a photo, unlike white noise
                    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                    img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
                    img.save(os.path.join(d, f"{i}.jpg"), quality=90)
        train, _, _ = build_imagefolder(
            "imagefolder",
            data_dir=root,
            batch_size=batch,
            device=device,
            seed=0,
            rank=0,
            world_size=1,
            num_workers=workers,
            augmentation="medium",
            dtype=torch.float32,
            channels_last=False,
            image_size=224,
        )
        train.set_epoch(0)
        for _ in train:  # warm-up: worker start, file cache
            pass
        train.set_epoch(1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in train:
            pass
        _sync(device)
        return train.num_samples / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=32, help="resnet18_v1 bits (32: float, 1: binary)")
    ap.add_argument("--loader-epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=50_000, help="in-memory images (default 50000: CIFAR's train split)")
    ap.add_argument("--steps", type=int, default=None, help="timed train steps (default 50 GPU, 3 CPU)")
    ap.add_argument("--workers", type=int, default=2, help="image-folder decoding workers")
    ap.add_argument("--images", type=int, default=256, help="generated JPEGs for the image-folder run (>= 32)")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (50 if device.type == "cuda" else 3)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    loader_sps = bench_device_loader(device, args.samples, args.batch_size, args.loader_epochs, args.channels_last)
    print(
        f"device loader ({args.samples} x 3x32x32, batch {args.batch_size}, crop+flip): {loader_sps:,.0f} samples/sec"
    )
    step_sps = bench_train_step(device, args.batch_size, steps, args.bits, args.channels_last)
    print(f"train step resnet18_v1 {args.bits}-bit (batch {args.batch_size}): {step_sps:,.0f} samples/sec")
    print(f"ratio loader/step: {loader_sps / step_sps:.1f}")

    for workers in sorted({0, args.workers}):
        sps = bench_imagefolder(device, workers, args.images, 32)
        per = sps / max(1, workers)
        label = "main process" if workers == 0 else f"{workers} workers"
        print(f"imagefolder 224 medium ({label}): {sps:,.1f} samples/sec, {per:,.1f} per worker")


if __name__ == "__main__":
    main()
