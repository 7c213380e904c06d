"""Model summary: per-layer precision, weights by bit width, memory and MACs (larq / BMXNet style).

Counting rules (the numbers a test pins on a hand-counted model):
- rows are the quantized layers (QConv2d / QLinear, their inner QActivation folded in) and every
  other module that has no children or owns parameters/buffers directly;
- weights of a Q layer count at its ``bits``; biases, BatchNorm and all other layers at 32 bits;
  BatchNorm running mean/var are counted with the weights (larq and BMXNet do the same: they are
  stored with the model); integer buffers such as ``num_batches_tracked`` are not weights;
- memory: a k-bit weight takes k/8 bytes (a 1-bit weight 1/32 of a float);
- MACs: conv = output elements x (in_channels / groups x kh x kw); linear = output elements x
  in_features; binary when the layer is a Q layer with ``bits == bits_a == 1``, float otherwise;
  other layers (BatchNorm, pooling, activations) add no MACs;
- BMXNet's combined FLOPs = binary MACs / 64 + float MACs.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bitrain.binary.layers import QConv2d, QLinear

_Q_TYPES = (QConv2d, QLinear)


@dataclass
class LayerSummary:
    """One row of the summary; counts are for a batch of one sample."""

    name: str
    type: str
    input_bits: int
    output_shape: tuple[int, ...] | None  # without the batch dimension; None if never called
    weights_by_bits: dict[int, int] = field(default_factory=dict)  # parameters (trainable) by bit width
    buffers: int = 0  # float buffers inference needs (BatchNorm's running statistics), stored at 32 bits
    memory_bytes: float = 0.0
    macs_binary: int = 0
    macs_float: int = 0
    calls: int = 0

    @property
    def params(self) -> int:
        return sum(self.weights_by_bits.values())


@dataclass
class Summary:
    """Rows in call order (modules never called last) plus the totals derived from them."""

    layers: list[LayerSummary]
    input_shape: tuple[int, ...]

    @property
    def total_params(self) -> int:
        """Parameters (trainable), as larq and torch count them; buffers are not parameters."""
        return sum(r.params for r in self.layers)

    @property
    def total_buffers(self) -> int:
        return sum(r.buffers for r in self.layers)

    @property
    def weights_by_bits(self) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for r in self.layers:
            for b, n in r.weights_by_bits.items():
                out[b] += n
        return dict(sorted(out.items()))

    @property
    def size_bytes(self) -> float:
        return sum(r.memory_bytes for r in self.layers)

    @property
    def size_mb(self) -> float:
        """Model size in MiB (2**20 bytes)."""
        return self.size_bytes / 2**20

    @property
    def float32_bytes(self) -> int:
        """The same model with every parameter and buffer at 32 bits."""
        return 4 * (self.total_params + self.total_buffers)

    @property
    def compression_ratio(self) -> float:
        return self.float32_bytes / self.size_bytes if self.size_bytes else 1.0

    @property
    def macs_binary(self) -> int:
        return sum(r.macs_binary for r in self.layers)

    @property
    def macs_float(self) -> int:
        return sum(r.macs_float for r in self.layers)

    @property
    def binary_mac_share(self) -> float:
        total = self.macs_binary + self.macs_float
        return self.macs_binary / total if total else 0.0

    @property
    def combined_flops(self) -> float:
        """BMXNet's estimate: a 64-bit xnor-popcount word does 64 binary MACs in one op."""
        return self.macs_binary / 64 + self.macs_float

    def totals(self) -> dict[str, Any]:
        """The whole-model figures as a flat dict."""
        return {
            "params": self.total_params,
            "buffers": self.total_buffers,
            "weights_by_bits": self.weights_by_bits,
            "size_bytes": self.size_bytes,
            "size_mb": self.size_mb,
            "float32_bytes": self.float32_bytes,
            "float32_mb": self.float32_bytes / 2**20,
            "compression_ratio": self.compression_ratio,
            "macs_binary": self.macs_binary,
            "macs_float": self.macs_float,
            "binary_mac_share": self.binary_mac_share,
            "combined_flops": self.combined_flops,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"input_shape", "layers": [row dicts], "totals": {...}}``."""
        layers = []
        for r in self.layers:
            d = asdict(r)
            d["output_shape"] = list(r.output_shape) if r.output_shape is not None else None
            d["params"] = r.params
            layers.append(d)
        return {"input_shape": list(self.input_shape), "layers": layers, "totals": self.totals()}

    def format(self) -> str:
        """A readable table followed by the totals (larq ``summary`` / BMXNet ``print_summary`` style)."""
        bit_cols = sorted({b for r in self.layers for b in r.weights_by_bits} | {1, 32})
        header = ["Layer", "Type", "In bits", "Output shape"]
        header += [f"{b}-bit #" for b in bit_cols] + ["Memory KiB", "Binary MACs", "Float MACs"]
        rows = []
        for r in self.layers:
            shape = "x".join(map(str, r.output_shape)) if r.output_shape is not None else "-"
            row = [r.name or "(model)", r.type, str(r.input_bits), shape]
            row += [_num(r.weights_by_bits.get(b, 0)) for b in bit_cols]
            row += [f"{r.memory_bytes / 1024:.2f}", _num(r.macs_binary), _num(r.macs_float)]
            rows.append(row)
        total = ["Total", "", "", ""] + [_num(self.weights_by_bits.get(b, 0)) for b in bit_cols]
        total += [f"{self.size_bytes / 1024:.2f}", _num(self.macs_binary), _num(self.macs_float)]
        widths = [max(len(x[i]) for x in [header, total, *rows]) for i in range(len(header))]
        left = 2  # name and type left-aligned, numbers right-aligned

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        rule = "-" * len(line(header))
        by_bits = ", ".join(f"{_num(n)} at {b} bit" for b, n in self.weights_by_bits.items()) or "0"
        lines = [
            f"Model summary, input {'x'.join(map(str, self.input_shape))} (batch of 1)",
            rule,
            line(header),
            rule,
            *map(line, rows),
            rule,
            line(total),
            rule,
            f"Total params                      {_num(self.total_params)} ({by_bits})",
            f"Buffers (BatchNorm statistics)    {_num(self.total_buffers)} at 32 bit, in the model size",
            f"Model size                        {self.size_mb:.2f} MiB ({self.size_bytes:.0f} bytes)",
            f"Float-32 equivalent               {self.float32_bytes / 2**20:.2f} MiB",
            f"Compression ratio of memory       {self.compression_ratio:.2f}",
            f"Binary MACs / float MACs          {_num(self.macs_binary)} / {_num(self.macs_float)}"
            f" ({100 * self.binary_mac_share:.2f} % binary)",
            f"Combined FLOPs (binary/64+float)  {_num(round(self.combined_flops))}",
        ]
        return "\n".join(lines)


def _num(n: int) -> str:
    return f"{n:,}"


def _is_binary(m: nn.Module) -> bool:
    return isinstance(m, _Q_TYPES) and m.bits == 1 and m.bits_a == 1


def _reported_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Q layers, leaves and modules owning tensors directly; nothing below a Q layer."""
    out, inside_q = [], []
    for name, m in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in inside_q):  # "" = the model is a Q layer
            continue
        if isinstance(m, _Q_TYPES):
            inside_q.append(name)
            out.append((name, m))
            continue
        owns = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if owns or not any(True for _ in m.children()):
            out.append((name, m))
    return out


