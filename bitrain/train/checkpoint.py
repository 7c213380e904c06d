"""Crash-safe checkpoints: atomic writes, a content checksum, validated weights-only loads.

A checkpoint is a plain dict saved with ``torch.save`` and loadable with
``torch.load(path, weights_only=True)`` (nothing in it can run code on load):
``{"format": "bitrain", "version": 1, "checksum": str, "model": state_dict, "optimizer": ...,
"scaler": ..., "trainer": {...}, "rng": {...}, "config": {...}, "model_args": {...}}``.

Writes go to a temporary file in the same folder, are flushed and fsynced, then ``os.replace``d
over the target, so a reader sees the old file or the new one, never a half-written one. The
previous ``last.pt`` is kept as ``last.prev.pt`` until the new one is safe on disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bitrain.errors import UserError
from bitrain.files import atomic_write_bytes, fsync_dir

FORMAT, VERSION = "bitrain", 1
LAST, PREV, BEST = "last.pt", "last.prev.pt", "best.pt"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is intact."""


def _digest(obj: Any, h: hashlib._Hash) -> None:
    """Feed a nested dict/list/tensor structure into ``h`` in a canonical order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def checksum(payload: dict) -> str:
    """Content checksum over every key and tensor byte of ``payload`` (its 'checksum' key excluded)."""
    h = hashlib.blake2b(digest_size=16)
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return h.hexdigest()


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically save ``payload`` (a plain dict of tensors and Python values) with its checksum."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    payload["checksum"] = checksum(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # disk full, read-only folder: the previous file is untouched
        raise CheckpointWriteError(
            e.errno, f"could not write checkpoint {path}: {e.strerror}; the previous checkpoint is intact"
        ) from e


def save_last(folder: str | Path, payload: dict, also: Sequence[str | Path] = ()) -> Path:
    """Save the resume point ``folder/last.pt``, keeping the old one as ``last.prev.pt``.

    ``also`` (best, numbered) are published from the new file *before* it becomes last.pt: a crash
    before that move resumes from the older point and publishes them again, so none is ever lost.
    last.pt itself never goes missing: the old one is linked to last.prev.pt, then replaced.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    last = folder / LAST
    tmp = folder / f".{LAST}.new-{os.getpid()}"
    save_checkpoint(tmp, payload)
    try:
        for extra in also:
            copy_checkpoint(tmp, extra)
        if last.exists():
            copy_checkpoint(last, folder / PREV)
        os.replace(tmp, last)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(
            e.errno, f"could not publish checkpoint in {folder}: {e.strerror}; the previous checkpoint is intact"
        ) from e
    fsync_dir(folder)
    return last


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Publish an already-safe checkpoint under another name (hard link if possible, else copy)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint; any problem -> UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that wants to run code
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable or unsafe ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a bitrain checkpoint (no 'format': 'bitrain', 'model', 'model_args')")
    if payload.get("version", 0) > VERSION:
        raise UserError(f"checkpoint {path} has version {payload['version']}; this bitrain reads up to {VERSION}")
    if "checksum" in payload and checksum(payload) != payload["checksum"]:
        raise UserError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return payload


def find_resumable(folder: str | Path) -> tuple[Path, dict] | None:
    """Newest good checkpoint in ``folder``: last.pt when it loads, else the good one with the most
    training steps; corrupt or truncated ones are skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    best: tuple[int, Path, dict] | None = None
    candidates = [folder / LAST, folder / PREV] + sorted(folder.glob("*.pt"))
    seen: set[Path] = set()
    for p in candidates:
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        try:
            payload = load_checkpoint(p)
        except UserError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        if p.name == LAST:  # written after every other checkpoint of the run: the newest when good,
            return p, payload  # so a long run's numbered files are not all read and checksummed
        step = int(payload.get("trainer", {}).get("step", -1))
        if best is None or step > best[0]:
            best = (step, p, payload)
    return None if best is None else (best[1], best[2])


def clean_stale_temp_files(folder: str | Path) -> None:
    """Remove temp files a killed process left behind (never a published checkpoint)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.pt*"):
            if ".tmp-" in p.name or ".new-" in p.name:
                p.unlink(missing_ok=True)
