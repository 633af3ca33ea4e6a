"""The one exception type for a user's bad input: ``InnerCriticError``.

Every check of a config value, a file handed in (checkpoint, cache, vector) or a name (env id, hook
point) raises it with a one-line message naming what was wrong and what would be valid. It subclasses
``ValueError``, so code that catches ``ValueError`` keeps working. ``train.py`` turns it (and the
command line's own parse errors) into one ``error: ...`` line on stderr and exit status 2; anything
else is a bug and keeps its traceback. ``INNERCRITIC_TRACEBACK=1`` shows the traceback of a user
error too.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

__all__ = ["InnerCriticError", "MissingFileError", "TRACEBACK_ENV", "exit_on_user_error", "user_error"]

TRACEBACK_ENV = "INNERCRITIC_TRACEBACK"  # set to 1 for the full traceback of a user error
T = TypeVar("T")


class InnerCriticError(ValueError):
    """A user's input is wrong; the message names what and what would be valid, on one line."""


class MissingFileError(InnerCriticError, FileNotFoundError):
    """A file the user named (checkpoint, cache, config, vector) does not exist."""


def user_error(err: BaseException) -> InnerCriticError | None:
    """The user error behind ``err``: ``err`` itself or one it was raised from or during.

    LightningCLI builds the model and the datamodule inside jsonargparse, which re-raises a
    constructor's error as "Does not validate against any of the Union subtypes"; the original is in
    the chain (``__cause__`` / ``__context__``). None when no user error is there: a bug.
    """
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InnerCriticError):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """``fn()``; a user error becomes one ``error: <message>`` line on stderr and exit status 2.

    Anything that is not a user error keeps its traceback; so does a user error when ``INNERCRITIC_TRACEBACK``
    is set.
    """
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs just below
        user = user_error(err)
        if user is None:
            raise
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(user).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
