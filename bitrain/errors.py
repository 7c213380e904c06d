"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user (flag, config, data, checkpoint).

    The CLI prints ``error: <message>`` on one line to stderr, no traceback, and exits 2.
    The message names the option or file and, where possible, the accepted values.
    """


def suggest(name: str, valid: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
