"""``bitrain bench --inference``: a binary model on every engine, each in its own process, in interleaved rounds.

The engines (``race_worker.ENGINES``): the binary model on bitrain's packed engine (numba), on OpenVINO
(bitrain's IR, every 1-bit conv a BinaryConvolution) and as the training-time float-latent model in torch
eager; its float twin (the same network at ``bits=32, bits_a=32``: float weights and activations, float
ops) in torch eager, onnxruntime and OpenVINO at f32 and at OpenVINO's default precision. The model has
random weights with BatchNorm statistics estimated on noise images (or ``--checkpoint``: the binary model;
its float twin is random, calibrated the same way). An engine whose package is missing or whose export
refuses the model is skipped, with the reason. Before the timing every engine runs the same batch: its
argmax and logits are compared with the packed engine's (binary engines) or torch's float twin's (float
engines). The race itself: ``race.py``; the report: ``race_report.py``; ``--layers``: ``bench_layers.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from bitrain.cli.args import ArgParser
from bitrain.cli.race_worker import ENGINES
from bitrain.errors import UserError, parse_list
from bitrain.names import PACKED_KERNELS

_QUANT_ARGS = ("activation_method", "weight_quantization", "clip_threshold", "approximation")


def picked(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether ``bitrain bench``'s arguments pick this benchmark with ``--inference``, the arguments
    without that flag): its options are this module's own, not the training-loop benchmark's."""
    picker = ArgParser(prog="bitrain bench", add_help=False)
    picker.add_argument("--inference", action="store_true")
    ns, rest = picker.parse_known_args(list(argv))
    return ns.inference, rest


def _parser() -> ArgParser:
    p = ArgParser(prog="bitrain bench --inference", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18_e1", help="model name (default: resnet18_e1)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint, run directory or model.safetensors instead")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes (default 1000)")
    p.add_argument("--batch-size", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds per batch size (default 10)")
    p.add_argument(
        "--engines", default="all", help=f"comma-separated engines to race (default all: {', '.join(ENGINES)})"
    )
    p.add_argument(
        "--slice-ms",
        type=float,
        default=200.0,
        help="an engine's turn in a round: whole batches for about this long, at least one (default 200)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="batches per engine and batch size before the rounds (default 3): the first gives the logits the "
        "engines are compared on, the least time of the others fixes the engine's batches per turn",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    p.add_argument("--layers", action="store_true", help="also time each binary layer alone (in this process)")
    p.add_argument("--kernel", default="auto", choices=PACKED_KERNELS, help="packed kernel (default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per engine (default: the CPUs this may use)")
    p.add_argument(
        "--clock", default="wall", choices=("wall", "cpu"), help="wall time or the engine process's CPU time"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--allocator",
        default="keep",
        choices=("keep", "system"),
        help="keep: freed memory stays in each engine's process (default); system: the allocator as it is",
    )
    return p


def _calibrated(args: dict, seed: int) -> nn.Module:
    """``build_model(**args)`` with random weights, its BatchNorm statistics estimated on noise images and
    random affine terms (so every BatchNorm shifts and scales, and the signs are balanced); eval mode."""
    from bitrain.models import build_model

    torch.manual_seed(seed)
    model = build_model(**args)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, args.get("in_channels", 3), args["image_size"], args["image_size"]))
        for m in norms:
            if m.affine:  # non-trivial affine terms, a few negative scales among them
                m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
            m.momentum = 0.1
    return model.eval()


def _binary_model(ns) -> tuple[nn.Module, dict]:
    """(the binary model in eval mode, its build_model kwargs): the checkpoint's, or a calibrated random one."""
    if ns.checkpoint:
        from bitrain.cli.reader import load_model

        loaded = load_model(ns.checkpoint)
        kind = type(loaded.model).__name__
        if kind in ("OpenVINOModel", "OnnxModel") or any(
            type(m).__name__ == "PackedQLayer" for m in loaded.model.modules()
        ):
            raise UserError(f"--checkpoint {ns.checkpoint} is an export; give the checkpoint it came from")
        return loaded.model.eval(), dict(loaded.model_args)
    args = dict(name=ns.model, num_classes=ns.num_classes, in_channels=ns.in_channels, image_size=ns.image_size, bits=1)
    return _calibrated(args, ns.seed), args


def float_twin_args(args: dict) -> dict:
    """The float twin's build_model kwargs: the binary model's at 32 bits, the quantizers' defaults."""
    return {**{k: v for k, v in args.items() if k not in _QUANT_ARGS}, "bits": 32, "bits_a": 32}


