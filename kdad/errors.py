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


class Interrupted(Exception):
    """The run was stopped from outside (SIGTERM: a cluster's pre-emption or time limit).

    Not a failure of the run: its folder keeps a resumable ``last.ckpt`` and an
    ``INTERRUPTED`` mark, and running the same command again resumes it. The command exits
    with status 143 (128 + SIGTERM), so a scheduler sees that it did not finish."""

    EXIT_CODE = 143

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def one_line(exc: BaseException) -> str:
    """The user-facing line of ``exc``, also when a DataLoader worker re-raised it.

    PyTorch re-raises worker exceptions with the worker's traceback folded into the message
    (and :class:`KDADError` folds that onto one line); the user's message is what follows the
    last ``KDADError:``.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    marker = "KDADError: "
    index = text.rfind(marker)
    return text[index + len(marker) :] if index >= 0 else text
