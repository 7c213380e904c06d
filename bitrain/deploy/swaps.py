"""The engine's load-time module swaps: what ``load_packed`` (and the CLI's float-model reader) changes in a
model built by the zoo, each with the same outputs, as torch.ao's ``fuse_modules`` does for conv + bn.

- ``channels_last_stem``: every ``nn.MaxPool2d`` becomes a ``ChannelsLastMaxPool2d`` and the first conv of a
  stem that ends in one a ``StemConv2d``: at inference on the CPU the stem runs channels_last (oneDNN's conv
  and torch's pool are vectorised over channels there) and the pool can hand a packed model's first fused
  unit its channels_last output (``fused.fuse_residuals``). A stem that is exactly conv -> BatchNorm ->
  ReLU -> max-pool pools first and applies its BatchNorm and ReLU to the pooled map, 4x smaller, with
  bit-identical values (``StemConv2d.pool_first``);
- ``fuse_batchnorm``: each BatchNorm2d after a packed conv moves into it (``PackedQLayer.norm``), and the
  kernel applies it in its epilogue (``epilogue.batchnorm_affine``);
- ``fused.fuse_residuals``: residual blocks that declare ``residual_parts()`` become ``PackedResidual`` units.

Training never sees these classes: the zoo builds plain ``nn.Conv2d`` / ``nn.MaxPool2d``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from bitrain.deploy.packed import PackedQLayer

# modules a stem's first conv may reach its max-pool through (values per channel, or a conv of the stem)
_STEM = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.PReLU, nn.Identity)


def _inference_on_cpu(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """A 4-d CPU tensor in a forward that takes no gradient of it or of ``params`` (eval, validation, export)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return x.dim() == 4 and x.device.type == "cpu" and not grad


