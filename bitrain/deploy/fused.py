"""Residual units of a packed model run as one kernel call each: ``out = BN(qconv(x)) + shortcut(x)``.

A block declares that it computes ``body(x) + shortcut(x)`` with a method ``residual_parts()``, which
returns the names of its two children (the shortcut's None for the identity) or None when it computes
something else (ResNetE's post-norm blocks do, ``models/resnet_e.py``). ``fuse_residuals`` replaces each
such block of a packed model by a ``PackedResidual`` holding the same children under the same names (the
same state_dict). When the body is a packed conv with its BatchNorm fused in (``swaps.fuse_batchnorm``),
numba's kernel (``conv.xnor_conv``) then does, in one pass over the output:

- the body conv and its BatchNorm, as before;
- the shortcut: the identity's ``+ x`` read in the epilogue; a packed 1x1 conv with its BatchNorm (ResNetE's
  binary downsample) computed from the same packed input, its counts mapped and added in the epilogue;
  any other shortcut (pooling, a float conv) run by torch and added in the epilogue;
- a channels_last input (the stem's max-pool hands one over where only BatchNorm or ReLU lie between,
  ``_hand_over_channels_last``) packed and added as it lies, with no NCHW copy;
- the signs of the output, packed for the next unit's conv, which then skips reading its input again
  (units follow each other in the model's order; where another module makes the next unit's input, the
  first call finds out and the unit stops packing for it).

Every value is rounded as the float model rounds it (the affine form is checked per layer, additions are
IEEE float32 additions in the same pairs), so the outputs are bit-identical; the tests compare them.
Whatever the kernel cannot take (another activation, scaling, groups, torch's kernel, training mode,
1x1 output maps) runs the block's own modules, as ``body(x) + shortcut(x)``.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from bitrain.deploy.packed import PackedQLayer, version


def _lead(module: nn.Module | None) -> PackedQLayer | None:
    """The packed conv of a body ``nn.Sequential(conv, Identity...)`` (a fused BatchNorm leaves an
    Identity), or the module itself when it is one; else None."""
    if isinstance(module, PackedQLayer):
        return module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], PackedQLayer):
        if all(isinstance(m, nn.Identity) for m in list(module)[1:]):
            return module[0]
    return None


class _Link:
    """A unit's place in the chain: the unit before, the padding the unit after wants its signs packed
    with (None: no packing), and the last output's signs until the unit after takes them."""

    __slots__ = ("previous", "pack_next", "handoff", "plan")

    def __init__(self) -> None:
        self.previous: PackedResidual | None = None
        self.pack_next: tuple[int, int] | None = None
        self.handoff: tuple[Any, int, tuple[int, int], np.ndarray] | None = None
        self.plan: tuple[tuple, list, list, _Plan | None] | None = None  # (input key, _modes, _tensors, plan)


class _Plan(NamedTuple):
    """What a unit's kernel call needs for one input geometry (``PackedResidual._plan``)."""

    words: np.ndarray
    affine: tuple[np.ndarray, np.ndarray, int]
    shortcut: str  # "x", "kernel" (a packed 1x1 in the same pass) or "torch" (the shortcut's modules)
    kernel_shortcut: Any  # kernels.Shortcut for "kernel"
    out_shape: tuple[int, ...]
    geometry: dict[str, Any]
    fan_in: int
    pack_ok: bool  # the output channels fill whole bytes of the next conv's words
    calls: dict  # pack_out (qh, qw) or None -> the kernel's call for it (conv.prepare), made on first use


def _modes(layers: list[PackedQLayer]) -> list[Any]:
    """Per packed layer: its kernel, mode, fused BatchNorm (the module) and that one's mode."""
    out: list[Any] = []
    for layer in layers:
        norm = layer._modules.get("norm")
        out += [layer.kernel, layer.training, norm, None if norm is None else norm.training]
    return out


def _tensors(layers: list[PackedQLayer]) -> list[tuple]:
    """(dict, name, tensor, version) of every buffer and parameter of the layers and their BatchNorms."""
    entries = []
    for layer in layers:
        norm = layer._modules.get("norm")
        for m in (layer, norm) if norm is not None else (layer,):
            for d in (m._buffers, m._parameters):
                entries += [(d, name, t, version(t)) for name, t in d.items() if t is not None]
    return entries


def _fresh(layers: list[PackedQLayer], modes: list[Any], tensors: list[tuple]) -> bool:
    """True while the layers are as a plan found them: the same modes, the same tensors, unchanged (an
    inference tensor, version -1, keeps no counter)."""
    if _modes(layers) != modes:
        return False
    for d, name, t, v in tensors:
        if d.get(name) is not t or (v >= 0 and t._version != v):
            return False
    return True


