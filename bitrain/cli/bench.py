"""``bitrain bench``: the same model, data, batch size and steps through (a) the seed's
hand-written loop, (b) bitrain's Trainer and (c) PyTorch Lightning when it is installed; rounds
interleaved A/B/C/A/B/C after a warm-up, samples/sec as the median over rounds, and the ratios.

The hand-written loop is the seed's zero_grad -> forward -> loss -> backward -> step, with its
running loss kept on the device and read once per log interval (the seed's per-step ``.item()``
would be a host sync per step: the baseline is the fast version of the seed's loop). The Trainer
runs as ``bitrain train`` drives it, minus the callbacks (console, CSV, TensorBoard), so the ratio
is the loop's own overhead: LR schedule, on-device metrics, non-finite tracking, per-epoch
bookkeeping. Each runner trains its own copy of the same initial model with its own optimizer.
``bitrain bench --inference`` is another benchmark with its own options (``bench_inference.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.cli.timing import paired_ratio
from bitrain.errors import UserError
from bitrain.names import DTYPES
from bitrain.train.evaluation import autocast_dtype


class StepLoader:
    """``steps`` batches per epoch from ``loader``, continuing into its next epochs as needed:
    every runner reads the same kind of batches (gather, augment, normalise on the device)."""

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader, self.steps, self.batch_size = loader, steps, loader.batch_size
        self._epoch = 0

    def __len__(self) -> int:
        return self.steps

    @property
    def num_samples(self) -> int:
        return self.steps * self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, inner = 0, self._epoch * self.steps
        while n < self.steps:
            self.loader.set_epoch(inner)
            for batch in self.loader:
                yield batch
                n += 1
                if n == self.steps:
                    return
            inner += 1
        self._epoch += 1


@dataclass
class Runner:
    """One way to train: ``run(steps)`` trains that many steps and returns None (the time is
    measured around it) or its own measure of the steps' seconds (to leave a framework's setup out)."""

    name: str
    run: Callable[[int], float | None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    log_interval: int,
) -> Runner:
    """The seed's loop (running loss read every ``log_interval`` batches), with autocast/GradScaler."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = {"epoch": 0}

    def run(steps: int) -> None:
        model.train()
        batches = StepLoader(loader, steps)
        batches.set_epoch(state["epoch"])
        state["epoch"] += 1
        running = torch.zeros((), device=device)
        for i, (x, y) in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                out = model(x)
                loss = F.cross_entropy(out.float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running += loss.detach()
            if log_interval and i % log_interval == log_interval - 1:
                state["loss"] = running.item() / log_interval  # the seed prints this
                running.zero_()

    return Runner("hand-written", run)


def trainer_runner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    log_interval: int,
    compile: bool,
    channels_last: bool,
    lr: float,
) -> Runner:
    """bitrain's Trainer: one ``fit()`` epoch of ``steps`` batches per call."""
    from bitrain.train.options import LoopOptions, Placement
    from bitrain.train.trainer import Trainer

    holder: dict[str, Any] = {}

    def run(steps: int) -> None:
        if holder.get("steps") != steps:  # one Trainer per epoch length, as in a real run
            holder["steps"] = steps
            holder["t"] = Trainer(
                model,
                optimizer,
                StepLoader(loader, steps),
                None,
                epochs=0,
                schedule=lambda step: lr,
                placement=Placement(device=device, dtype=amp_dtype, compile=compile, channels_last=channels_last),
                options=LoopOptions(log_interval=log_interval),
            )
        t = holder["t"]
        t.epochs = t.state.epoch + 1  # one more epoch
        t.fit()

    return Runner("trainer", run)


