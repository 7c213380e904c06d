"""Progress on long work: a live rich bar on a terminal, nothing when piped or under CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def live() -> bool:
    """True when stdout is a terminal a person watches (not a pipe, a file or a CI log)."""
    return sys.stdout.isatty() and not os.environ.get("CI")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a transient rich progress bar when :func:`live`, else ``items`` unchanged."""
    if not live():
        return items
    from rich.progress import track

    return track(items, total=total if total is not None else len(items), description=description, transient=True)