class PackedResidual(nn.Module):
    """``body(x) + shortcut(x)`` of a block that declares it (``residual_parts``), fused (module docstring)."""

    def __init__(self, block: nn.Module, body: str, shortcut: str | None) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.body_name, self.shortcut_name, self.source = body, shortcut, type(block).__name__
        # plain attributes, not submodules: the chain (set by fuse_residuals) and the parts, resolved once
        body_module = self._modules[body]
        shortcut_module = self._modules[shortcut] if shortcut else None
        parts = (body_module, shortcut_module, _lead(body_module), _lead(shortcut_module))
        object.__setattr__(self, "link", _Link())
        object.__setattr__(self, "_parts", parts)

    def extra_repr(self) -> str:
        return f"fused {self.source}: {self.body_name}(x) + {self.shortcut_name or 'x'}"

    @property
    def conv(self) -> PackedQLayer | None:
        """The body's packed conv (None: the unit runs its modules as they are)."""
        return self._parts[2]

    @property
    def shortcut_conv(self) -> PackedQLayer | None:
        """The shortcut's packed 1x1 conv, or None (the identity, or a shortcut of other layers)."""
        return self._parts[3]

    def takes_packed(self) -> bool:
        """True when the unit before packs this unit's input for it (the model's order; checked per call)."""
        prev = self.link.previous
        return prev is not None and prev.link.pack_next is not None

    def pack_input(self, x: torch.Tensor) -> np.ndarray:
        """x's signs packed as this unit's conv reads them (what the unit before hands over)."""
        from bitrain.deploy import packing

        return packing.pack_activations(x, self.conv.settings.padding)

    def _take(self, x: torch.Tensor) -> np.ndarray | None:
        """The packed signs of x from the unit before, if it produced x itself and x is unchanged since."""
        prev = self.link.previous
        if prev is None or prev.link.handoff is None:
            return None
        ref, seen, padding, words = prev.link.handoff
        prev.link.handoff = None
        if ref() is not x:  # something between the two makes this unit's input: stop packing for it
            prev.link.pack_next = None
            return None
        return words if version(x) == seen and padding == self.conv.settings.padding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self._take(x))

    def run(self, x: torch.Tensor, packed: np.ndarray | None = None) -> torch.Tensor:
        """The unit on x; ``packed``: x's signs as ``pack_input`` gives them, when the caller has them."""
        from bitrain.deploy import conv as kernels

        link = self.link
        link.handoff = None
        body, shortcut = self._parts[:2]
        plan = self._plan(x)
        if x.dim() == 4 and not x.is_contiguous() and (plan is None or plan.shortcut == "torch"):
            x = x.contiguous()  # a channels_last input (fuse_residuals' hand-over): torch's layers get NCHW
            plan = self._plan(x)
        if plan is None:
            return body(x) + (x if shortcut is None else shortcut(x))
        residual = None
        if plan.shortcut != "kernel":
            residual = x if plan.shortcut == "x" else shortcut(x)
            if tuple(residual.shape) != plan.out_shape or residual.dtype != torch.float32:
                return body(x) + residual  # a sum that broadcasts, promotes or fails: as the float model's
        pack_out = None
        if link.pack_next is not None and plan.pack_ok and not torch.is_inference_mode_enabled():
            # (under inference_mode the output keeps no version counter, so an in-place change before the
            # next unit could not be seen: that unit packs its input itself)
            pack_out = link.pack_next
        call = plan.calls.get(pack_out)
        if call is None:
            call = plan.calls[pack_out] = self._call(x, plan, pack_out)
        result = kernels.run(call, x, packed, residual)
        if pack_out is None:
            return result
        out, signs = result
        link.handoff = (weakref.ref(out), out._version, pack_out, signs)
        return out

    @staticmethod
    def _call(x: torch.Tensor, plan: _Plan, pack_out: tuple[int, int] | None) -> Any:
        """The kernel's call (``conv.prepare``) for the plan, packing its output with ``pack_out`` (or not)."""
        from bitrain.deploy import conv as kernels

        call = kernels.prepare(
            tuple(x.shape),
            plan.words,
            fan_in=plan.fan_in,
            count=True,
            affine=plan.affine,
            **plan.geometry,
            shortcut=plan.kernel_shortcut,
        )
        return call.with_output(pack_out, True)

    def _plan(self, x: torch.Tensor) -> _Plan | None:
        """The kernel call's parts for x, or None (the unit runs its modules); kept for the next call while
        x's shape and the layers' tensors and modes stay the same."""
        key = (x.shape, x.dtype, x.device.type, self.training)
        conv, sc = self._parts[2:]
        layers = [m for m in (conv, sc) if m is not None]
        cached = self.link.plan
        if cached is not None and cached[0] == key and _fresh(layers, *cached[1:3]):
            return cached[3]
        plan = self._make_plan(x, conv, sc) if conv is not None and not self.training else None
        self.link.plan = (key, _modes(layers), _tensors(layers), plan)
        return plan

    def _make_plan(self, x: torch.Tensor, conv: PackedQLayer, sc: PackedQLayer | None) -> _Plan | None:
        from bitrain.deploy import conv as kernels

        ready = conv.unit_plan(x)
        if ready is None:
            return None
        s = conv.settings
        out_hw = conv._output_size(*x.shape[-2:])
        kind, fused = ("x" if self._parts[1] is None else "torch"), None
        sc_ready = sc.unit_plan(x) if sc is not None else None
        if sc_ready is not None and self._same_pixels(conv, sc, x, out_hw):
            (alpha, beta, form), (ph, pw) = sc_ready[1], s.padding
            kind, fused = "kernel", kernels.Shortcut(sc_ready[0], ph, pw, sc.fan_in, form, alpha, beta)
        geometry = dict(kernel_size=s.kernel_size, stride=s.stride, padding=s.padding, dilation=s.dilation)
        out_shape = (x.shape[0], conv.out_features, *out_hw)
        pack_ok = conv.out_features % 8 == 0
        return _Plan(ready[0], ready[1], kind, fused, out_shape, geometry, conv.fan_in, pack_ok, {})

    @staticmethod
    def _same_pixels(conv: PackedQLayer, sc: PackedQLayer, x: torch.Tensor, out_hw: tuple[int, int]) -> bool:
        """True when the shortcut is a 1x1 conv that reads input pixel (oh sh, ow sw) for output (oh, ow)
        with the body conv's stride and output size: the center words of the body's packed input."""
        s, t = conv.settings, sc.settings
        return (
            t.kernel_size == (1, 1)
            and t.padding == (0, 0)
            and t.stride == s.stride
            and sc.out_features == conv.out_features
            and sc._output_size(*x.shape[-2:]) == out_hw
        )


