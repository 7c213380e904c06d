"""The ``bitrain`` command: one module per subcommand, each with ``main(argv) -> int``.

Commands are imported on use, so ``bitrain --help`` stays fast. Exit codes: 0 done, 2 bad usage
(one line, no traceback), 3 interrupted with a resumable checkpoint, 130 Ctrl-C, 1 anything else.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence

from bitrain.cli.args import PROG
from bitrain.errors import UserError, suggest
from bitrain.train.preempt import run_program

# name -> (module under bitrain.cli with main(argv) -> int, one line for the command list)
_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a model (BMXNet v2 options; bitrain train --help lists them)"),
    "eval": ("eval", "top-1, top-5 and loss on the validation set"),
    "summary": ("summary", "params, bits, memory, MACs, compression"),
    "models": ("models", "the zoo as a table"),
    "export": ("export", "the packed 1-bit model"),
    "plot": ("plot", "loss, top-1 and lr curves as a PNG"),
    "bench": ("bench", "trainer vs hand-written loop (vs Lightning), as a ratio"),
    "predict": ("predict", "top-k classes of image files or folders"),
}


def _command(module: str, doc: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        return importlib.import_module(f"bitrain.cli.{module}").main(argv)

    run.__doc__ = doc
    return run


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    name: _command(module, doc) for name, (module, doc) in _COMMANDS.items()
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bitrain`` command; returns the exit code. Without ``argv`` it is the
    program, and Ctrl-C goes through :func:`~bitrain.train.preempt.run_program` (3 or 130, never a traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is not None or threading.current_thread() is not threading.main_thread():
        return _main(args)
    return run_program(lambda: _main(args), interrupted=f"{PROG}: interrupted")


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            argv = ["train"]
        else:
            print(
                f"usage: {PROG} {{{','.join(COMMANDS)}}} ...\n\n"
                + "\n".join(f"  {name:<8} {fn.__doc__}" for name, fn in COMMANDS.items())
            )
            return 0
    if argv[0].startswith("-"):  # a BMXNet command line: image_classification.py --model ...
        argv = ["train", *argv]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"{PROG}: error: unknown command {name!r}{suggest(name, COMMANDS)}; commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        return COMMANDS[name](rest)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `bitrain models | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
