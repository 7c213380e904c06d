"""The one exception type the CLI turns into a one-line message and exit code 2, and the helpers that
word such messages: a did-you-mean, and a comma-list parser that names the option."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(ValueError):
    """Bad input from the user (flag, config, data, checkpoint).

    The CLI prints ``error: <message>`` on one line to stderr, no traceback, and exits 2.
    The message names the option or file and, where possible, the accepted values.
    """


def suggest(name: str, valid: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the closest valid name, or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_list(option: str, value: str | Iterable[Any], kind: type = int) -> list[Any]:
    """'2,3,4' (or a YAML list) -> [kind(2), ...]; empty items are skipped. A value that does not convert
    is a UserError naming ``option`` (the flag, e.g. '--lr-steps')."""
    items = str(value).split(",") if isinstance(value, str) else list(value)
    what = "integers" if kind is int else "numbers"
    try:
        return [kind(v) for v in items if str(v).strip()]
    except (TypeError, ValueError):
        raise UserError(f"{option} must be comma-separated {what}, got {value!r}") from None
