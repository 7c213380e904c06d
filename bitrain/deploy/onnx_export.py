"""ONNX export: the float graph of the eval model, signs as ops (``where(x >= 0, 1, -1)``), for onnxruntime
and the tools that take ONNX; ``OnnxModel`` runs such a file with onnxruntime as a torch module.

The bitrain model does not export as it is (QConv2d's forward branches on the batch size, the sign is an
autograd Function), so an *export twin* is exported instead: a copy in which each quantized QConv2d /
QLinear is an ``ExportQConv`` / ``ExportQLinear`` with the same eval outputs (the input quantizer as a sign
or the identity, the pad value as an explicit pad, the quantized weight as a buffer, BMXNet's offset and
XNOR-Net's K), and the engine's channels_last stem swaps are undone. ``torch.onnx.export(dynamo=True)``,
dynamic batch; the metadata (``model_args``, ``meta``) in the file's ``metadata_props`` as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitrain.binary.layers import QConv2d, QLinear
from bitrain.deploy import swaps
from bitrain.deploy.ov_layers import signs_act
from bitrain.errors import UserError

MISSING = "ONNX export/engine needs onnx, onnxruntime and onnxscript: pip install 'bitrain[onnx]'"


def _input_fn(layer: nn.Module, name: str):
    if layer.act.is_identity:
        return None
    if signs_act(layer.act):
        return "sign"
    raise UserError(
        f"ONNX export: layer {name}: input quantizer {layer.act.method!r} at {layer.act.bits} bits is not "
        "supported (32-bit identity and the sign quantizers are)"
    )


class ExportQConv(nn.Module):
    """A QConv2d's eval forward in plain traceable ops."""

    def __init__(self, layer: QConv2d, name: str):
        super().__init__()
        self.sign = _input_fn(layer, name) == "sign"
        w = layer.quantized_weight().detach().float()
        self.offset = layer.apply_offset
        self.register_buffer("w", w * 0.5 if self.offset else w)
        self.fan_in = layer.fan_in
        self.xnor = layer.approximation == "xnor"
        self.pad_value = layer.pad_value
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        self.padding, self.kernel_size = layer.qpadding, layer.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = torch.where(x >= 0, 1.0, -1.0) if self.sign else x
        ph, pw = self.padding
        if ph or pw:
            xin = F.pad(xin, (pw, pw, ph, ph), value=self.pad_value)
        y = F.conv2d(xin, self.w, None, self.stride, 0, self.dilation, self.groups)
        if self.offset:
            y = y + self.fan_in / 2.0
        if self.xnor:
            a = x.abs().mean(dim=1, keepdim=True)
            k = torch.full((1, 1, *self.kernel_size), 1.0 / (self.kernel_size[0] * self.kernel_size[1]))
            y = y * F.conv2d(a, k, None, self.stride, self.padding, self.dilation)
        return y


class ExportQLinear(nn.Module):
    """A QLinear's eval forward in plain traceable ops."""

    def __init__(self, layer: QLinear, name: str):
        super().__init__()
        self.sign = _input_fn(layer, name) == "sign"
        w = layer.quantized_weight().detach().float()
        self.offset, self.fan_in = layer.apply_offset, layer.fan_in
        self.register_buffer("w", w * 0.5 if self.offset else w)
        self.xnor = layer.approximation == "xnor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(torch.where(x >= 0, 1.0, -1.0) if self.sign else x, self.w)
        if self.offset:
            y = y + self.fan_in / 2.0
        return y * x.abs().mean(dim=-1, keepdim=True) if self.xnor else y


def export_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) with the same outputs whose forward the ONNX exporter takes."""
    twin = copy.deepcopy(model).eval()
    for name, m in list(twin.named_modules()):
        for key, child in list(m.named_children()):
            full = f"{name}.{key}" if name else key
            if isinstance(child, QConv2d) and not child.full_precision:
                setattr(m, key, ExportQConv(child, full))
            elif isinstance(child, QLinear) and not child.full_precision:
                setattr(m, key, ExportQLinear(child, full))
    return swaps.plain(twin)  # the zoo's modules: the inference-time swaps trace no better


def export_onnx(
    model: nn.Module, out_path: str | Path, *, input_shape, model_args: dict, meta: dict | None = None
) -> dict[str, Any]:
    """Write the export twin of ``model`` to ``out_path`` (ONNX, dynamic batch, metadata_props)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise UserError(MISSING) from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    twin = export_twin(model)
    example = torch.zeros(*[int(s) for s in input_shape])
    batch = torch.export.Dim("batch", min=1)
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping ..." lines
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                twin,
                (example,),
                str(out_path),
                input_names=["images"],
                output_names=["logits"],
                dynamo=True,
                dynamic_shapes=({0: batch},),
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"ONNX export failed: {msg}") from None
        finally:
            quiet.setLevel(level)
    proto = onnx.load(str(out_path))
    for key, value in (("model_args", model_args), ("meta", meta or {})):
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"bitrain.{key}", json.dumps(value, sort_keys=True, default=str)
    onnx.save(proto, str(out_path))
    return {"path": str(out_path), "bytes": out_path.stat().st_size}


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime (CPU) as a torch module: float NCHW batch in, logits out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(MISSING) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"{path} is not an ONNX model ({str(e).strip().splitlines()[0][:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def metadata(self) -> dict[str, Any]:
        props = self.session.get_modelmeta().custom_metadata_map
        return {k[len("bitrain.") :]: json.loads(v) for k, v in props.items() if k.startswith("bitrain.")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = x.detach().float().cpu().contiguous().numpy()
        out = self.session.run(None, {self.input_name: xn})[0]
        return torch.from_numpy(out.copy()).to(x.device)
