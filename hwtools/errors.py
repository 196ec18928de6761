"""The user-error type: recipes turn it into exit status 2 and one line, never a traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in the user's input (bad flag, missing file, unusable data); message is one line."""


def cli_main(fn):
    """Wrap a recipe's main(): a UserError prints `error: <message>` on stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
