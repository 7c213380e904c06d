"""Walk an eval-mode bitrain model into an OpenVINO graph (the ops of each layer: ``ov_layers.py``).

A module is, in this order: a layer this file knows (conv, BatchNorm, activations, pools, flatten,
linear); a residual block that declares ``residual_parts()`` (body(x) + shortcut(x), as the packed
engine's fused units read it); an ``nn.Sequential`` (a conv followed by a BatchNorm2d folds it in); or
anything else, traced with ``torch.fx`` (those three kinds as leaves) and mapped node by node. Anything
without a mapping is refused with one line naming it.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from bitrain.binary.activation import QActivation
from bitrain.binary.layers import QConv2d
from bitrain.binary.react import LearnableBias
from bitrain.deploy import ov_layers as L
from bitrain.deploy.ov_layers import ops
from bitrain.errors import UserError

_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d)
_LEAVES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    nn.ReLU,
    nn.Tanh,
    nn.PReLU,
    nn.Hardtanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Linear,
    QActivation,
    LearnableBias,
    *_PASS,
)


def _residual(m: nn.Module):
    parts = getattr(m, "residual_parts", None)
    return parts() if callable(parts) else None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        plain = type(m).__module__.startswith("torch.nn.")  # torch's own: mapped or refused whole
        return plain or isinstance(m, _LEAVES) or _residual(m) is not None


def _pool_args(m) -> tuple[list[int], list[int], list[int]]:
    def pair(v):
        return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]

    return pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size), pair(m.padding)


def _leaf(m: nn.Module, x, name: str):
    """One known layer (not a conv: those go through ``emit``'s BatchNorm folding)."""
    if isinstance(m, _PASS):
        return x
    if isinstance(m, nn.BatchNorm2d):
        a, b = L.bn_affine(m)
        return ops.add(ops.multiply(x, L.chan(a)), L.chan(b))
    if isinstance(m, LearnableBias):
        rank = len(L.shape_of(x))
        return ops.add(x, m.bias.detach().float().cpu().numpy().reshape(1, -1, *[1] * (rank - 2)))
    if isinstance(m, nn.ReLU):
        return ops.relu(x)
    if isinstance(m, nn.Tanh):
        return ops.tanh(x)
    if isinstance(m, nn.BatchNorm1d):
        a, b = L.bn_affine(m)
        shape = (1, -1) if len(L.shape_of(x)) == 2 else (1, -1, 1)
        return ops.add(ops.multiply(x, a.float().numpy().reshape(shape)), b.float().numpy().reshape(shape))
    if isinstance(m, nn.PReLU):
        return ops.prelu(x, m.weight.detach().float().cpu().numpy())
    if isinstance(m, nn.Hardtanh):
        return ops.clamp(x, float(m.min_val), float(m.max_val))
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pool_args(m)
        rounding = "ceil_torch" if m.ceil_mode else "floor"
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices or m.dilation not in (1, (1, 1)):
                raise UserError(f"OpenVINO export: {name}: MaxPool2d with indices or dilation is not supported")
            return ops.max_pool(x, s, [1, 1], p, p, k, rounding).output(0)
        if m.divisor_override is not None:
            raise UserError(f"OpenVINO export: {name}: AvgPool2d divisor_override is not supported")
        return ops.avg_pool(x, s, p, p, k, not m.count_include_pad, rounding)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if m.output_size in (1, (1, 1)):
            return ops.reduce_mean(x, np.array([2, 3]), True)
        size = [m.output_size] * 2 if isinstance(m.output_size, int) else list(m.output_size)
        return ops.adaptive_avg_pool(x, np.array(size, np.int64))
    if isinstance(m, nn.Flatten):
        return _flatten(x, m.start_dim, m.end_dim, name)
    if isinstance(m, nn.Linear):
        return L.linear(m, x, name)
    if isinstance(m, QActivation):
        if m.is_identity:
            return x
        if L.signs_act(m):
            return L.sign_node(x)
    raise UserError(f"OpenVINO export: {name}: module {type(m).__name__} has no OpenVINO mapping")


def _flatten(x, start: int, end: int, name: str):
    rank = len(L.shape_of(x))
    if start != 1 or end not in (-1, rank - 1):
        raise UserError(f"OpenVINO export: {name}: only flatten from dim 1 to the end is supported")
    return ops.reshape(x, np.array([0, -1], np.int64), True)


def _conv(m: nn.Module, x, name: str, bn=None):
    return L.qconv(m, x, name, bn) if isinstance(m, QConv2d) else L.conv2d(m, x, name, bn)


def emit(m: nn.Module, x, name: str = "model"):
    """The OpenVINO output of module ``m`` on input ``x`` (one tensor)."""
    if isinstance(m, nn.Conv2d):
        return _conv(m, x, name)
    if isinstance(m, _LEAVES):
        return _leaf(m, x, name)
    parts = _residual(m)
    if parts is not None:
        body, short = parts
        y = emit(getattr(m, body), x, f"{name}.{body}")
        return ops.add(y, x if short is None else emit(getattr(m, short), x, f"{name}.{short}"))
    if isinstance(m, nn.Sequential):
        items = list(m.named_children())
        i = 0
        while i < len(items):
            key, child = items[i]
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if isinstance(child, nn.Conv2d) and type(nxt) is nn.BatchNorm2d:
                x, i = _conv(child, x, f"{name}.{key}", nxt), i + 2
            else:
                x, i = emit(child, x, f"{name}.{key}"), i + 1
        return x
    if type(m).__module__.startswith("torch.nn."):
        raise UserError(f"OpenVINO export: {name}: module {type(m).__name__} has no OpenVINO mapping")
    return _traced(m, x, name)


_FUNCS: dict[Any, Any] = {
    operator.add: ops.add,
    torch.add: ops.add,
    "add": ops.add,
    operator.mul: ops.multiply,
    torch.mul: ops.multiply,
    "mul": ops.multiply,
    F.relu: ops.relu,
    torch.relu: ops.relu,
    "relu": ops.relu,
    torch.sigmoid: ops.sigmoid,
    "sigmoid": ops.sigmoid,
    operator.gt: ops.greater,
    torch.where: ops.select,
}


def _traced(m: nn.Module, x, name: str):
    try:
        graph = _Tracer().trace(m)
    except Exception as e:  # a Python branch on a tensor, an unsupported call
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"OpenVINO export: {name} ({type(m).__name__}) does not trace with torch.fx: {msg}") from None
    env: dict[str, Any] = {}
    inputs = iter([x])
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = next(inputs, None)
            if env[node.name] is None:
                raise UserError(f"OpenVINO export: {name}: only modules with one tensor input are supported")
        elif node.op == "call_module":
            arg = _value(env, node.args[0], name)
            env[node.name] = emit(m.get_submodule(node.target), arg, f"{name}.{node.target}")
        elif node.op == "output":
            return _value(env, node.args[0], name)
        elif node.op == "get_attr":  # a parameter or buffer: a constant
            env[node.name] = functools.reduce(getattr, node.target.split("."), m)
        else:
            env[node.name] = _call(node, env, f"{name} ({type(m).__name__})")
    raise UserError(f"OpenVINO export: {name}: traced graph has no output")


