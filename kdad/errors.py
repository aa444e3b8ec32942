"""User-facing errors.

A :class:`KDADError` is a mistake the user can fix (a wrong path, an unknown category, a
checkpoint of another variant). The command-line entry points print its message as one line
and exit with status 2, without a Python traceback; so do a write that finds the disk or the
quota full (:func:`disk_full`) and a mistake Hydra finds while composing the config
(:func:`kdad.engine.hydra.config_error_message`). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
from collections.abc import Callable


class KDADError(Exception):
    """A user error with a one-line, actionable message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class Interrupted(Exception):
    """The run was stopped from outside: SIGTERM (a cluster's pre-emption or time limit), or
    a job scheduler's own signal handler ending the job to requeue it (submitit's, on Slurm).

    Not a failure of the run: its folder keeps a resumable ``last.ckpt`` and an
    ``INTERRUPTED`` mark, and running the same command again (or the requeued job) resumes
    it. The command exits with status 143 (128 + SIGTERM), so a scheduler sees that it did
    not finish, or with the code of the scheduler's handler (``hand_over``)."""

    EXIT_CODE = 143

    def __init__(self, message: str, hand_over: Callable[[], None] | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        # The scheduler's own handler, run once the run folder is marked: it requeues the job
        # and exits with the scheduler's code (submitit's, see kdad.lightning.callbacks).
        self.hand_over = hand_over


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


# Writes that fail because the disk, or the user's quota on it, is full: the user can fix that.
DISK_FULL = {errno.ENOSPC: "no space left on the device"}
if hasattr(errno, "EDQUOT"):  # not on Windows
    DISK_FULL[errno.EDQUOT] = "disk quota exceeded"


def disk_full(exc: BaseException) -> str | None:
    """The user-facing line if ``exc`` is (or was caused by) a write that found the disk or
    the quota full, naming the file being written; None for any other error."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            where = f"writing {seen.filename}" if seen.filename else "writing a file"
            return (
                f"{DISK_FULL[seen.errno]} while {where}: free some space (or write the run "
                "elsewhere, hydra.run.dir=...) and run the command again"
            )
        seen = seen.__cause__ or seen.__context__
    return None