class _PoolFirst:
    """The shared state of a conv -> BatchNorm -> ReLU -> max-pool stem that pools before its BatchNorm and
    ReLU at inference. Both are monotone per channel (BatchNorm: a float ``x * a + b`` per channel, non-
    decreasing where its weight is >= 0, non-increasing where < 0; ReLU: non-decreasing), and a monotone
    function commutes with a window's max (with its min where decreasing): pooling first gives the same
    bits. The conv negates the channels whose BatchNorm weight is negative (negated weights give exactly
    the negated sums: rounding is symmetric), so one max-pool finds their minima; the pool negates them
    back, then applies the BatchNorm and the ReLU, themselves unchanged, to the pooled map. ``active`` is set
    by the conv for the one forward it decides to run this way (eval BatchNorm with running statistics, a
    CPU input, no gradient asked) and cleared by the pool, so BatchNorm and ReLU pass their input through
    only inside that forward."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        self.bn = bn
        self._local = threading.local()  # per thread: one model may serve several threads at once

    @property
    def active(self) -> bool:
        return getattr(self._local, "active", False)

    @active.setter
    def active(self, value: bool) -> None:
        self._local.active = value

    def __getstate__(self) -> dict:  # copy.deepcopy and pickle: the BatchNorm, and a fresh flag on load
        return {"bn": self.bn}  # (a state, not __reduce__ arguments: the BatchNorm refers back to this plan)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bn"])

    def signs(self) -> torch.Tensor | None:
        """+-1 per channel (-1 where the BatchNorm's weight is negative), or None when none is."""
        w = self.bn.weight
        if w is None or not bool((w < 0).any()):
            return None
        return torch.where(w < 0, -1.0, 1.0).to(w.dtype).detach()

    def usable(self, x: torch.Tensor, conv: nn.Conv2d) -> bool:
        bn = self.bn
        params = [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]
        return not bn.training and bn.running_mean is not None and _inference_on_cpu(x, *params)


class _Deferred:
    """Mixin for the BatchNorm and ReLU of a pool-first stem: inside a pool-first forward they pass their
    input through (the pool applies them to its output); otherwise they are the plain module."""

    pool_first: _PoolFirst | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_first is not None and self.pool_first.active:
            return x
        return super().forward(x)  # type: ignore[misc]


class StemBatchNorm2d(_Deferred, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` of a pool-first stem (``_PoolFirst``)."""


class StemReLU(_Deferred, nn.ReLU):
    """``nn.ReLU`` of a pool-first stem (``_PoolFirst``)."""


class StemConv2d(nn.Conv2d):
    """``nn.Conv2d`` for the first conv of a stem that ends in ``ChannelsLastMaxPool2d``: at inference on the
    CPU it takes its input as channels_last, so the conv, BatchNorm, ReLU and pool of the stem all run there
    (oneDNN's conv and torch's pool are vectorised over channels: the ImageNet stem of ResNet-18 at batch
    16 runs in 19 ms, not 28), and the pool hands the next layer NCHW again. The values agree with NCHW's
    to float rounding (the conv sums in another order); training keeps NCHW throughout.

    ``pool_first`` (set by ``channels_last_stem`` for a conv -> BatchNorm -> ReLU -> max-pool stem): at
    inference the conv's channels with a negative BatchNorm weight come out negated and the pool applies
    the BatchNorm and ReLU after pooling (``_PoolFirst``): the same bits, two passes over the full-size map
    fewer."""

    pool_first: _PoolFirst | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.pool_first
        if plan is not None:
            plan.active = False
        if not (_inference_on_cpu(x, self.weight) and x.is_contiguous()):
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        if plan is None or not plan.usable(x, self):
            return super().forward(x)
        plan.active = True
        signs = plan.signs()
        if signs is None:
            return super().forward(x)
        bias = None if self.bias is None else self.bias * signs
        return self._conv_forward(x, self.weight * signs.view(-1, 1, 1, 1), bias)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU tensor in channels_last and returns it NCHW when no gradient is
    taken: torch's CPU max-pool is vectorised over channels only in channels_last, 4x faster for the
    64x112x112 maps of an ImageNet stem (batch 16: 10 against 41 ms with the two copies), and a max is
    exact. Training keeps the plain path (its backward is slower through the copies).

    ``channels_last_out``: hand the channels_last result on as it is (no NCHW copy). A packed model sets it
    when a fused unit that reads channels_last takes the pool's output through per-channel layers only
    (``fused.fuse_residuals``); the values are the same."""

    channels_last_out = False
    pool_first: _PoolFirst | None = None  # a pool-first stem's BatchNorm and ReLU, applied after the pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.pool_first
        if plan is not None and plan.active:
            plan.active = False
            y = super().forward(x.contiguous(memory_format=torch.channels_last))
            signs = plan.signs()
            if signs is not None:  # the minima of the negated channels, back to their sign
                y.mul_(signs.view(1, -1, 1, 1))
            y = torch.relu_(nn.BatchNorm2d.forward(plan.bn, y))
            return y if self.channels_last_out else y.contiguous()
        if self.return_indices or not _inference_on_cpu(x):
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        return y if self.channels_last_out else y.contiguous()


def _swap_class(module: nn.Module, cls: type) -> None:
    module.__class__ = cls  # the same parameters, buffers and hooks: only forward changes


def channels_last_stem(model: nn.Module) -> int:
    """Swap each ``nn.MaxPool2d`` of ``model`` for a ``ChannelsLastMaxPool2d`` and the model's first
    ``nn.Conv2d``, when it starts a stem that reaches such a pool in its ``nn.Sequential`` through convs,
    BatchNorm and activations only, for a ``StemConv2d`` (in place; the same state_dict). A stem that is
    exactly conv, BatchNorm2d, ReLU, max-pool (3x3, the ImageNet stem) also pools first at inference
    (``_PoolFirst``: its BatchNorm and ReLU become ``StemBatchNorm2d`` and ``StemReLU``). Returns the number
    of modules swapped."""
    swapped = 0
    for m in model.modules():
        if type(m) is nn.MaxPool2d:
            _swap_class(m, ChannelsLastMaxPool2d)
            swapped += 1
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if type(first) is not nn.Conv2d:
        return swapped
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq)
        if not any(c is first for c in children):
            continue
        chain = children[next(i for i, c in enumerate(children) if c is first) :]
        for k, c in enumerate(chain):
            if isinstance(c, ChannelsLastMaxPool2d):
                _swap_class(first, StemConv2d)
                return swapped + 1 + _pool_first(chain[: k + 1])
            if not isinstance(c, _STEM):
                break
    return swapped


def _pool_first(chain: list[nn.Module]) -> int:
    """Make a conv, BatchNorm2d, ReLU, max-pool chain pool first (``_PoolFirst``); the modules swapped."""
    if len(chain) != 4 or [type(c) for c in chain[1:3]] != [nn.BatchNorm2d, nn.ReLU]:
        return 0
    conv, bn, relu, pool = chain
    if pool.return_indices or pool.ceil_mode or bn.num_features != conv.out_channels:
        return 0
    _swap_class(bn, StemBatchNorm2d)
    _swap_class(relu, StemReLU)
    plan = _PoolFirst(bn)
    for module in chain:  # an instance attribute, not a submodule: the state_dict stays the same
        module.__dict__["pool_first"] = plan
    return 2


def plain(model: nn.Module) -> nn.Module:
    """Undo ``channels_last_stem`` in place (the zoo's plain modules again, e.g. for an exporter's trace)."""
    for m in model.modules():
        base = _PLAIN.get(type(m))
        if base is not None:
            m.__dict__.pop("pool_first", None)
            _swap_class(m, base)
    return model


_PLAIN = {
    StemConv2d: nn.Conv2d,
    StemBatchNorm2d: nn.BatchNorm2d,
    StemReLU: nn.ReLU,
    ChannelsLastMaxPool2d: nn.MaxPool2d,
}


def fuse_batchnorm(model: nn.Module) -> int:
    """Move each BatchNorm2d that directly follows a packed conv in an ``nn.Sequential`` into that layer
    (``PackedQLayer.norm``; an ``nn.Identity`` takes its place), as torch.ao's ``fuse_modules`` does for
    conv + bn. The outputs are the same (``batchnorm_affine``); the layer alone now includes its BatchNorm,
    and the BatchNorm's tensors are under ``<layer>.norm`` in the state_dict. Returns the number fused."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            layer, norm = seq._modules[first], seq._modules[second]
            if (
                isinstance(layer, PackedQLayer)
                and layer.is_conv
                and layer.norm is None
                and type(norm) is nn.BatchNorm2d
            ):
                layer.norm = norm
                seq._modules[second] = nn.Identity()
                fused += 1
    return fused
