"""OpenVINO export and engine: every 1-bit conv a ``BinaryConvolution`` (``ov_layers.py``), the rest float ops.

``export_openvino`` writes an IR (``.xml`` + ``.bin``) with static shapes (BinaryConvolution has no dynamic
batch on the CPU); the metadata (``model_args``, ``meta``: checkpoint, trainer state, training config) is in
the IR's rt_info under ``bitrain``. ``OpenVINOModel`` runs an IR or an in-memory graph as a torch module
(float NCHW batch in, logits out), reshaping it for each new input shape. ``openvino`` is an optional extra.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bitrain.errors import UserError

FORMAT = "bitrain-openvino"
MISSING = "OpenVINO export/engine needs the openvino package: pip install 'bitrain[openvino]'"


def require_openvino():
    """The openvino module, or one clear UserError line when it is not installed."""
    try:
        import openvino
    except ImportError:
        raise UserError(MISSING) from None
    return openvino


def build_graph(model: nn.Module, input_shape, *, meta: dict[str, Any] | None = None):
    """``model`` (eval mode) as an ``openvino.Model`` for inputs of ``input_shape`` (N, C, H, W)."""
    ov = require_openvino()
    import numpy as np
    import openvino.opset14 as ops

    from bitrain.deploy.ov_graph import emit
    from bitrain.deploy.swaps import plain

    model = plain(copy.deepcopy(model)).eval()  # the zoo's modules, not the torch engine's swaps
    x = ops.parameter([int(s) for s in input_shape], np.float32, name="images")
    with torch.no_grad():
        y = emit(model, x)
    graph = ov.Model([ops.result(y)], [x], "bitrain")
    graph.outputs[0].get_tensor().set_names({"logits"})
    for key, value in (meta or {}).items():
        graph.set_rt_info(json.dumps(value, sort_keys=True, default=str), ["bitrain", key])
    graph.set_rt_info(FORMAT, ["bitrain", "format"])
    return graph


def export_openvino(
    model: nn.Module, out_path: str | Path, *, input_shape, model_args: dict, meta: dict | None = None
) -> dict[str, Any]:
    """Write ``model`` as an OpenVINO IR (``out_path`` .xml, its .bin beside). Returns path, bytes and the
    number of BinaryConvolution ops."""
    ov = require_openvino()
    out_path = Path(out_path)
    graph = build_graph(model, input_shape, meta={"model_args": model_args, "meta": meta or {}})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(graph, str(out_path), compress_to_fp16=False)
    return {
        "path": str(out_path),
        "bytes": out_path.stat().st_size + out_path.with_suffix(".bin").stat().st_size,
        "binary_convs": count_ops(graph).get("BinaryConvolution", 0),
    }


def count_ops(graph) -> dict[str, int]:
    """Op type -> count in an ``openvino.Model``."""
    counts: dict[str, int] = {}
    for node in graph.get_ordered_ops():
        counts[node.get_type_name()] = counts.get(node.get_type_name(), 0) + 1
    return counts


def read_metadata(graph) -> dict[str, Any]:
    """The ``bitrain`` rt_info of an IR written by ``export_openvino``: model_args and meta."""
    out: dict[str, Any] = {}
    for key in ("model_args", "meta"):
        if graph.has_rt_info(["bitrain", key]):
            out[key] = json.loads(graph.get_rt_info(["bitrain", key]).astype(str))
    return out


def load_openvino(path: str | Path) -> tuple[OpenVINOModel, dict[str, Any]]:
    """An IR written by ``export_openvino`` as a module, and its metadata."""
    ov = require_openvino()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"OpenVINO model {path} does not exist")
    try:
        graph = ov.Core().read_model(str(path))
    except Exception as e:
        raise UserError(f"{path} is not an OpenVINO IR ({str(e).strip().splitlines()[0][:200]})") from None
    meta = read_metadata(graph)
    if "model_args" not in meta:
        raise UserError(f"{path} has no bitrain metadata (model_args): it was not written by bitrain export")
    return OpenVINOModel(graph), meta


class OpenVINOModel(nn.Module):
    """An ``openvino.Model`` as a torch module: float NCHW batch in, logits out (CPU, float32 compute).

    BinaryConvolution takes static shapes only: the graph is reshaped and compiled once per input shape."""

    def __init__(self, graph, threads: int | None = None):
        super().__init__()
        self.graph = graph
        self.threads = threads if threads is not None else torch.get_num_threads()
        self._compiled: dict[tuple[int, ...], Any] = {}

    def compiled(self, shape: tuple[int, ...]):
        if shape not in self._compiled:
            ov = require_openvino()
            graph = self.graph
            if tuple(graph.inputs[0].get_partial_shape().to_shape()) != shape:
                graph = graph.clone()
                graph.reshape(list(shape))
            config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads}
            self._compiled = {shape: ov.Core().compile_model(graph, "CPU", config)}  # one size at a time
        return self._compiled[shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = x.detach().float().cpu().contiguous().numpy()
        out = self.compiled(tuple(xn.shape))(xn)[0]
        return torch.from_numpy(out.copy()).to(x.device)
