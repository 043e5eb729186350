"""The one base class for mistakes in what a user gave (paths, config values, input files), and how the entry
points report them: one line naming the problem and its fix, exit status 2, no traceback. Any other exception is
a bug in mtp and keeps its traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and says how to fix it."""


def reports_user_errors(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
    """Wraps an absl ``main``: a ``UserError`` prints ``error: <message>`` to stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> object:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
