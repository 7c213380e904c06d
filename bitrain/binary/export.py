"""Packed 1-bit export (safetensors, no pickle) and its exact xnor-popcount reference inference.

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

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from bitrain.binary.layers import QConv2d, QLinear
from bitrain.console import progress
from bitrain.errors import UserError
from bitrain.files import atomic_write_bytes

FORMAT = "bitrain-packed"
VERSION = 1


# ---------------------------------------------------------------------------------------------- bits


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """(..., K) bool (True = +1) -> (..., ceil(K / 8)) uint8, little-endian bit order, zero pad bits."""
    k = positive.shape[-1]
    b = F.pad(positive.to(torch.uint8), (0, (-k) % 8))
    b = b.reshape(*b.shape[:-1], -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=b.device)
    return (b * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(..., nbytes) uint8 -> (..., k) float32 of +-1 (inverse of ``pack_signs``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :k]
    return bits.float() * 2 - 1


def _words(packed: torch.Tensor) -> torch.Tensor:
    """(..., nbytes) uint8 -> (..., ceil(nbytes / 8)) int64 words (zero bytes pad the last word)."""
    packed = F.pad(packed, (0, (-packed.shape[-1]) % 8)).contiguous()
    return packed.view(torch.int64)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits per int64 word (SWAR), computed in place in ``x``; the arithmetic shifts' sign
    bits are masked away and the final multiply wraps, its top byte (<= 64) being the count."""
    t = x >> 1
    x -= t.bitwise_and_(0x5555555555555555)
    t = x >> 2
    x.bitwise_and_(0x3333333333333333).add_(t.bitwise_and_(0x3333333333333333))
    x.add_(x >> 4).bitwise_and_(0x0F0F0F0F0F0F0F0F)  # each byte now holds its own count (0..8)
    return x.mul_(0x0101010101010101).bitwise_right_shift_(56)


