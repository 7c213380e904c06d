"""One reader for everything bitrain writes: a model, its ``build_model`` kwargs and its training config.

Accepts a training checkpoint (``*.pt``: weights-only load, checksum verified), a run's final float
weights (``model.safetensors``), a packed 1-bit export (``bitrain export``), an OpenVINO IR (``*.xml``)
or ONNX file (``*.onnx``) written by ``bitrain export``, or a run directory (its ``checkpoints/best.pt``,
else ``last.pt``, else ``model.safetensors``). ``engine`` (``--engine``) runs a float model another way:
``numba`` packed in memory (the packed engine), ``openvino`` as an in-memory IR, ``torch`` as it is. ``bitrain eval``,
``bitrain export`` and the Python API (``bitrain.load_model``) all read here; a packed export is rebuilt by
``bitrain.deploy.load.load_packed``, and a float model gets the engine's inference swaps
(``deploy.swaps.channels_last_stem``: the same values, a faster CPU stem).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch.nn as nn

from bitrain.deploy import export as packed
from bitrain.deploy.load import load_packed
from bitrain.deploy.swaps import channels_last_stem
from bitrain.errors import UserError
from bitrain.models import build_model
from bitrain.train.checkpoint import load_checkpoint


class LoadedModel(NamedTuple):
    model: nn.Module  # in eval mode
    model_args: dict[str, Any]  # the exact kwargs of build_model, ``name`` included
    config: dict[str, Any]  # the training config it came with, or {}
    meta: dict[str, Any]  # the checkpoint's trainer state / the export's meta, or {}
    source: Path  # the file read (a run directory resolved to one of its files)


def resolve_source(path: str | Path) -> Path:
    """A file as given; a run directory -> its best.pt, else last.pt, else model.safetensors."""
    path = Path(path)
    if path.is_dir():
        for candidate in ("checkpoints/best.pt", "checkpoints/last.pt", "model.safetensors"):
            if (path / candidate).is_file():
                return path / candidate
        raise UserError(
            f"{path} is a folder without checkpoints/best.pt, checkpoints/last.pt or "
            "model.safetensors; pass a checkpoint file"
        )
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


ENGINES = ("numba", "openvino", "torch")
ENGINE_HELP = (
    "run a checkpoint on: numba (packed 1-bit in memory), openvino (an in-memory IR, BinaryConvolution), "
    "torch (the float-latent model; the default for a checkpoint); an export runs on its own engine"
)
_FILE_ENGINE = {".xml": "openvino", ".onnx": "onnxruntime"}


def input_shape(model_args: dict[str, Any], batch: int = 1) -> tuple[int, int, int, int]:
    """(N, C, H, W) of the model's input, from its build_model kwargs (in_channels, image_size)."""
    size = model_args.get("image_size")
    if size is None:
        raise UserError(f"model {model_args.get('name')!r} records no image_size: cannot fix the input shape")
    return batch, int(model_args.get("in_channels", 3)), int(size), int(size)


def load_model(path: str | Path, engine: str | None = None) -> LoadedModel:
    """The model stored in ``path`` (any file bitrain writes, or a run directory), rebuilt from its
    ``model_args`` with its weights, in eval mode, run by ``engine`` (None: the file's own: torch for a
    float model, numba for a packed export, OpenVINO / onnxruntime for an IR / ONNX file). Anything that
    does not fit is a UserError naming the file."""
    if engine is not None and engine not in ENGINES:
        raise UserError(f"--engine {engine!r}; valid: {', '.join(ENGINES)}")
    source = resolve_source(path)
    if source.suffix in _FILE_ENGINE or (engine is not None and _is_packed(source)):
        return _load_export(source, engine)
    loaded = _load_float(source)
    if engine in (None, "torch"):
        return loaded
    return loaded._replace(model=_engine_model(loaded, engine))


def _is_packed(source: Path) -> bool:
    return source.suffix == ".safetensors" and _safetensors_metadata(source).get("format") == packed.FORMAT


