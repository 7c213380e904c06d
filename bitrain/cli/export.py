"""``bitrain export``: a checkpoint as a packed 1-bit file (safetensors), an OpenVINO IR or an ONNX file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitrain.cli.args import PROG, ArgParser
from bitrain.errors import UserError


def data_record(model_args: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What a runtime outside bitrain needs to feed the model: its data set, class names by index and the
    validation transform (resize to ``image_size``, scale to [0, 1], then (x - mean) / std per channel)."""
    from bitrain.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
    from bitrain.data.sets import DATA_SETS

    spec = DATA_SETS.get(str(config.get("dataset")))
    if spec is None:
        return {}
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if spec.folder else (spec.mean, spec.std)
    record = {"dataset": spec.name, "image_size": model_args.get("image_size"), "classes": list(spec.classes)}
    if mean is not None:
        record.update(mean=list(mean), std=list(std))
    return record


def export_checkpoint(
    ckpt_path: str | Path, out_path: str | Path, fmt: str = "packed", batch: int = 1
) -> dict[str, Any]:
    """Load a bitrain checkpoint (``weights_only``), rebuild its model and write it in ``fmt``."""
    from bitrain.cli.reader import input_shape, load_model

    loaded = load_model(ckpt_path)
    # the training config travels with the export: eval and predict know its data set wherever it is
    meta = {"checkpoint": Path(ckpt_path).name, "trainer": loaded.meta, "config": loaded.config}
    if fmt in ("openvino", "onnx"):  # read by other runtimes: the data record spelled out
        meta["data"] = data_record(loaded.model_args, loaded.config)
    if fmt == "openvino":
        from bitrain.deploy.openvino import export_openvino

        shape = input_shape(loaded.model_args, batch)
        return export_openvino(loaded.model, out_path, input_shape=shape, model_args=loaded.model_args, meta=meta)
    if fmt == "onnx":
        from bitrain.deploy.onnx_export import export_onnx

        shape = input_shape(loaded.model_args, batch)
        return export_onnx(loaded.model, out_path, input_shape=shape, model_args=loaded.model_args, meta=meta)
    from bitrain.deploy.export import export_packed

    return export_packed(loaded.model, out_path, model_args=loaded.model_args, meta=meta)


def _format(out: str, fmt: str | None) -> str:
    from bitrain.deploy.export import SUFFIXES

    if fmt is not None:
        return fmt
    suffix = Path(out).suffix
    if suffix not in SUFFIXES:  # refused before anything is read or written
        what = f"{suffix!r} files" if suffix else "a file without a suffix"
        raise UserError(f"export: no format writes {what} ({out}); valid: {', '.join(SUFFIXES)} (or --format)")
    return SUFFIXES[suffix]


def main(argv: Sequence[str]) -> int:
    """``bitrain export CHECKPOINT OUT``: OUT's suffix (.safetensors, .xml, .onnx) or --format picks the format."""
    p = ArgParser(
        prog=f"{PROG} export",
        description="Export a checkpoint: packed 1-bit safetensors, OpenVINO IR (.xml, BinaryConvolution) or ONNX.",
    )
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--format", choices=["packed", "openvino", "onnx"], help="override the format OUT's suffix picks")
    p.add_argument("--batch-size", type=int, default=1, help="the IR's static batch (openvino; eval reshapes it)")
    ns = p.parse_args(list(argv))
    fmt = _format(ns.out, ns.format)
    info = export_checkpoint(ns.checkpoint, ns.out, fmt, ns.batch_size)
    if fmt == "packed":
        ratio = info["float_state_bytes"] / info["bytes"]
        print(
            f"exported {info['packed_layers']} packed 1-bit layers to {info['path']}: {info['bytes']:,} bytes "
            f"({ratio:.1f}x smaller than the {info['float_state_bytes']:,} bytes of float state)"
        )
    elif fmt == "openvino":
        print(
            f"exported an OpenVINO IR with {info['binary_convs']} BinaryConvolution to {info['path']}: {info['bytes']:,} bytes"
        )
    else:
        print(f"exported ONNX (signs as ops, dynamic batch) to {info['path']}: {info['bytes']:,} bytes")
    return 0
