"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (flag, config, data, checkpoint).

    The CLI prints ``error: <message>`` on one line to stderr, no traceback, and exits 2.
    The message names the option or file and, where possible, the accepted values.
    """