def _sizes(float_model: nn.Module, export: dict, path: Path) -> str:
    from bitrain.binary.layers import binary_layers

    weights = sum(m.weight.numel() for m in binary_layers(float_model))
    packed_bytes = sum(m.weight.shape[0] * ((m.weight[0].numel() + 7) // 8) for m in binary_layers(float_model))
    return (
        f"weights: {weights:,} binary weights, {4 * weights:,} bytes as float32 -> {packed_bytes:,} bytes packed "
        f"({4 * weights / max(1, packed_bytes):.1f}x); whole model {export['float_state_bytes']:,} bytes of "
        f"float state -> {path.stat().st_size:,} bytes exported ({export['float_state_bytes'] / path.stat().st_size:.1f}x)"
    )


def _timer(clock: Callable[[], float]) -> Callable[[Callable[[], object]], float]:
    def seconds(fn: Callable[[], object]) -> float:
        t0 = clock()
        fn()
        return clock() - t0

    return seconds


def _options(ns) -> tuple[list[int], list[str], int]:
    """(batch sizes, engines, threads per engine), each checked."""
    batches = parse_list("--batch-size", ns.batch_size)
    for flag, value in [
        ("--rounds", ns.rounds),
        ("--image-size", ns.image_size),
        ("--warmup", ns.warmup),
        ("--threads", 1 if ns.threads is None else ns.threads),
        *[("--batch-size", b) for b in batches],
    ]:
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not batches:
        raise UserError("--batch-size needs at least one batch size, e.g. 1,16")
    if ns.slice_ms <= 0:
        raise UserError(f"--slice-ms must be > 0, got {ns.slice_ms}")
    names = (
        list(ENGINES)
        if ns.engines == "all"
        else list(dict.fromkeys(e.strip() for e in ns.engines.split(",") if e.strip()))
    )
    for name in names:
        if name not in ENGINES:
            raise UserError(f"--engines: unknown engine {name!r}; valid: {', '.join(ENGINES)} (or all)")
    threads = ns.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return batches, names, threads


def _write_models(folder: Path, model: nn.Module, args: dict, seed: int) -> tuple[dict, str]:
    """The workers' models in ``folder``: the packed export, the binary model and its float twin (state
    dicts with their build_model kwargs). Returns the export's record and the sizes line."""
    from bitrain.deploy.export import export_packed

    path = folder / "packed.safetensors"
    export = export_packed(model, path, model_args=args)
    torch.save({"model_args": args, "state_dict": model.state_dict()}, folder / "binary.pt")
    twin_args = float_twin_args(args)
    twin = _calibrated(twin_args, seed)
    torch.save({"model_args": twin_args, "state_dict": twin.state_dict()}, folder / "float.pt")
    return export, _sizes(model, export, path)


def _layers(ns, model: nn.Module, folder: Path, shape, doc: dict) -> dict[int, list]:
    """``--layers``: per batch size the rows of ``bench_layers.layers``, timed in this process."""
    from bitrain.cli.bench_layers import layers
    from bitrain.deploy.load import load_packed
    from bitrain.deploy.swaps import channels_last_stem
    from bitrain.models import build_model

    channels_last_stem(model)  # the binary model as the engine runs one
    packed = load_packed(folder / "packed.safetensors", build_model, kernel=ns.kernel)
    seconds = _timer(time.process_time if ns.clock == "cpu" else time.perf_counter)
    return {b["batch"]: layers(model, packed, shape, b["batch"], ns.rounds, seconds, ns.seed) for b in doc["batches"]}


def _print(doc: dict, layer_rows: dict[int, list] | None) -> None:
    from bitrain.cli.bench_layers import layer_lines
    from bitrain.cli.race_report import machine_lines, table_lines

    m, ran = doc["model"], [n for n, e in doc["engines"].items() if e["status"] == "ran"]
    print(
        f"bitrain bench --inference: {m['name']} {'x'.join(map(str, doc['input']))}, {m['num_classes']} classes, "
        f"{doc['packed_layers']} packed layers; {len(ran)} of {len(doc['engines'])} engines, each in its own "
        f"process with {doc['threads']} threads; {doc['rounds']} rounds, turns of about {doc['slice_ms']:g} ms, "
        f"{doc['clock']} clock"
    )
    print("\n".join(machine_lines(doc)))
    print(doc["sizes"])
    allocators = {e["info"]["allocator"] for e in doc["engines"].values() if e.get("info")}
    print("allocator (in each engine's process): " + "; ".join(sorted(allocators)))
    print("\n".join(table_lines(doc)))
    for batch, rows in (layer_rows or {}).items():
        packed = next((b["rows"].get("packed") for b in doc["batches"] if b["batch"] == batch), None)
        print("\n".join(layer_lines(rows, batch, packed and packed["ms_per_batch"])))


def _layer_json(layer_rows: dict[int, list]) -> list[dict]:
    from bitrain.cli.timing import paired_ratio

    return [
        {"batch": b, "kind": k, "name": n, "what": w, "float_s": f, "packed_s": p, "ratio": paired_ratio(f, p)}
        for b, rows in layer_rows.items()
        for k, n, w, f, p in rows
    ]


def main(argv: Sequence[str]) -> int:
    """``bitrain bench --inference [options]``: the race's table per batch size (or ``--json``); returns 0."""
    from bitrain.cli.race import run_race
    from bitrain.cli.race_report import document

    ns = _parser().parse_args(list(argv))
    batches, names, threads = _options(ns)
    torch.set_num_threads(threads)
    model, args = _binary_model(ns)
    shape = (args.get("in_channels", 3), args["image_size"], args["image_size"])

    def say(line: str) -> None:  # progress, on stderr
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bitrain-race-") as tmp:
        folder = Path(tmp)
        export, sizes = _write_models(folder, model, args, ns.seed)
        spec = dict(
            dir=tmp, threads=threads, shape=list(shape), kernel=ns.kernel, clock=ns.clock, allocator=ns.allocator
        )
        spec["seed"] = ns.seed
        opts = dict(rounds=ns.rounds, slice_s=ns.slice_ms / 1e3, warmup=ns.warmup)
        race = run_race(names, batches, spec, opts, folder, say)
        head = dict(model=args, input=list(shape), packed_layers=export["packed_layers"], sizes=sizes)
        head.update(threads=threads, rounds=ns.rounds, slice_ms=ns.slice_ms, warmup=ns.warmup, clock=ns.clock)
        doc = document(head, race, batches)
        layer_rows = _layers(ns, model, folder, shape, doc) if ns.layers else None
    if ns.json:
        if layer_rows is not None:
            doc["layers"] = _layer_json(layer_rows)
        print(json.dumps(doc, indent=1))
    else:
        _print(doc, layer_rows)
    return 0
