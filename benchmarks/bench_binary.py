"""Binary vs float training speed of a ResNetE-18-width network at 32x32 (a program, not a test).

    python benchmarks/bench_binary.py [--device cpu|cuda] [--batch-size 32] [--steps 4] [--rounds 3]

Builds the same architecture twice, bits = bits_a = 32 (float) and 1 (binary), and times
training steps (forward, loss, backward, SGD step; the binary run also clamps its latent
weights, as a real binary run does) interleaved A/B/A/B after a warm-up, so drift of the
machine hits both alike. Prints samples/sec of each and ``ratio binary/float: X.XX``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary.layers import QConv2d, binary_layer_config, clip_latent_weights_


class _BlockE(nn.Module):
    # ResNetE basic block: BN -> binary 3x3 conv with a shortcut around every conv
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), QConv2d(c_in, c_out, 3, stride, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), QConv2d(c_out, c_out, 3, 1, 1)
        self.down = None
        if stride != 1 or c_in != c_out:  # full-precision downsample: avg-pool + 1x1 conv (ResNetE)
            self.down = nn.Sequential(
                nn.AvgPool2d(stride), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        sc = x if self.down is None else self.down(x)
        x = self.conv1(self.bn1(x)) + sc
        return self.conv2(self.bn2(x)) + x


def _fallback_resnet_e18(bits: int, num_classes: int) -> nn.Module:
    """ResNetE-18 shape (thumbnail stem, [2, 2, 2, 2] blocks at 64-512 channels) from QConv2d."""
    with binary_layer_config(bits=bits, bits_a=bits):
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False)]
        c = 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(_BlockE(c, width, 2 if i > 0 and j == 0 else 1))
                c = width
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        return nn.Sequential(*layers)


def build(bits: int, num_classes: int = 10) -> tuple[nn.Module, str]:
    """resnet18_e1 from the model zoo when it exists, else the benchmark's own ResNetE-18."""
    try:
        from bitrain.models import build_model

        return build_model("resnet18_e1", num_classes=num_classes, image_size=32, bits=bits, bits_a=bits), "resnet18_e1"
    except (ImportError, KeyError, ValueError):
        return _fallback_resnet_e18(bits, num_classes), "fallback ResNetE-18"


def run_steps(model, opt, x, y, steps: int, binary: bool, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``steps`` training steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if binary:
            clip_latent_weights_(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> float:
    """Run the benchmark, print samples/sec and the ratio; returns binary/float."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4, help="A/B rounds after the warm-up")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: leave as is)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument(
        "--backend", default="inductor", help="torch.compile backend (default inductor; aot_eager: no code generation)"
    )
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    runs = {}
    for name, bits in (("float", 32), ("binary", 1)):
        model, arch = build(bits)
        model = model.to(device, memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fwd = torch.compile(model, backend=args.backend) if args.compile else model
        run_steps(fwd, opt, x, y, args.warmup, bits == 1, device)
        runs[name] = (fwd, opt, bits == 1, [])
    print(
        f"{arch}, 32x32, batch {args.batch_size}, {device}, threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds x {args.steps} steps{f' compiled ({args.backend})' if args.compile else ''}"
    )
    for _ in range(args.rounds):  # interleaved A/B/A/B
        for fwd, opt, binary, times in runs.values():
            times.append(run_steps(fwd, opt, x, y, args.steps, binary, device))
    speed, cpu = {}, {}
    for name, (_, _, _, times) in runs.items():
        n = args.steps * args.batch_size
        speed[name] = n / min(t for t, _ in times)  # least-disturbed round
        cpu[name] = n / min(c for _, c in times)
        mean = n * len(times) / sum(t for t, _ in times)
        print(
            f"{name:>6}: {speed[name]:8.1f} samples/sec (best round), {mean:8.1f} (mean), "
            f"{cpu[name]:8.1f} per CPU-second"
        )
    ratio = speed["binary"] / speed["float"]
    # on a machine shared with other jobs the wall clock mostly measures them; the ratio of
    # process CPU time (all threads) is the steadier figure there
    print(f"cpu-time ratio binary/float: {cpu['binary'] / cpu['float']:.2f}")
    print(f"ratio binary/float: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