def fuse_residuals(model: nn.Module) -> int:
    """Replace every block with ``residual_parts()`` whose body is a packed conv by a ``PackedResidual``
    (same children, same names, same outputs) and link consecutive units, so that each packs its output's
    signs for the next one. Returns the number of units."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            declare = getattr(child, "residual_parts", None)
            parts = declare() if callable(declare) else None
            if parts is None or _lead(getattr(child, parts[0])) is None:
                continue
            parent._modules[name] = PackedResidual(child, *parts)
            replaced += 1
    units = [m for m in model.modules() if isinstance(m, PackedResidual)]
    for unit in units:
        _hand_over_channels_last(model, unit)
    for a, b in zip(units, units[1:]):
        nxt = b.conv
        if nxt is not None and nxt.fused_sign and nxt.settings.groups == 1:
            a.link.pack_next = nxt.settings.padding
        b.link.previous = a
    return replaced


_PER_CHANNEL = (nn.BatchNorm2d, nn.ReLU, nn.Identity)  # the same values in either memory layout


def _hand_over_channels_last(model: nn.Module, unit: PackedResidual) -> bool:
    """Where the unit's input comes, through ``nn.Sequential`` order and per-channel layers only, from a
    module that can hand on channels_last (``channels_last_out``: ``swaps.ChannelsLastMaxPool2d``), let it: the
    unit packs that layout in place (64 channels per compare) and adds it as its residual, and the NCHW
    copy is not made. True when set."""
    parents = {id(c): (p, name) for p in model.modules() for name, c in p.named_children()}
    node = unit
    while True:  # up while the unit (or its container) is the first child of a Sequential
        parent, name = parents.get(id(node), (None, None))
        if not isinstance(parent, nn.Sequential):
            return False
        names = list(parent._modules)
        if names.index(name) > 0:
            break
        node = parent
    for before in reversed(names[: names.index(name)]):
        module = parent._modules[before]
        if hasattr(type(module), "channels_last_out"):
            module.channels_last_out = True
            return True
        if type(module) not in _PER_CHANNEL:
            return False
    return False
