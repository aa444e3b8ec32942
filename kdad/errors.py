"""User-facing errors.

A :class:`KDADError` is a mistake the user can fix (a wrong path, an unknown category, a
checkpoint of another variant). The command-line entry points print its message as one line
and exit with status 2, without a Python traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class KDADError(Exception):
    """A user error with a one-line, actionable message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def one_line(exc: BaseException) -> str:
    """The user-facing line of ``exc``, also when a DataLoader worker re-raised it.

    PyTorch re-raises worker exceptions with the worker's traceback folded into the message;
    the user's line is then the last line, after the exception's qualified name.
    """
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else type(exc).__name__
    prefix = "kdad.errors.KDADError: "
    return last[len(prefix) :] if last.startswith(prefix) else last
