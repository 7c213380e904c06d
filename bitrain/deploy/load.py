"""``load_packed`` (``bitrain.load_packed``): a packed export rebuilt as a model, then the engine's swaps.

The model is built by the zoo's ``build_model(**model_args)`` (or the caller's factory), its 1-bit layers
are replaced by ``PackedQLayer`` and the file's tensors loaded; then the load-time module swaps
(``swaps.py``): the channels_last stem always, and with ``fuse_bn`` the BatchNorms moved into the packed
convs and the residual blocks fused into one kernel call each (``fused.py``). All keep the outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from bitrain.deploy.export import is_packed, read_metadata
from bitrain.deploy.fused import fuse_residuals
from bitrain.deploy.packed import PackedQLayer, use_kernel
from bitrain.deploy.settings import LayerSettings
from bitrain.deploy.swaps import channels_last_stem, fuse_batchnorm
from bitrain.errors import UserError


def load_packed(
    path: str | Path,
    model_factory: Callable[..., nn.Module] | None = None,
    *,
    kernel: str | None = None,
    fuse_bn: bool = True,
) -> nn.Module:
    """Rebuild the model of a packed export, its 1-bit layers replaced by ``PackedQLayer`` (eval mode).

    ``model_factory(**model_args)`` builds the float model (default: the zoo's ``build_model``, for a model
    outside it your own class); the packed layers and tensors then replace its binary weights. ``kernel``:
    ``numba``, ``torch`` or ``auto`` (numba when it imports), default $BITRAIN_KERNEL or auto
    (``packed.resolve_kernel``). ``fuse_bn``: move each BatchNorm2d that follows a packed conv into it
    (``swaps.fuse_batchnorm``: the same outputs, one pass over memory fewer), then run each residual block
    that declares itself (``residual_parts``) as one fused unit (``fused.fuse_residuals``: conv, BatchNorm,
    shortcut, sum and the next conv's packing in one kernel call; the same outputs); False keeps the float
    model's modules one for one (the stem's channels_last swap aside, ``swaps.channels_last_stem``).
    """
    from safetensors.torch import load_file

    info = read_metadata(path)
    args = dict(info["model_args"])
    if model_factory is None:
        from bitrain.models import build_model as model_factory
    model = _with_packed_layers(model_factory(**args), info["layers"], path)
    tensors = load_file(str(path))
    for name, settings in info["layers"].items():
        prefix = f"{name}." if name else ""
        tensors.pop(prefix + "weight_shape", None)
        tensors.setdefault(prefix + "weight_scale", torch.ones(settings["shape"][0]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not fit the model {args.get('name', '?')!r}: {e}") from None
    use_kernel(model, kernel)
    channels_last_stem(model)
    if fuse_bn:
        fuse_batchnorm(model)
        fuse_residuals(model)
    return model.eval()


def _with_packed_layers(model: nn.Module, layers: dict, path: str | Path) -> nn.Module:
    """``model`` with each layer named in the export's ``layers`` replaced by a ``PackedQLayer``."""
    for name, data in layers.items():
        try:
            settings = LayerSettings.from_json(data)
        except TypeError as e:  # a key missing or unknown to this bitrain
            raise UserError(f"{path}: the settings of layer {name!r} do not read ({e})") from None
        layer = model.get_submodule(name) if name else model
        if not is_packed(layer) or tuple(layer.weight.shape) != settings.shape:
            raise UserError(
                f"{path}: layer {name!r} of the rebuilt model does not match the export "
                f"(expected a 1-bit {settings.type} with weight {list(settings.shape)})"
            )
        packed = PackedQLayer(settings, copy.deepcopy(layer.act))
        if not name:  # the whole model is one binary layer
            model = packed
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
    return model
