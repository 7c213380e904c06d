"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning) / Ctrl-C become a flag the loop polls.

The handler only records the signal; the training loop stops at the next step boundary, writes a
checkpoint outside the handler and exits with code 3. A second Ctrl-C raises KeyboardInterrupt at
once (the checkpoint write in progress is atomic, so nothing half-written is published).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s)


class StopFlag:
    """Context manager that installs the handlers (main thread only) and restores the old ones."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name, or a reason set by the trainer
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
