"""Where numba caches the engine's compiled kernels: a folder named by a fingerprint of their sources.

numba checks a cached function against the file that defines it (its time stamp and size), not against
the files whose functions it inlines. ``conv._conv`` inlines ``counts``, ``epilogue`` and ``intrinsics``:
after an upgrade that changed only ``counts.py``, numba's own cache (``__pycache__``) would load the old
machine code and compute the old kernel, silently. So every kernel is cached under
``BASE/kernels-FINGERPRINT``, the fingerprint being a hash of all the kernel modules' bytes: any change to
any of them is a new folder and a fresh compile. BASE is ``NUMBA_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/bitrain/numba`` (``~/.cache/bitrain/numba``). Where BASE cannot be written, the kernels
are compiled at each start instead (never cached in ``__pycache__``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# every module whose numba code ends up inside a cached kernel (the cached ones and what they inline)
KERNEL_MODULES = ("packing.py", "intrinsics.py", "counts.py", "epilogue.py", "conv.py")


def fingerprint(paths: list[Path] | None = None) -> str:
    """16 hex digits of SHA-256 over the kernel modules' names and bytes."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in paths if paths is not None else [here / name for name in KERNEL_MODULES]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def base_dir() -> Path:
    """``NUMBA_CACHE_DIR``, else the user's cache folder for bitrain's kernels."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bitrain" / "numba"


def cache_dir() -> Path | None:
    """This source tree's kernel cache folder, made if needed; None where it cannot be written."""
    try:
        path = base_dir() / f"kernels-{fingerprint()}"
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: no home folder to expand
        return None
    return path if os.access(path, os.W_OK) else None
