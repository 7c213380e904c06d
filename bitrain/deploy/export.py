"""Packed 1-bit export (safetensors, no pickle); ``load.py`` reads it back (its layers: ``packed.py``).

File layout (``docs/export.md`` has the full description):
- for every Q layer with ``bits == 1`` (name ``L``): ``L.weight_packed`` uint8 (out, ceil(fan_in / 8)),
  the sign bits of the weight as used in forward, one row per output channel, flattened in
  (in_channels / groups, kh, kw) order; little-endian bit order: bit j (value 2**j) of byte i holds
  element 8 i + j, 1 = +1 and 0 = -1, the pad bits of the last byte are 0;
  ``L.weight_shape`` int64 (the float weight's shape); ``L.weight_scale`` float32 (out,) when the
  forward weight is scaled (``binet`` / ``xnor`` approximation or a magnitude-aware quantizer);
- every other entry of the model's state_dict unchanged (float layers, BatchNorm buffers, biases);
- metadata (all strings): ``format`` = "bitrain-packed", ``version``, ``bit_order`` = "little",
  ``model_args`` (JSON: ``name`` + the kwargs of ``build_model``), ``layers`` (JSON: per binary
  layer its quantization settings and geometry), ``meta`` (JSON, free-form).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save

from bitrain.binary.layers import QConv2d, QLinear
from bitrain.console import progress
from bitrain.deploy.reference import pack_signs
from bitrain.deploy.settings import LayerSettings
from bitrain.errors import UserError
from bitrain.files import atomic_write_bytes

FORMAT = "bitrain-packed"
VERSION = 1
# the output suffix each export format owns, and the format's name (``bitrain export --format``)
SUFFIXES = {".safetensors": "packed", ".xml": "openvino", ".onnx": "onnx"}


# ---------------------------------------------------------------------------------- layer semantics


def is_packed(m: nn.Module) -> bool:
    """A QConv2d / QLinear with 1-bit weights: what the export packs."""
    return isinstance(m, (QConv2d, QLinear)) and m.bits == 1


def _signs_and_scale(name: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, fan_in) bool signs and (out,) magnitudes; forward weight must be +-scale per channel."""
    qw = layer.quantized_weight().detach().float().cpu().reshape(layer.weight.shape[0], -1)
    mag = qw.abs().amax(1)
    if not torch.equal(qw.abs(), mag[:, None].expand_as(qw)):
        raise UserError(
            f"layer {name}: weight quantization {layer.weight_quantization!r} does not give "
            f"+-scale weights, so it cannot be packed to 1 bit"
        )
    return qw >= 0, mag


# ------------------------------------------------------------------------------------- file format


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise UserError(f"export: {what} must be JSON-serialisable ({e})") from None


def export_packed(
    model: nn.Module, out_path: str | Path, *, model_args: dict, meta: dict | None = None
) -> dict[str, Any]:
    """Write ``model`` to a safetensors file with its 1-bit layers bit-packed (see module docstring).

    ``model_args`` are the exact kwargs of ``build_model`` (``name`` included) or of the factory
    given to ``load_packed``. Returns ``{"path", "bytes", "packed_layers", "float_state_bytes"}``.
    """
    out_path = Path(out_path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    float_state_bytes = sum(v.numel() * v.element_size() for v in state.values())
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    binary = [(n, m) for n, m in model.named_modules() if is_packed(m)]
    for name, layer in progress(binary, "packing"):
        signs, mag = _signs_and_scale(name, layer)
        prefix = f"{name}." if name else ""
        tensors[prefix + "weight_packed"] = pack_signs(signs)
        tensors[prefix + "weight_shape"] = torch.tensor(list(layer.weight.shape), dtype=torch.int64)
        if layer.approximation or not torch.all(mag == 1):
            tensors[prefix + "weight_scale"] = mag.float()
        layers[name] = LayerSettings.from_layer(layer).to_json()
        del state[prefix + "weight"]
    for k, v in state.items():  # clone: safetensors refuses tensors that share storage
        tensors[k] = v.cpu().clone().contiguous()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "bit_order": "little",
        "model_args": _json(model_args, "model_args"),
        "layers": _json(layers, "layer settings"),
        "meta": json.dumps(meta or {}, sort_keys=True, default=str),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # never leave a half-written export under the final name
    atomic_write_bytes(out_path, save(tensors, metadata=metadata))
    return {
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "packed_layers": len(layers),
        "float_state_bytes": float_state_bytes,
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of a packed export: format, version, model_args, layers, meta."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"export file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise UserError(f"{path} is not a safetensors file ({e})") from None
    if raw.get("format") != FORMAT:
        raise UserError(f"{path} is not a bitrain packed export (metadata format={raw.get('format')!r})")
    if int(raw.get("version", 0)) > VERSION:
        raise UserError(f"{path} has packed format version {raw['version']}; this bitrain reads <= {VERSION}")
    return {
        "format": raw["format"],
        "version": int(raw["version"]),
        "bit_order": raw.get("bit_order", "little"),
        "model_args": json.loads(raw["model_args"]),
        "layers": json.loads(raw["layers"]),
        "meta": json.loads(raw.get("meta", "{}")),
    }
