"""The process's allocator for inference: keep freed memory, so each forward does not page-fault again.

A CPU forward writes every activation into a new tensor. glibc's malloc hands blocks of more than a few
MiB back to the kernel when they are freed (``munmap``, or trimming the heap's top), so the next
forward's tensor of the same size is fresh memory, and its first write takes one page fault per 4 KiB:
on the 2-core VM of ``docs/performance.md`` a BatchNorm over a 51 MB map took 17-19 ms that way against
2-3 ms in reused memory, for both the float model and its packed export. ``keep_freed_memory`` tells
glibc (``mallopt``) to serve every block from its heaps, not from ``mmap``, and never to trim them, which is
what jemalloc or tcmalloc (torch's own advice for CPU inference) give when preloaded. The memory a
forward used stays with the process until it exits, and glibc settles on its blocks with some slack:
ResNetE-18 at 224 px, batches 1-32 in turn, float model and export, held 860 MB against 520 MB, and
a lone 64-256 MiB tensor made again and again grew the heap to four to eight such blocks before it reused
them (where glibc's small allocations land decides how soon freed blocks coalesce into one that fits). Right
for ``bitrain predict``, ``eval`` and ``bench --inference`` on the CPU; not done for training.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = (1 << 31) - 1  # bytes; an int for mallopt, so 2 GiB - 1: in effect never
# M_MMAP_MAX 0 rather than a high M_MMAP_THRESHOLD: glibc caps that at 32 MiB, below the 51 MB maps of an
# ImageNet stem at batch 16. A thread's arena that cannot grow still falls back to mmap.


@functools.cache
def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed memory (see the module docstring); once per process.

    Returns one line for a log: what was set, or why nothing was (not Linux with glibc).
    """
    line = "allocator: the system's (not glibc: freed memory may page-fault again)"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
        except (OSError, AttributeError):  # musl and others have no mallopt
            ok = False
        if ok:
            line = "allocator: glibc, freed memory kept in the process (mallopt: no mmap, no trim)"
    return line


def keep_freed_memory_on(device: Any) -> None:
    """``keep_freed_memory`` when ``device`` (a ``torch.device``) is the CPU: inference-only commands call it."""
    if device.type == "cpu":
        keep_freed_memory()