def _weights(m: nn.Module) -> tuple[dict[int, int], int]:
    """(parameter count by bit width: a Q layer's ``weight`` at its bits, the rest at 32; float buffers)."""
    counts: dict[int, int] = defaultdict(int)
    recurse = isinstance(m, _Q_TYPES)  # a Q layer's children (its QActivation) are folded in
    for pname, p in m.named_parameters(recurse=recurse):
        bits = m.bits if isinstance(m, _Q_TYPES) and pname == "weight" else 32
        counts[bits] += p.numel()
    buffers = sum(b.numel() for b in m.buffers(recurse=recurse) if b.is_floating_point())
    return dict(counts), buffers


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call, batch of 1."""
    per_sample = out[0].numel() if out.dim() > 0 else 0
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return per_sample * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return per_sample * m.in_features
    return 0


def summarize(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> Summary:
    """Run one dummy batch of 1 of ``input_shape`` (C, H, W) through ``model`` and count per layer."""
    input_shape = tuple(int(s) for s in input_shape)
    modules = _reported_modules(model)
    rows: dict[str, LayerSummary] = {}
    for name, m in modules:
        weights, buffers = _weights(m)
        rows[name] = LayerSummary(
            name=name,
            type=type(m).__name__,
            input_bits=m.bits_a if isinstance(m, _Q_TYPES) else 32,
            output_shape=None,
            weights_by_bits=weights,
            buffers=buffers,
            memory_bytes=sum(n * b / 8 for b, n in weights.items()) + 4 * buffers,
        )
    order: list[str] = []

    def hook(name: str, m: nn.Module):
        def fn(_mod, _inp, out):
            if not isinstance(out, torch.Tensor):
                return
            r = rows[name]
            if r.calls == 0:
                order.append(name)
            r.calls += 1
            r.output_shape = tuple(out.shape[1:])
            macs = _macs(m, out)
            if _is_binary(m):
                r.macs_binary += macs
            else:
                r.macs_float += macs

        return fn

    handles = [m.register_forward_hook(hook(name, m)) for name, m in modules]
    was_training = model.training
    try:
        p = next(iter(model.parameters()), None)
        x = torch.zeros((1, *input_shape), device=p.device if p is not None else "cpu")
        model.eval()  # a batch of one must not touch BatchNorm statistics
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    ordered = [rows[n] for n in order] + [r for n, r in rows.items() if r.calls == 0]
    # modules that were never called and hold no weights are noise (e.g. unused activations)
    ordered = [r for r in ordered if r.calls or r.params]
    return Summary(layers=ordered, input_shape=input_shape)


def _module_edges(model: nn.Module, names: list[str]) -> list[tuple[str, str]] | None:
    """Data-flow edges between reported modules via torch.fx; None when the model cannot be traced."""
    import torch.fx as fx

    wanted = set(names)

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in wanted or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow etc.: fall back to call order
        return None
    # producers[node] = the reported modules whose outputs reach this node through functional ops
    producers: dict[fx.Node, set[str]] = {}
    edges: list[tuple[str, str]] = []
    for node in graph.nodes:
        srcs: set[str] = set()
        for a in node.all_input_nodes:
            srcs |= producers.get(a, set())
        if node.op == "call_module" and node.target in wanted:
            edges += [(s, node.target) for s in sorted(srcs) if (s, node.target) not in edges]
            producers[node] = {node.target}
        else:
            producers[node] = srcs
    return edges


def network_dot(model: nn.Module, summary: Summary) -> str:
    """Graphviz DOT source: one box per called layer (type, output shape, bits), data-flow edges."""
    called = [r for r in summary.layers if r.calls]
    edges = _module_edges(model, [r.name for r in called])
    if edges is None:
        edges = [(a.name, b.name) for a, b in zip(called, called[1:])]
    lines = ["digraph network {", '  node [shape=box, fontname="Helvetica"];']
    for r in called:
        shape = "x".join(map(str, r.output_shape or ()))
        label = f"{r.name or '(model)'}\\n{r.type} {shape}\\nin {r.input_bits} bit"
        color = ', style=filled, fillcolor="#dde8ff"' if r.macs_binary else ""
        lines.append(f'  "{r.name}" [label="{label}"{color}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def plot_network(model: nn.Module, input_shape: tuple[int, ...], path_prefix: str | Path) -> str:
    """BMXNet ``--plot-network``: write PREFIX.txt (summary), and PREFIX.gv / PREFIX.gv.pdf when the
    ``graphviz`` package and its ``dot`` binary are installed. Returns a one-line message of what was written."""
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(model, input_shape)
    txt = prefix.with_name(prefix.name + ".txt")
    txt.write_text(summary.format() + "\n")
    try:
        import graphviz  # optional dependency
    except ImportError:
        return f"wrote {txt}; graph skipped (python package 'graphviz' not installed)"
    if shutil.which("dot") is None:
        return f"wrote {txt}; graph skipped (graphviz 'dot' binary not found on PATH)"
    gv = prefix.with_name(prefix.name + ".gv")
    pdf = graphviz.Source(network_dot(model, summary)).render(filename=str(gv), format="pdf", cleanup=False)
    return f"wrote {txt}, {gv} and {pdf}"
