"""``bitrain bench --inference --layers``: every binary layer of the model alone, in this process.

The float conv (or linear) of its ±1 input and weight against the packed layer's forward (sign, packing and
xnor-popcount) on the same real-valued input; where ``load_packed`` fused the BatchNorm after a conv into the
packed layer, both sides include that BatchNorm. A fused residual unit (``deploy.fused``) is timed whole: the
float conv + BatchNorm + shortcut against the unit as the packed model runs it (its input in the packed
model's layout, already packed where the unit before packs it).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.cli.timing import paired_ratio


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


def layers(float_model, packed, shape, batch: int, rounds: int, seconds, seed: int) -> list[tuple]:
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


def layer_lines(rows: list[tuple], batch: int, packed_ms: float | None) -> list[str]:
    """The report of ``layers``: a line per unit and layer, then the range of ratios and their share of
    the packed model's time (``packed_ms``, a batch in the race; None when the packed engine did not race)."""
    ratios = [paired_ratio(f, p) for *_, f, p in rows]
    lines = [
        f"  {kind} {name}: {what}: float {statistics.median(f) * 1e3:.3f} ms, packed "
        f"{statistics.median(p) * 1e3:.3f} ms, ratio packed/float: {ratio:.2f}"
        for (kind, name, what, f, p), ratio in zip(rows, ratios)
    ]
    in_layers = sum(statistics.median(p) for *_, p in rows) * 1e3
    share = f" of the packed model's {packed_ms:.2f} ms (the rest: its float layers)" if packed_ms else ""
    lines.append(
        f"batch {batch}: layers ratio packed/float: {min(ratios):.2f}-{max(ratios):.2f}; the packed layers "
        f"and units take {in_layers:.2f} ms{share}"
    )
    return lines
