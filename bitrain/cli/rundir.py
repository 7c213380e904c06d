"""The run directory: its default name, the guard against mixing two runs (in turn: ``prepare_run_dir``;
at once: ``lock_run_dir``), the final weights."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no lock
    fcntl = None  # type: ignore[assignment]

from bitrain.errors import UserError
from bitrain.files import atomic_write_bytes

if TYPE_CHECKING:
    import torch.nn as nn

#: what a fresh run writes; --overwrite removes exactly these (and nothing else) from a used folder
RUN_OUTPUTS = ("checkpoints", "tb", "metrics.csv", "model.safetensors", "profile", "stages")
RUN_OUTPUTS += ("mlflow.db", "mlruns", "wandb")  # --logger mlflow's default store, --logger wandb's folder
#: the lock file in a run dir (kept when released; not part of a run: --overwrite leaves it, and a
#: folder holding only it is still fresh)
LOCK_NAME = ".lock"
_HELD: set[int] = set()  # lock fds this process holds; a forked child closes its copies (see _after_fork)


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
            raise UserError(
                f"--prefix {run_dir} already holds a run (model {other}); continue it with "
                "--resume auto, or pass --overwrite to start over there"
            )
        for name in (*RUN_OUTPUTS, log_name):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)  # OSError: the caller reports the folder as not writable


class RunDirLock:
    """An exclusive OS lock (``flock``) on ``run_dir/.lock``, held until :meth:`close` or the end of
    the process: the kernel releases it when the holder dies, even by SIGKILL, so a killed run never
    leaves a stale lock. A context manager; ``close`` is idempotent. Without ``fcntl`` (or on a file
    system that has no locks) it holds nothing and all its methods still work."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd, self._pid = path, fd, os.getpid()

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:  # a forked child: its copy is closed already
            return
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)  # no holder named once it is free
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a lock dropped without close() (an error on the way) is released too
        try:
            self.close()
        except Exception:
            pass


def _after_fork() -> None:
    # a forked child (a DataLoader worker) shares the lock's open file; closing its copy (never
    # LOCK_UN, which would free the parent's lock) lets the lock go as soon as the parent dies
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _holder(fd: int) -> str:
    """'pid N' (and ' on HOST' when another host) from the lock file, as its holder wrote it."""
    for _ in range(50):  # the holder writes its pid right after it takes the lock
        try:
            pid, _, host = os.pread(fd, 512, 0).decode("utf-8", "replace").strip().partition(" ")
        except OSError:
            break
        if pid:
            return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        time.sleep(0.01)
    return "pid unknown"


def lock_run_dir(run_dir: Path) -> RunDirLock:
    """Create ``run_dir`` if needed and take its lock (non-blocking), before anything in it changes;
    UserError naming the holder when another process has it. Release with ``close()`` (or ``with``)."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:
        return RunDirLock(path, None)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's pid stays readable
    except OSError as e:
        raise UserError(f"--prefix {run_dir} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # no locks on this file system
            os.close(fd)
            return RunDirLock(path, None)
        holder = _holder(fd)
        os.close(fd)
        raise UserError(
            f"--prefix {run_dir} is in use by another bitrain run ({holder}); wait for it to "
            "end or choose another --prefix"
        ) from None
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # a lock whose holder goes unnamed still locks
    return RunDirLock(path, fd)


def save_final_weights(model: nn.Module, path: Path, model_args: dict[str, Any]) -> None:
    """The final weights as safetensors (no pickle), with the model's build arguments as metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata={"model_args": json.dumps(model_args)}))
