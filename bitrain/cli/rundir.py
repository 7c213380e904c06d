"""The run directory: its default name, the guard against mixing two runs, the final weights."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch.nn as nn

from bitrain.files import atomic_write_bytes
from bitrain.errors import UserError

#: what a fresh run writes; --overwrite removes exactly these (and nothing else) from a used folder
RUN_OUTPUTS = ("checkpoints", "tb", "metrics.csv", "model.safetensors", "profile")


def default_run_dir(model: str, dataset: str) -> Path:
    """``runs/<model>-<dataset>-<YYYYmmdd-HHMMSS>``."""
    return Path("runs") / f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool, log_name: str) -> None:
    """Create ``run_dir``; refuse one that holds another run unless resuming or ``overwrite``
    (which removes that run's outputs, nothing else)."""
    import yaml

    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists() and not resuming:
        if not overwrite:
            other = (yaml.safe_load(cfg_file.read_text()) or {}).get("model", "?")
            raise UserError(f"--prefix {run_dir} already holds a run (model {other}); continue it with "
                            "--resume auto, or pass --overwrite to start over there")
        for name in (*RUN_OUTPUTS, log_name):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)  # OSError: the caller reports the folder as not writable


def save_final_weights(model: nn.Module, path: Path, model_args: dict[str, Any]) -> None:
    """The final weights as safetensors (no pickle), with the model's build arguments as metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"model_args": json.dumps(model_args)}))