def _load_export(source: Path, engine: str | None) -> LoadedModel:
    """An IR, ONNX file or packed export; ``engine`` must be the one it runs on."""
    own = _FILE_ENGINE.get(source.suffix, "numba")
    if engine is not None and engine != own and not (own == "onnxruntime" and engine == "torch"):
        raise UserError(f"{source} runs on {own}; --engine {engine} needs the checkpoint (or leave --engine out)")
    if source.suffix == ".xml":
        from bitrain.deploy.openvino import load_openvino

        model, meta = load_openvino(source)
    elif source.suffix == ".onnx":
        from bitrain.deploy.onnx_export import OnnxModel

        model = OnnxModel(source)
        meta = model.metadata()
        if "model_args" not in meta:
            raise UserError(f"{source} has no bitrain metadata (model_args): it was not written by bitrain export")
    else:
        return _load_float(source)
    extra = meta.get("meta") or {}
    config = {**_run_config(source), **(extra.get("config") or {})}
    return LoadedModel(model, dict(meta["model_args"]), config, extra, source)


def _engine_model(loaded: LoadedModel, engine: str) -> nn.Module:
    """The float model of ``loaded`` packed for numba, or as an in-memory OpenVINO graph."""
    if engine == "openvino":
        from bitrain.deploy.openvino import OpenVINOModel, build_graph

        return OpenVINOModel(build_graph(loaded.model, input_shape(loaded.model_args)))
    import tempfile

    from bitrain.deploy.export import export_packed

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "packed.safetensors"
        export_packed(loaded.model, path, model_args=loaded.model_args)
        return load_packed(path, build_model)


def _load_float(source: Path) -> LoadedModel:
    if source.suffix != ".safetensors":
        payload = load_checkpoint(source)
        if "model_args" not in payload or "model" not in payload:
            raise UserError(f"checkpoint {source} has no 'model_args'/'model': it was not written by bitrain train")
        args = dict(payload["model_args"])
        model = _with_weights(build_model(**args), payload["model"], source, args)
        return LoadedModel(model, args, dict(payload.get("config") or {}), dict(payload.get("trainer") or {}), source)
    raw = _safetensors_metadata(source)
    config = _run_config(source)
    if raw.get("format") == packed.FORMAT:
        meta = packed.read_metadata(source)
        extra = meta.get("meta") or {}
        config = {**config, **(extra.get("config") or {})}  # an export that records its data wins
        return LoadedModel(load_packed(source, build_model), dict(meta["model_args"]), config, extra, source)
    if "model_args" not in raw:
        raise UserError(
            f"{source} has no bitrain metadata (model_args); it is neither a run's "
            "model.safetensors nor a packed export"
        )
    from safetensors.torch import load_file

    args = json.loads(raw["model_args"])
    return LoadedModel(
        _with_weights(build_model(**args), load_file(str(source)), source, args), args, config, {}, source
    )


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The float state dict in a checkpoint, a run's model.safetensors or a run directory (not a packed
    export: it holds signs, not the latent weights a run continues from)."""
    source = resolve_source(path)
    if source.suffix != ".safetensors":
        payload = load_checkpoint(source)
        if "model" not in payload:
            raise UserError(f"checkpoint {source} holds no model weights")
        return dict(payload["model"])
    if _safetensors_metadata(source).get("format") == packed.FORMAT:
        raise UserError(
            f"{source} is a packed 1-bit export (signs only); start from the run's checkpoint "
            "or model.safetensors instead"
        )
    from safetensors.torch import load_file

    return load_file(str(source))


def _with_weights(model: nn.Module, state: dict, path: Path, args: dict) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not fit model {args.get('name')!r} ({str(e).splitlines()[0][:200]})"
        ) from None
    channels_last_stem(model)  # inference: the stem through channels_last, as a packed model runs it
    return model.eval()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # not a safetensors file at all
        raise UserError(f"{path} is not a safetensors file ({str(e)[:200]})") from None


def _run_config(path: Path) -> dict[str, Any]:
    """config.yaml of the run a file belongs to (same folder, or the folder above checkpoints/)."""
    import yaml

    for folder in (path.parent, path.parent.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                return {}
            return data if isinstance(data, dict) else {}
    return {}