def _value(env: dict, a, name: str):
    if isinstance(a, fx.Node):
        a = env[a.name]
        if not isinstance(a, (torch.Tensor, int, float)):
            return a
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return np.float32(a)
    raise UserError(f"OpenVINO export: {name}: argument {a!r} is not supported")


def _arg(node: fx.Node, i: int, key: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


# the positional parameters after the input, in order
_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")  # F.conv2d
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")  # F.max_pool2d


def _pad(node: fx.Node, x, where: str):
    """``F.pad`` with a constant: OpenVINO's Pad (the pairs run from the last dimension backwards)."""
    pad, mode, value = _arg(node, 1, "pad"), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    if mode != "constant" or len(pad) % 2 or any(int(v) < 0 for v in pad):
        raise UserError(f"OpenVINO export: {where}: F.pad {mode!r} {list(pad)} is not supported (constant, >= 0)")
    rank = len(L.shape_of(x))
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    fill = np.float32(0.0 if value is None else value)
    return ops.pad(x, np.array(begin, np.int64), np.array(end, np.int64), "constant", fill)


def _unsqueeze(index: tuple, x, where: str):
    """``x[:, :, None, None]``: new axes of size 1; any other index is refused."""
    axes, position = [], 0
    for item in index:
        if item is None:
            axes.append(position)
        elif item != slice(None):
            raise UserError(f"OpenVINO export: {where}: indexing with {item!r} has no OpenVINO mapping")
        position += 1
    return ops.unsqueeze(x, np.array(axes, np.int64))


def _is_graph(v) -> bool:
    """An OpenVINO node or output (not a constant: a tensor, a shape, a number)."""
    return type(v).__module__.startswith("openvino") or (
        isinstance(v, (tuple, list)) and any(_is_graph(item) for item in v)
    )


def _raw(env: dict, a):
    if isinstance(a, fx.Node):
        return env[a.name]
    if isinstance(a, (tuple, list)):
        return type(a)(_raw(env, item) for item in a)
    return a


def _call(node: fx.Node, env: dict, where: str):
    """A call_function / call_method node: the few a zoo forward uses. A call on constants only (a
    buffer, a static shape) is evaluated here; ``x.shape`` of a graph value is its static shape."""
    target = node.target
    args, kw = _raw(env, node.args), {k: _raw(env, v) for k, v in node.kwargs.items()}
    if not _is_graph(args) and not _is_graph(list(kw.values())):
        return target(*args, **kw) if node.op == "call_function" else getattr(args[0], target)(*args[1:], **kw)
    if target is getattr and args[1] in ("shape", "dtype"):
        return tuple(L.shape_of(args[0])) if args[1] == "shape" else torch.float32
    if target is F.conv2d and not _is_graph(args[1]):  # a constant weight
        c = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        c.update(zip(_CONV_ARGS, args[1:]), **kw)
        pad = c["padding"] if isinstance(c["padding"], str) else _pair(c["padding"])  # float_conv refuses a str
        return L.float_conv(args[0], c["weight"], c["bias"], _pair(c["stride"]), pad, _pair(c["dilation"]), c["groups"])
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op in ("call_function", "call_method") and target in _FUNCS and not kwargs:
        return _FUNCS[target](*[_value(env, a, where) for a in node.args[:3]])
    if target is F.pad:
        return _pad(node, _value(env, node.args[0], where), where)
    if target is F.max_pool2d:
        pool = nn.MaxPool2d(**dict(zip(_POOL_ARGS, node.args[1:])), **node.kwargs)  # F's order is not nn's
        return _leaf(pool, _value(env, node.args[0], where), where)
    if target is operator.getitem and isinstance(node.args[1], tuple):
        return _unsqueeze(node.args[1], _value(env, node.args[0], where), where)
    if target in (torch.flatten, "flatten"):
        x = _value(env, node.args[0], where)
        return _flatten(x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1), where)
    if target in (torch.cat, torch.concat):
        parts = [_value(env, a, where) for a in node.args[0]]
        return ops.concat(parts, int(_arg(node, 1, "dim", 0)))
    if target in (torch.mean, "mean") and _arg(node, 1, "dim") is not None:
        dims = _arg(node, 1, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims)
        x = _value(env, node.args[0], where)
        return ops.reduce_mean(x, np.array(dims, np.int64), bool(_arg(node, 2, "keepdim", False)))
    what = getattr(target, "__name__", target)
    raise UserError(f"OpenVINO export: {where}: {node.op} {what} has no OpenVINO mapping")
