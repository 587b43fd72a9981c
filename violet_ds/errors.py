"""Which exceptions are meant for the user, and how they are printed.

A user error (bad config, missing or corrupt file, refused checkpoint, diverged run, locked run
directory) is printed as one line - `violet-ds <command>: error: <message>` - without a traceback; the
message already names the file, row or key and what to do. `--debug` (any command) or
`VIOLET_DS_DEBUG=1` prints the full traceback as well. Anything else keeps Python's traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

DEBUG_ENV = "VIOLET_DS_DEBUG"


class UserError(Exception):
    """Base for errors whose message is complete for the user (no traceback needed)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended a command after it saved what it had and logged that line: exit code 130, nothing more to print
    (any other KeyboardInterrupt prints one line `violet-ds <command>: interrupted`)."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (UserError, ValueError, FileNotFoundError, FileExistsError, PermissionError,
                          NotADirectoryError, IsADirectoryError)):
        return True
    # errors of violet_ds's own modules that name their file/key (checkpoints, run dir, divergence, data)
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"CheckpointError", "RunDirError", "DivergenceError", "BadSampleLimitError",
                         "MissingVideoError", "FrameDecodeError", "TSVError", "PreflightError"})


def message_of(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def report(error: BaseException, prefix: str, stream=None) -> None:
    """Print a user error as one message (plus the traceback under --debug)."""
    stream = stream or sys.stderr
    if debug_enabled():
        traceback.print_exception(type(error), error, error.__traceback__, file=stream)
    else:
        stream.write(f"{prefix}: error: {message_of(error)}\n  (for the traceback: --debug or {DEBUG_ENV}=1)\n")
    stream.flush()