def xnor_dot(x_words: torch.Tensor, w_words: torch.Tensor, fan_in: int, chunk: int = 1 << 18) -> torch.Tensor:
    """+-1 dot products from packed operands: dot = fan_in - 2 popcount(x xor w).

    x_words (M, nw) int64, w_words (O, nw) int64 -> (M, O) int64; M is chunked so the (m, O, nw)
    xor never exceeds ``chunk`` words (2 MiB: stays in cache).
    """
    m, nw = x_words.shape
    step = max(1, chunk // max(1, w_words.shape[0] * nw))
    out = [fan_in - 2 * _popcount(x_words[i : i + step, None, :] ^ w_words[None]).sum(-1) for i in range(0, m, step)]
    return torch.cat(out) if out else x_words.new_zeros((0, w_words.shape[0]))


# ---------------------------------------------------------------------------------- layer semantics


def _is_packed(m: nn.Module) -> bool:
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


def layer_settings(layer: nn.Module) -> dict[str, Any]:
    """The quantization settings and geometry a binary layer needs to be recomputed exactly."""
    pad_value = float(getattr(layer.act, "pad_value", -1.0 if layer.bits_a == 1 else 0.0))
    offset = layer.apply_offset
    s = {
        "type": type(layer).__name__,
        "shape": list(layer.weight.shape),
        "bits": layer.bits,
        "bits_a": layer.bits_a,
        "weight_quantization": str(layer.weight_quantization),
        "activation_method": str(layer.act.method),
        "clip_threshold": float(layer.act.clip_threshold),
        "approximation": layer.approximation,
        "no_offset": bool(layer.no_offset),
        "offset": bool(offset),
        "bias": layer.bias is not None,
        "pad_value": pad_value,
        # xnor-popcount needs +-1 inputs: 1-bit activations padded with -1
        "xnor_inputs": layer.bits_a == 1 and pad_value == -1.0,
    }
    if isinstance(layer, QConv2d):
        s.update(
            stride=list(layer.stride), padding=list(layer.qpadding), dilation=list(layer.dilation), groups=layer.groups
        )
    return s


class PackedQLayer(nn.Module):
    """Reference inference of a 1-bit QConv2d / QLinear from packed weights.

    With +-1 inputs the dot products are computed with xnor + popcount on bit-packed operands
    (input patches from ``unfold``); with other inputs the +-1 weights are unpacked and used in a
    float conv. Then, as QConv2d / QLinear's forward: ``h = dot * scale + bias``,
    ``(h + fan_in) / 2`` where the layer applies the offset (plain +-1 weights, no approximation,
    not ``no_offset``), times the XNOR-Net activation scale K for ``approximation == "xnor"``.
    """

    def __init__(self, settings: dict[str, Any], act: nn.Module):
        super().__init__()
        self.settings = dict(settings)
        shape = settings["shape"]
        self.out_features, self.fan_in = shape[0], int(torch.tensor(shape[1:]).prod())
        self.is_conv = settings["type"] == "QConv2d"
        self.act = act  # the original QActivation: same method and bits
        self.register_buffer("weight_packed", torch.zeros(shape[0], (self.fan_in + 7) // 8, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(shape[0]))
        self.bias = nn.Parameter(torch.zeros(shape[0]), requires_grad=False) if settings["bias"] else None

    def extra_repr(self) -> str:
        s = self.settings
        return f"{s['type']} {tuple(s['shape'])} packed, bits_a={s['bits_a']}, approximation={s['approximation']!r}"

    def _dot_conv(self, xq: torch.Tensor) -> torch.Tensor:
        s = self.settings
        kh, kw = s["shape"][2:]
        ph, pw = s["padding"]
        groups, out = s["groups"], self.out_features
        if not s["xnor_inputs"]:  # float/k-bit input: the +-1 weights unpacked, a float conv
            w = unpack_signs(self.weight_packed, self.fan_in).reshape(s["shape"])
            xq = F.pad(xq, (pw, pw, ph, ph), value=s["pad_value"])
            return F.conv2d(xq, w.to(xq.dtype), None, s["stride"], 0, s["dilation"], groups)
        n, _, h, wd = xq.shape
        if not torch.all(xq.abs() == 1):
            raise RuntimeError(f"activation {s['activation_method']!r} did not give +-1 values")
        bits = F.pad((xq > 0).float(), (pw, pw, ph, ph))  # pad bit 0 = -1, as QConv2d pads with -1
        cols = F.unfold(bits, (kh, kw), dilation=s["dilation"], stride=s["stride"])  # (n, C*kh*kw, L)
        ho = (h + 2 * ph - s["dilation"][0] * (kh - 1) - 1) // s["stride"][0] + 1
        wo = (wd + 2 * pw - s["dilation"][1] * (kw - 1) - 1) // s["stride"][1] + 1
        ell = cols.shape[-1]
        # (n, groups, L, fan_in) patch bits; unfold orders rows (channel, kh, kw) like the weight
        cols = cols.reshape(n, groups, self.fan_in, ell).permute(1, 0, 3, 2) > 0.5
        x_words = _words(pack_signs(cols))  # (groups, n, L, nw)
        w_words = _words(self.weight_packed).reshape(groups, out // groups, -1)
        dots = [xnor_dot(x_words[g].reshape(n * ell, -1), w_words[g], self.fan_in) for g in range(groups)]
        dot = torch.stack(dots)  # (groups, n*L, out/groups)
        dot = dot.reshape(groups, n, ell, out // groups).permute(1, 0, 3, 2)
        # contiguous NCHW like the float conv's output, so the float layers after it sum in the
        # same order and plain (offset) binary nets give bit-identical logits
        dot = dot.reshape(n, out, ho, wo).contiguous()
        return dot.to(xq.dtype)

    def _dot_linear(self, xq: torch.Tensor) -> torch.Tensor:
        if not self.settings["xnor_inputs"]:
            w = unpack_signs(self.weight_packed, self.fan_in)
            return F.linear(xq, w.to(xq.dtype))
        if not torch.all(xq.abs() == 1):
            raise RuntimeError(f"activation {self.settings['activation_method']!r} did not give +-1 values")
        lead = xq.shape[:-1]
        x_words = _words(pack_signs(xq.reshape(-1, self.fan_in) > 0))
        dot = xnor_dot(x_words, _words(self.weight_packed), self.fan_in)
        return dot.reshape(*lead, self.out_features).to(xq.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        xq = self.act(x)
        h = self._dot_conv(xq) if self.is_conv else self._dot_linear(xq)
        view = (1, -1, 1, 1) if self.is_conv else (-1,)
        if s["approximation"] or not torch.all(self.weight_scale == 1):  # binet / xnor scale by mean|W|
            h = h * self.weight_scale.reshape(view)
        if self.bias is not None:
            h = h + self.bias.reshape(view)
        if s["offset"]:
            h = (h + self.fan_in) / 2  # +-1 dot -> number of agreeing bits
        if s["approximation"] == "xnor":
            h = h * _xnor_k(x, s, self.is_conv)
        return h


def _xnor_k(x: torch.Tensor, s: dict[str, Any], is_conv: bool) -> torch.Tensor:
    """XNOR-Net activation scale: mean |x| over channels, box-filtered over each window (zero pad)."""
    if not is_conv:
        return x.abs().mean(-1, keepdim=True)
    kh, kw = s["shape"][2:]
    box = torch.full((1, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
    return F.conv2d(x.abs().mean(1, keepdim=True), box, None, s["stride"], s["padding"], s["dilation"])


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
    binary = [(n, m) for n, m in model.named_modules() if _is_packed(m)]
    for name, layer in progress(binary, "packing"):
        signs, mag = _signs_and_scale(name, layer)
        prefix = f"{name}." if name else ""
        tensors[prefix + "weight_packed"] = pack_signs(signs)
        tensors[prefix + "weight_shape"] = torch.tensor(list(layer.weight.shape), dtype=torch.int64)
        if layer.approximation or not torch.all(mag == 1):
            tensors[prefix + "weight_scale"] = mag.float()
        layers[name] = layer_settings(layer)
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


def load_packed(path: str | Path, model_factory: Callable[..., nn.Module]) -> nn.Module:
    """Rebuild the model of a packed export, its 1-bit layers replaced by ``PackedQLayer`` (eval mode).

    ``model_factory(**model_args)`` builds the float model (``bitrain.load_packed`` passes the zoo's
    ``build_model``); the packed layers and tensors then replace its binary weights.
    """
    from safetensors.torch import load_file

    info = read_metadata(path)
    args = dict(info["model_args"])
    model = model_factory(**args)
    for name, settings in info["layers"].items():
        layer = model.get_submodule(name) if name else model
        if not _is_packed(layer) or list(layer.weight.shape) != settings["shape"]:
            raise UserError(
                f"{path}: layer {name!r} of the rebuilt model does not match the export "
                f"(expected a 1-bit {settings['type']} with weight {settings['shape']})"
            )
        packed = PackedQLayer(settings, copy.deepcopy(layer.act))
        if not name:  # the whole model is one binary layer
            model = packed
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
    tensors = load_file(str(path))
    for name in info["layers"]:
        prefix = f"{name}." if name else ""
        tensors.pop(prefix + "weight_shape", None)
        tensors.setdefault(prefix + "weight_scale", torch.ones(info["layers"][name]["shape"][0]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: tensors do not fit the model {args.get('name', '?')!r}: {e}") from None
    return model.eval()
