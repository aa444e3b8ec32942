"""One run's folder: its file names, its status marks and the lock that makes it one run's.

Two processes writing into one folder (the same ``hydra.run.dir``, or two runs started in the
same second with the default time-stamped folder) would mix their files; the first takes the
folder's lock for as long as it runs and the second stops with one line. Only the first
process of a run takes it (under DDP the other ranks share rank 0's folder). The lock is an
``flock`` on ``.lock`` in the folder: the system releases it when the process ends, however it
ends, so a killed run never leaves its folder locked.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from kdad.errors import KDADError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"
METRICS = "metrics.json"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
# The marks of a run that did not finish, each holding its one-line reason.
FAILED = "FAILED"
INTERRUPTED = "INTERRUPTED"
MARKS = (FAILED, INTERRUPTED)

_held: dict[Path, int] = {}  # folder -> descriptor of its lock, while this process holds it


def _first_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def lock(folder: str | Path) -> None:
    """Take ``folder``'s lock for this process (again: a no-op); a folder that another
    process holds is a :class:`KDADError` naming it."""
    folder = Path(folder)
    if fcntl is None or not _first_process() or folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (process {int(os.pread(handle, 32, 0).decode().strip())})"
        os.close(handle)
        raise KDADError(
            f"run folder {folder} is in use by another kdad run{holder}: give this run another "
            "hydra.run.dir (or hydra.sweep.dir), or wait for that one to end"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    _held[folder] = handle


def unlock(folder: str | Path) -> None:
    """Release ``folder``'s lock if this process holds it (a multirun's next job takes its own)."""
    handle = _held.pop(Path(folder), None)
    if handle is not None:
        os.close(handle)


def clear_marks(folder: str | Path) -> None:
    """Remove the marks of an earlier attempt: this one is running now."""
    for mark in MARKS:
        with contextlib.suppress(FileNotFoundError):
            (Path(folder) / mark).unlink()


__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "FAILED",
    "INTERRUPTED",
    "LAST",
    "LOCK",
    "MARKS",
    "METRICS",
    "clear_marks",
    "lock",
    "unlock",
]
