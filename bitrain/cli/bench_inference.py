"""``bitrain bench --inference``: a binary model's packed export against the float model it came from.

The model (random weights with BatchNorm statistics estimated on noise images, or ``--checkpoint``) is
exported packed to a temporary folder and loaded back (``load_packed``: numba's xnor-popcount kernel
when it imports). Both run the same inputs in rounds: each round one new random batch, both models
on it, their order alternating; the ratio is the median over rounds of float seconds / packed seconds,
so a change of the machine's load between rounds cancels out. ``--layers`` times every binary layer
alone, the float conv (or linear) of its ±1 input and weight against the packed layer's forward
(sign, packing and xnor-popcount) on the same real-valued input; where ``load_packed`` fused the
BatchNorm after a conv into the packed layer, both sides include that BatchNorm. A fused residual unit
(``deploy.fused``) is timed whole: the float conv + BatchNorm + shortcut against the unit as the packed
model runs it (its input in the packed model's layout, already packed where the unit before packs it).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.cli.args import ArgParser
from bitrain.cli.timing import paired_ratio  # of float and packed seconds: the packed model's speed-up
from bitrain.errors import UserError, parse_list
from bitrain.names import PACKED_KERNELS


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
    p.add_argument("--layers", action="store_true", help="also time each binary layer alone")
    p.add_argument("--kernel", default="auto", choices=PACKED_KERNELS, help="packed kernel (default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="wall time or this process's CPU time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        action="append",
        choices=("openvino",),
        default=[],
        help="also race this engine in the same rounds: openvino (the model's IR, every 1-bit conv a "
        "BinaryConvolution, f32, bitrain[openvino])",
    )
    p.add_argument(
        "--allocator",
        default="keep",
        choices=("keep", "system"),
        help="keep: freed memory stays in the process, for both models (default); system: the allocator as it is",
    )
    return p


def _float_model(ns) -> tuple[nn.Module, dict]:
    """(model in eval mode, its build_model kwargs): the checkpoint's, or a random one with BatchNorm
    statistics estimated on noise (so every BatchNorm shifts and scales, and the signs are balanced)."""
    if ns.checkpoint:
        from bitrain.cli.reader import load_model

        loaded = load_model(ns.checkpoint)
        if any(type(m).__name__ == "PackedQLayer" for m in loaded.model.modules()):
            raise UserError(f"--checkpoint {ns.checkpoint} is a packed export; give the float checkpoint it came from")
        return loaded.model.eval(), dict(loaded.model_args)
    from bitrain.deploy.swaps import channels_last_stem
    from bitrain.models import build_model

    args = dict(name=ns.model, num_classes=ns.num_classes, in_channels=ns.in_channels, image_size=ns.image_size, bits=1)
    torch.manual_seed(ns.seed)
    model = build_model(**args)
    channels_last_stem(model)  # the float model as the engine runs one (cli.reader does the same for --checkpoint)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, ns.in_channels, ns.image_size, ns.image_size))
        for m in norms:
            if m.affine:  # non-trivial affine terms, a few negative scales among them
                m.weight.copy_(1 + 0.5 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
            m.momentum = 0.1
    return model.eval(), args


def _timer(clock: Callable[[], float]) -> Callable[[Callable[[], object]], float]:
    def seconds(fn: Callable[[], object]) -> float:
        t0 = clock()
        fn()
        return clock() - t0

    return seconds


def _end_to_end(models: dict[str, nn.Module], shape, batch: int, rounds: int, seconds, seed: int) -> dict:
    """Per model (``float`` first) its seconds per round, and per other model its agreement with ``float``:
    each round one new batch, every model on it, the order rotating from round to round."""
    gen = torch.Generator().manual_seed(seed + batch)
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    same = dict.fromkeys(names[1:], 0)
    worst = dict.fromkeys(names[1:], 0.0)
    total = 0
    with torch.no_grad():
        warm = torch.randn(batch, *shape, generator=gen)
        for model in models.values():
            model(warm)
        for r in range(rounds):
            x = torch.randn(batch, *shape, generator=gen)
            out: dict[str, torch.Tensor] = {}
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order if r % 2 == 0 else order[::-1]:
                model = models[name]
                times[name].append(seconds(lambda m=model, k=name, x=x, out=out: out.__setitem__(k, m(x))))
            total += batch
            for k in names[1:]:
                same[k] += int((out["float"].argmax(1) == out[k].argmax(1)).sum())
                worst[k] = max(worst[k], float((out["float"] - out[k]).abs().max()))
    return dict(times=times, same=same, total=total, worst=worst)


def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The real-valued input of each named layer of the model, for input ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _float_op(layer: nn.Module, x: torch.Tensor, norm: nn.Module | None) -> Callable[[], torch.Tensor]:
    """The float conv / linear of the layer's shape on its ±1 input and weight (no quantization inside),
    then ``norm`` when the packed layer has its BatchNorm fused in (``packed.fuse_batchnorm``)."""
    with torch.no_grad():
        xq, w = layer.act(x), layer.quantized_weight().detach()
    if not isinstance(layer, nn.Conv2d):
        return lambda: F.linear(xq, w)

    def conv() -> torch.Tensor:
        h = F.conv2d(xq, w, None, layer.stride, layer.qpadding, layer.dilation, layer.groups)
        return h if norm is None else norm(h)

    return conv


def _describe(layer: nn.Module, fast: nn.Module) -> str:
    fused = " + BatchNorm2d" if getattr(fast, "norm", None) is not None else ""
    return f"{type(layer).__name__} {tuple(layer.weight.shape)}{fused}"


def _unit_ops(float_model, unit, name: str, x: torch.Tensor, xp: torch.Tensor) -> tuple[Callable, Callable, str]:
    """(float op, packed op, description) of a fused residual unit (``deploy.fused.PackedResidual``):
    the float side is its body conv (as ``_float_op``) + its shortcut (x, the float conv of a binary 1x1
    shortcut with its BatchNorm, or the float model's shortcut modules); the packed side is the unit as the
    model runs it, with its input already packed where the unit before packs it."""

    def float_layer(fast: nn.Module) -> nn.Module:  # the float model's layer at the packed layer's place
        return float_model.get_submodule(next(f"{name}.{k}" for k, m in unit.named_modules() if m is fast))

    layer = float_layer(unit.conv)
    body = _float_op(layer, x, unit.conv.norm)
    what = _describe(layer, unit.conv)
    if unit.shortcut_name is None:
        shortcut, what = (lambda: x), what + " + x"
    elif unit.shortcut_conv is not None:
        sc_layer = float_layer(unit.shortcut_conv)
        shortcut = _float_op(sc_layer, x, unit.shortcut_conv.norm)
        what = f"{what} + {_describe(sc_layer, unit.shortcut_conv)}"
    else:
        module = float_model.get_submodule(f"{name}.{unit.shortcut_name}")
        shortcut = lambda: module(x)  # noqa: E731
        what += " + shortcut (" + ", ".join(type(m).__name__ for m in list(module.children()) or [module]) + ")"
    packed = unit.pack_input(xp) if unit.takes_packed() else None
    what += " on " + "x".join(str(s) for s in x.shape[1:])
    if packed is not None:
        what += " (packed by the unit before)"
    elif not xp.is_contiguous():
        what += " (channels_last from the layer before)"
    return (lambda: body() + shortcut()), (lambda: unit.run(xp, packed)), what


def _layers(float_model, packed, shape, batch: int, rounds: int, seconds, seed: int) -> list[tuple]:
    """Per fused residual unit and per other binary layer, in the model's order: (kind, name, description,
    float seconds per round, packed seconds per round)."""
    from bitrain.deploy.fused import PackedResidual
    from bitrain.deploy.packed import PackedQLayer

    units = {n: m for n, m in packed.named_modules() if isinstance(m, PackedResidual)}
    inside = {f"{n}.{k}" for n, u in units.items() for k, _ in u.named_modules() if k}
    layers = [n for n, m in packed.named_modules() if isinstance(m, PackedQLayer) and n not in inside]
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    inputs = _layer_inputs(float_model, layers + list(units), x)
    packed_inputs = _layer_inputs(packed, list(units), x)  # a unit's input as the packed model gives it
    rows = []
    with torch.no_grad():
        for name, module in packed.named_modules():
            inp = inputs.get(name)
            if name in units:
                float_op, packed_op, what = _unit_ops(float_model, module, name, inp, packed_inputs[name])
                kind = "unit"
            elif name in layers:
                layer = float_model.get_submodule(name)
                float_op, packed_op = _float_op(layer, inp, module.norm), lambda f=module, i=inp: f(i)
                what = _describe(layer, module) + " on " + "x".join(str(s) for s in inp.shape[1:])
                kind = "layer"
            else:
                continue
            ops = {"float": float_op, "packed": packed_op}
            times: dict[str, list[float]] = {"float": [], "packed": []}
            for op in ops.values():
                op()  # warm-up
            for r in range(rounds):
                for k in ("float", "packed") if r % 2 == 0 else ("packed", "float"):
                    times[k].append(min(seconds(ops[k]) for _ in range(3)))
            rows.append((kind, name, what, times["float"], times["packed"]))
    return rows


def _sizes(float_model: nn.Module, export: dict, path: Path) -> str:
    from bitrain.binary.layers import binary_layers

    weights = sum(m.weight.numel() for m in binary_layers(float_model))
    packed_bytes = sum(m.weight.shape[0] * ((m.weight[0].numel() + 7) // 8) for m in binary_layers(float_model))
    return (
        f"weights: {weights:,} binary weights, {4 * weights:,} bytes as float32 -> {packed_bytes:,} bytes packed "
        f"({4 * weights / max(1, packed_bytes):.1f}x); whole model {export['float_state_bytes']:,} bytes of "
        f"float state -> {path.stat().st_size:,} bytes exported ({export['float_state_bytes'] / path.stat().st_size:.1f}x)"
    )


def _engines(names: list[str], float_model: nn.Module, shape, batch: int) -> dict[str, nn.Module]:
    """The other engines to race, built for this batch size (an IR has static shapes)."""
    out: dict[str, nn.Module] = {}
    if "openvino" in names:
        from bitrain.deploy.openvino import OpenVINOModel, build_graph

        out["openvino"] = OpenVINOModel(build_graph(float_model, (batch, *shape)))
    return out


def main(argv: Sequence[str]) -> int:
    """``bitrain bench --inference [options]``: prints the ratios and agreement per batch size; returns 0."""
    ns = _parser().parse_args(list(argv))
    batches = parse_list("--batch-size", ns.batch_size)
    for flag, value in [
        ("--rounds", ns.rounds),
        ("--image-size", ns.image_size),
        *[("--batch-size", b) for b in batches],
    ]:
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if not batches:
        raise UserError("--batch-size needs at least one batch size, e.g. 1,16")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from bitrain.deploy.memory import keep_freed_memory

    allocator = (
        keep_freed_memory() if ns.allocator == "keep" else "allocator: the system's, as it is (--allocator system)"
    )
    from bitrain.deploy.export import export_packed
    from bitrain.deploy.load import load_packed
    from bitrain.models import build_model

    float_model, args = _float_model(ns)
    shape = (args.get("in_channels", 3), args.get("image_size", 224), args.get("image_size", 224))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        export = export_packed(float_model, path, model_args=args)
        packed = load_packed(path, build_model, kernel=ns.kernel)
        sizes = _sizes(float_model, export, path)
    from bitrain.deploy.packed import resolve_kernel

    kernel = resolve_kernel(ns.kernel)
    seconds = _timer(time.process_time if ns.clock == "cpu" else time.perf_counter)
    print(
        f"bitrain bench --inference: {args['name']} {'x'.join(map(str, shape))}, {export['packed_layers']} packed "
        f"layers, kernel {kernel}, cpu ({torch.get_num_threads()} threads), {ns.rounds} rounds, {ns.clock} clock",
        flush=True,
    )
    print(sizes)
    print(allocator)
    for batch in batches:
        models = {"float": float_model, "packed": packed, **_engines(ns.engine, float_model, shape, batch)}
        r = _end_to_end(models, shape, batch, ns.rounds, seconds, ns.seed)
        t = {k: statistics.median(v) for k, v in r["times"].items()}
        tp = t["packed"]
        print(
            f"batch {batch}: "
            + ", ".join(f"{k} {v * 1e3:.2f} ms ({batch / v:.1f} img/s)" for k, v in t.items())
            + f", medians of {ns.rounds}"
        )
        print(f"batch {batch}: ratio packed/float: {paired_ratio(r['times']['float'], r['times']['packed']):.2f}")
        for k in list(models)[2:]:
            print(f"batch {batch}: ratio packed/{k}: {paired_ratio(r['times'][k], r['times']['packed']):.2f}")
        for k in list(models)[1:]:
            which = "" if k == "packed" else f" ({k} vs float)"
            print(
                f"batch {batch}: predictions identical{which}: {r['same'][k]}/{r['total']} "
                f"(max |logit difference| {r['worst'][k]:.3g})"
            )
        if ns.layers:
            rows = _layers(float_model, packed, shape, batch, ns.rounds, seconds, ns.seed)
            ratios = [paired_ratio(f, p) for *_, f, p in rows]
            for (kind, name, what, f, p), ratio in zip(rows, ratios):
                print(
                    f"  {kind} {name}: {what}: float {statistics.median(f) * 1e3:.3f} ms, packed "
                    f"{statistics.median(p) * 1e3:.3f} ms, ratio packed/float: {ratio:.2f}"
                )
            in_layers = sum(statistics.median(p) for *_, p in rows)
            print(
                f"batch {batch}: layers ratio packed/float: {min(ratios):.2f}-{max(ratios):.2f}; the packed layers "
                f"and units take {in_layers * 1e3:.2f} ms of the packed model's {tp * 1e3:.2f} ms (the rest: "
                "its float layers)"
            )
    return 0
