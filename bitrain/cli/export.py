"""``bitrain export``: a checkpoint's binary weights packed 8 per byte (safetensors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bitrain.cli.args import PROG, ArgParser
from bitrain.errors import UserError


def export_checkpoint(ckpt_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Load a bitrain checkpoint (``weights_only``), rebuild its model and write the packed export."""
    from bitrain.cli.reader import load_model
    from bitrain.deploy.export import export_packed

    loaded = load_model(ckpt_path)
    # the training config travels with the export: eval and predict know its data set wherever it is
    meta = {"checkpoint": Path(ckpt_path).name, "trainer": loaded.meta, "config": loaded.config}
    return export_packed(loaded.model, out_path, model_args=loaded.model_args, meta=meta)


def main(argv: Sequence[str]) -> int:
    """``bitrain export CHECKPOINT OUT.safetensors``: write the packed 1-bit model and print its size."""
    p = ArgParser(prog=f"{PROG} export", description="Pack a checkpoint's binary weights 8 per byte (safetensors).")
    p.add_argument("checkpoint")
    p.add_argument("out")
    ns = p.parse_args(list(argv))
    from bitrain.deploy.export import SUFFIXES

    suffix = Path(ns.out).suffix
    if suffix not in SUFFIXES:  # refused before anything is read or written
        what = f"{suffix!r} files" if suffix else "a file without a suffix"
        raise UserError(f"export: no format writes {what} ({ns.out}); valid: {', '.join(SUFFIXES)}")
    info = export_checkpoint(ns.checkpoint, ns.out)
    ratio = info["float_state_bytes"] / info["bytes"]
    print(
        f"exported {info['packed_layers']} packed 1-bit layers to {info['path']}: {info['bytes']:,} bytes "
        f"({ratio:.1f}x smaller than the {info['float_state_bytes']:,} bytes of float state)"
    )
    return 0
