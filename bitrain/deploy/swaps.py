"""The engine's load-time module swaps: what ``load_packed`` (and the CLI's float-model reader) changes in a
model built by the zoo, each with the same outputs, as torch.ao's ``fuse_modules`` does for conv + bn.

- ``channels_last_stem``: every ``nn.MaxPool2d`` becomes a ``ChannelsLastMaxPool2d`` and the first conv of a
  stem that ends in one a ``StemConv2d``: at inference on the CPU the stem runs channels_last (oneDNN's conv
  and torch's pool are vectorised over channels there) and the pool can hand a packed model's first fused
  unit its channels_last output (``fused.fuse_residuals``);
- ``fuse_batchnorm``: each BatchNorm2d after a packed conv moves into it (``PackedQLayer.norm``), and the
  kernel applies it in its epilogue (``epilogue.batchnorm_affine``);
- ``fused.fuse_residuals``: residual blocks that declare ``residual_parts()`` become ``PackedResidual`` units.

Training never sees these classes: the zoo builds plain ``nn.Conv2d`` / ``nn.MaxPool2d``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bitrain.deploy.packed import PackedQLayer

# modules a stem's first conv may reach its max-pool through (values per channel, or a conv of the stem)
_STEM = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.PReLU, nn.Identity)


def _inference_on_cpu(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """A 4-d CPU tensor in a forward that takes no gradient of it or of ``params`` (eval, validation, export)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return x.dim() == 4 and x.device.type == "cpu" and not grad


class StemConv2d(nn.Conv2d):
    """``nn.Conv2d`` for the first conv of a stem that ends in ``ChannelsLastMaxPool2d``: at inference on the
    CPU it takes its input as channels_last, so the conv, BatchNorm, ReLU and pool of the stem all run there
    (oneDNN's conv and torch's pool are vectorised over channels: the ImageNet stem of ResNet-18 at batch
    16 runs in 19 ms, not 28), and the pool hands the next layer NCHW again. The values agree with NCHW's
    to float rounding (the conv sums in another order); training keeps NCHW throughout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _inference_on_cpu(x, self.weight) and x.is_contiguous():
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a CPU tensor in channels_last and returns it NCHW when no gradient is
    taken: torch's CPU max-pool is vectorised over channels only in channels_last, 4x faster for the
    64x112x112 maps of an ImageNet stem (batch 16: 10 against 41 ms with the two copies), and a max is
    exact. Training keeps the plain path (its backward is slower through the copies).

    ``channels_last_out``: hand the channels_last result on as it is (no NCHW copy). A packed model sets it
    when a fused unit that reads channels_last takes the pool's output through per-channel layers only
    (``fused.fuse_residuals``); the values are the same."""

    channels_last_out = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices or not _inference_on_cpu(x):
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        return y if self.channels_last_out else y.contiguous()


def _swap_class(module: nn.Module, cls: type) -> None:
    module.__class__ = cls  # the same parameters, buffers and hooks: only forward changes


def channels_last_stem(model: nn.Module) -> int:
    """Swap each ``nn.MaxPool2d`` of ``model`` for a ``ChannelsLastMaxPool2d`` and the model's first
    ``nn.Conv2d``, when it starts a stem that reaches such a pool in its ``nn.Sequential`` through convs,
    BatchNorm and activations only, for a ``StemConv2d`` (in place; the same state_dict). Returns the number
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
        for c in children[next(i for i, c in enumerate(children) if c is first) :]:
            if isinstance(c, ChannelsLastMaxPool2d):
                _swap_class(first, StemConv2d)
                return swapped + 1
            if not isinstance(c, _STEM):
                break
    return swapped


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