def lightning_runner(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    log_interval: int,
) -> Runner | None:
    """PyTorch Lightning's Trainer on the same work, or None when Lightning is not installed.
    Timed from the first batch's start to the last batch's end (its setup and teardown left out)."""
    try:
        import lightning as L
    except ImportError:
        try:
            import pytorch_lightning as L  # type: ignore[no-redef]
        except ImportError:
            return None
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its per-fit banners would bury the figures

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x).float(), y)

        def configure_optimizers(self):
            return optimizer

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                _sync(device)
                state["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == state["steps"] - 1:
                _sync(device)
                state["t1"] = time.perf_counter()

    precision = {None: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[amp_dtype]
    module, state = Module(), {"epoch": 0}

    def run(steps: int) -> None:
        batches = StepLoader(loader, steps)
        batches.set_epoch(state["epoch"])
        state["epoch"] += 1
        state["steps"] = steps
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision=precision,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=log_interval or 50,
            callbacks=[Clock()],
        )
        trainer.fit(module, train_dataloaders=batches)
        return state["t1"] - state["t0"]  # first batch's start to last batch's end (one fetch fewer)

    return Runner("lightning", run)


def measure(
    runners: Sequence[Runner],
    *,
    steps: int,
    rounds: int,
    warmup: int,
    batch_size: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Samples/sec of every runner per round; rounds interleave the runners (A, B, A, B, ...)
    after one warm-up call each (compilation, allocator, caches). ``clock``: wall time, or
    ``time.process_time`` (CPU seconds of this process: on a shared CPU, time spent preempted by
    other processes is left out)."""
    for r in runners:
        r.run(warmup)
    _sync(device)
    speeds: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(rounds):
        for r in runners:
            _sync(device)
            t0 = clock()
            own = r.run(steps)
            _sync(device)
            seconds = own if own is not None else clock() - t0
            speeds[r.name].append(steps * batch_size / seconds)
    return speeds


def _parser() -> argparse.ArgumentParser:
    from bitrain.cli.args import ArgParser

    p = ArgParser(prog="bitrain bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny_resnet_e", help="model name (default: tiny_resnet_e)")
    p.add_argument(
        "--dataset",
        default="digits",
        choices=("digits", "dummy"),
        help="digits (8x8, 1 channel) or dummy (3 x image-size x image-size)",
    )
    p.add_argument("--image-size", type=int, default=32, help="dummy images' side in pixels (default 32)")
    p.add_argument("--bits", type=int, default=1, help="weight bits (32: full precision; default 1)")
    p.add_argument("--bits-a", type=int, default=1, help="activation bits (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per step (default 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per runner per round (default 20)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per runner (default 10)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype (default float32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (every runner)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--optimizer", default="sgd", help="optimizer name as in bitrain train (default sgd)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--log-interval", type=int, default=50, help="batches between loss reads (default 50)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="wall time, or this process's CPU time (steadier on a shared CPU; use with --threads 1)",
    )
    p.add_argument("--seed", type=int, default=123)
    p.add_argument(
        "--inference",
        action="store_true",
        help="race a binary model and its float twin on every inference engine instead (bitrain bench --inference --help)",
    )
    return p


def _check(ns: argparse.Namespace) -> torch.device:
    for name in ("batch_size", "steps", "rounds", "warmup", "image_size"):
        if getattr(ns, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    try:
        device = torch.device(ns.device)
    except RuntimeError:
        raise UserError(f"--device {ns.device!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {ns.device}: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {ns.device!r}: bench runs on cpu or cuda")
    return device


def main(argv: Sequence[str]) -> int:
    """``bitrain bench [options]``: samples/sec per runner and the ratios; ``--inference``: bench_inference."""
    from bitrain.cli import bench_inference

    inference, argv = bench_inference.picked(argv)
    if inference:
        return bench_inference.main(argv)
    ns = _parser().parse_args(argv)
    device = _check(ns)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from bitrain.data import build_data
    from bitrain.models import build_model
    from bitrain.train.optim import build_optimizer

    train, _, info = build_data(
        ns.dataset,
        batch_size=ns.batch_size,
        device=device,
        seed=ns.seed,
        channels_last=ns.channels_last,
        dummy_shape=(3, ns.image_size, ns.image_size),
        dummy_size=max(1024, 4 * ns.batch_size),
    )
    torch.manual_seed(ns.seed)
    base = build_model(
        ns.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size,
        bits=ns.bits,
        bits_a=ns.bits_a,
    ).to(device)
    if ns.channels_last:
        base = base.to(memory_format=torch.channels_last)
    amp = autocast_dtype(ns.dtype)

    def copy_with_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
        m = copy.deepcopy(base)
        return m, build_optimizer(m, ns.optimizer, lr=ns.lr)

    m, o = copy_with_optimizer()
    hand = hand_written(torch.compile(m) if ns.compile else m, o, train, device, amp, ns.log_interval)
    m, o = copy_with_optimizer()
    runners = [hand, trainer_runner(m, o, train, device, amp, ns.log_interval, ns.compile, ns.channels_last, ns.lr)]
    m, o = copy_with_optimizer()
    lit = lightning_runner(torch.compile(m) if ns.compile else m, o, train, device, amp, ns.log_interval)
    if lit is not None:
        runners.append(lit)

    where = (
        f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else torch.cuda.get_device_name(device)
    )
    print(
        f"bitrain bench: {ns.model} ({ns.bits}/{ns.bits_a}-bit) on {ns.dataset} {info.in_channels}x{info.image_size}"
        f"x{info.image_size}, batch {ns.batch_size}, {ns.dtype}{', channels_last' if ns.channels_last else ''}"
        f"{', compiled' if ns.compile else ''}, {where}; {ns.rounds} rounds x {ns.steps} steps after "
        f"{ns.warmup} warm-up steps{'' if lit else '; Lightning not installed'}",
        flush=True,
    )
    clock = time.process_time if ns.clock == "cpu" else time.perf_counter
    if ns.clock == "cpu" and device.type != "cpu":
        raise UserError("--clock cpu measures CPU time: use it with --device cpu")
    speeds = measure(
        runners,
        steps=ns.steps,
        rounds=ns.rounds,
        warmup=ns.warmup,
        batch_size=ns.batch_size,
        device=device,
        clock=clock,
    )
    _report(speeds)
    return 0


def _report(speeds: dict[str, list[float]]) -> None:
    for name, v in speeds.items():
        med = statistics.median(v)
        print(f"{name:<13} {med:10.1f} samples/sec (median of {len(v)}; min {min(v):.1f}, max {max(v):.1f})")
    for a, b in (("trainer", "hand-written"), ("trainer", "lightning"), ("lightning", "hand-written")):
        if a in speeds and b in speeds:
            print(f"ratio {a}/{b}: {paired_ratio(speeds[a], speeds[b]):.2f}")
