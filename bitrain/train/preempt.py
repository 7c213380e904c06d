"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning) / Ctrl-C become a flag the loop polls.

The handler only records the signal; the training loop stops at the next step boundary, writes a
checkpoint outside the handler and exits with code 3. A second Ctrl-C raises KeyboardInterrupt at
once (the checkpoint write in progress is atomic, so nothing half-written is published).

As a program, ``bitrain`` installs a :class:`ProcessInterrupt` first: it raises KeyboardInterrupt at
most once in the process's life, so a user pressing Ctrl-C again and again while the run stops can
never raise a second one inside the handler of the first (which would escape as a traceback and
kill the process by SIGINT instead of exiting 130 or 3).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s
)


class StopFlag:
    """Context manager that installs the handlers (main thread only) and restores the old ones."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name, or a reason set by the trainer
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            old = self._old.get(signum)
            if callable(old):  # Python's default_int_handler, or a ProcessInterrupt: it decides
                return old(signum, frame)
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def poll(self, device: Any, *, agree: bool = False, due: bool = True) -> bool:
        """Whether to stop now. With ``agree`` (DDP) the ranks agree in one small all-reduce, only when
        ``due`` (False otherwise): a stop request on any rank stops them all at the same step."""
        if not agree:
            return self.received is not None
        if not due:
            return False
        from bitrain.train import dist  # here: the CLI imports this module before torch (--help stays torch-free)

        flag = dist.broadcast_flag(self.received is not None, device)
        if flag and self.received is None:
            self.received = "a stop request on another rank"
        return flag


class ProcessInterrupt:
    """SIGINT handler for the whole process: the first Ctrl-C raises KeyboardInterrupt, later ones do nothing.

    Signal handlers run between any two bytecodes, including inside ``except KeyboardInterrupt``
    blocks and ``finally`` clauses, so with Python's default handler no code path can be made safe
    against a user who keeps pressing. With this one, catching the first KeyboardInterrupt is enough.
    """

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum, frame) -> None:
        if self.fired:
            return
        self.fired = True  # set before raising: a press arriving inside this handler returns here
        raise KeyboardInterrupt


def run_program(main: Callable[[], int], interrupted: str) -> int:
    """Run the process's main function with a :class:`ProcessInterrupt` for SIGINT; its exit code.

    The one KeyboardInterrupt, if ``main`` does not handle it, prints ``interrupted`` and gives 130.
    When ``main`` returns, SIGINT is ignored: a press during interpreter shutdown would otherwise
    meet the OS default (death by SIGINT) once Python has reset its handlers.
    """
    interrupt = ProcessInterrupt()
    signal.signal(signal.SIGINT, interrupt)
    try:
        try:
            return main()
        finally:
            interrupt.fired = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:  # raised outside main's own handler, or main has none
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # again: the press may have cut the finally short
        print(interrupted, file=sys.stderr)
        return 130
