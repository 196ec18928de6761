"""The user-error type: recipes turn it into exit status 2 and one line, never a traceback.

Exit statuses of the recipes: 0 done; 2 a user error (bad flag, data, a run folder in use, a resume with other flags);
128 + N stopped by signal N after saving a checkpoint (143 SIGTERM, 130 SIGINT, 138 SIGUSR1), as a shell reports a
process killed by that signal, so a requeue script treats both alike; 74 (sysexits EX_IOERR) a checkpoint could not be
written.
"""
from __future__ import annotations

import functools
import sys

EXIT_USER_ERROR = 2
EXIT_SAVE_FAILED = 74


class UserError(Exception):
    """A mistake in the user's input (bad flag, missing file, unusable data); message is one line."""


class RunStopped(Exception):
    """The run stopped on purpose (a preemption signal, a failed save): print the one-line message (if any; other
    ranks stay quiet) and exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def cli_main(fn):
    """Wrap a recipe's main(): a UserError prints `error: <message>` on stderr and exits with status 2; a RunStopped
    prints its line and exits with its code. Either way the run folder's lock is released."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except RunStopped as e:
            if str(e):
                print(str(e), file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        finally:
            from hwtools.train.lock import release_held_locks

            release_held_locks()  # the run is over: a corrected rerun in the same folder just works

    return wrapper
