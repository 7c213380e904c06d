"""The argument parser every ``bitrain`` command uses: one-line usage errors with a did-you-mean."""

from __future__ import annotations

import argparse

from bitrain.errors import UserError, suggest

PROG = "bitrain"


class ArgParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line, with a did-you-mean for unknown flags.
    Abbreviations are off: a typo such as --lr-mod must not silently mean --lr-mode."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        if message.startswith("unrecognized arguments:"):
            bad = message.split(":", 1)[1].split()
            flags = [b for b in bad if b.startswith("-")] or bad
            known = [s for a in self._actions for s in a.option_strings]
            hint = suggest(flags[0].split("=")[0], known)
            message = f"unrecognized arguments: {' '.join(bad)}{hint}"
        raise UserError(f"{self.prog}: {message}")
