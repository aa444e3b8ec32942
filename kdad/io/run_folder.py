"""One run's folder, and a sweep's: the names of their files, a run's status, its lock and
marks, and which checkpoint a ``ckpt_path`` means.

This is the one module that spells those names: every other module asks a
:class:`RunFolder` (or :class:`SweepFolder`) for a path, or uses the constants below
(``tests/test_layout.py`` checks it: every upper-case string constant here is a file name).

**Status** (:attr:`RunFolder.status`), from the files alone: ``running`` (another process
holds the folder's lock), ``done`` (``metrics.json`` is there), ``failed`` or ``interrupted``
(the newer of the marks ``FAILED`` / ``INTERRUPTED``, each holding its one-line reason), else
``unfinished`` (killed, crashed, or not started).

**Lock.** Two processes writing into one folder (the same ``hydra.run.dir``, or two runs
started in the same second with the default time-stamped folder) would mix their files; the
first takes the folder's lock for as long as it runs and the second stops with one line. Only
the first process of a run takes it (under DDP the other ranks share rank 0's folder). The
lock is an ``flock`` on ``.lock`` in the folder: the system releases it when the process
ends, however it ends, so a killed run never leaves its folder locked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kdad.errors import KDADError
from kdad.io.atomic import write_json_atomic, write_text_atomic

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("kdad")

# A run folder's files (README "What a run leaves behind" says who writes and reads each).
LOCK = ".lock"
HYDRA = ".hydra"  # Hydra's copy of the job's config and overrides: every job folder has one
CONFIG = "config.yaml"
METRICS = "metrics.json"
THRESHOLDS = "thresholds.json"
SCORES = "scores.csv"
CURVES = "curves.json"
CURVES_FIGURE = "curves"  # curves.png (.pdf, .svg): the suffix is the figure format's
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
BEST = "best.ckpt"
IMAGES = "images"
SAMPLES = "samples.npz"  # in images/
TRAIN_LOG = "train.log"
WANDB_ID = "wandb_id"
PREDICTIONS = "predictions.csv"  # kdad-predict's run folder
OVERLAYS = "overlays"  # kdad-predict's run folder
# The marks of a run that did not finish, each holding its one-line reason.
FAILED = "FAILED"
INTERRUPTED = "INTERRUPTED"
MARKS = (FAILED, INTERRUPTED)
# A sweep (multirun) folder's own files.
SWEEP_STATUS = "sweep_status.json"
MULTIRUN = "multirun.yaml"  # Hydra's, written before the jobs start

Status = Literal["running", "done", "failed", "interrupted", "unfinished"]

_held: dict[Path, int] = {}  # folder (resolved) -> descriptor of its lock, while held here
_LOCK_ATTEMPTS = 5  # a status reader's probe holds the lock for an instant: try a few times


def _first_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def _key(folder: Path) -> Path:
    return folder.resolve()


@dataclass(frozen=True, order=True)
class RunFolder:
    """The folder of one run (``kdad-train``, ``-eval``, ``-predict``; a multirun's job)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, given: str | Path) -> RunFolder:
        """The run folder of a ``ckpt_path`` as given: a folder is one; a checkpoint in a
        run's ``checkpoints/`` belongs to that run; any other file to its own folder."""
        path = Path(str(given)).expanduser()
        if path.is_dir():
            return cls(path)
        return cls(path.parent.parent if path.parent.name == CHECKPOINTS else path.parent)

    # The files.
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def hydra(self) -> Path:
        return self.path / HYDRA

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def thresholds(self) -> Path:
        return self.path / THRESHOLDS

    @property
    def scores(self) -> Path:
        return self.path / SCORES

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    @property
    def curves_figure(self) -> Path:
        """The figures' path without suffix (``curves.png``, ``curves.pdf``, ...)."""
        return self.path / CURVES_FIGURE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def images(self) -> Path:
        return self.path / IMAGES

    @property
    def samples(self) -> Path:
        return self.images / SAMPLES

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def wandb_id(self) -> Path:
        return self.path / WANDB_ID

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def overlays(self) -> Path:
        return self.path / OVERLAYS

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def failed(self) -> Path:
        return self.path / FAILED

    @property
    def interrupted(self) -> Path:
        return self.path / INTERRUPTED

    @property
    def tested_checkpoint(self) -> Path:
        """The checkpoint the run tested: ``checkpoints/best.ckpt`` when there is one and the
        run's config.yaml says ``test_ckpt: best`` (STFPM's default), else ``last.ckpt``."""
        if self.best.is_file() and self.config.is_file():
            from omegaconf import OmegaConf

            with contextlib.suppress(Exception):
                if OmegaConf.load(self.config).get("test_ckpt") == "best":
                    return self.best
        return self.last

    # Status and marks.
    @property
    def status(self) -> Status:
        """``running``, ``done``, ``failed``, ``interrupted`` or ``unfinished``, from the
        files (module docstring). A process never sees its own folder as running."""
        if self.in_use():
            return "running"
        if self.metrics.is_file():
            return "done"
        marked = []
        for mark in MARKS:
            with contextlib.suppress(OSError):
                marked.append(((self.path / mark).stat().st_mtime, mark))
        if not marked:
            return "unfinished"
        return "failed" if max(marked)[1] == FAILED else "interrupted"

    def reason(self, mark: str) -> str | None:
        """The one-line reason ``mark`` (FAILED or INTERRUPTED) holds; None without it."""
        try:
            return (self.path / mark).read_text().strip()
        except OSError:
            return None

    def mark(self, mark: str, reason: str) -> Path:
        """Leave ``mark`` (FAILED or INTERRUPTED) with its one-line reason (atomically)."""
        if mark not in MARKS:
            raise ValueError(f"{mark!r} is not a mark ({', '.join(MARKS)})")
        return write_text_atomic(self.path / mark, reason + "\n")

    def clear_marks(self) -> None:
        """Remove the marks of an earlier attempt: this one is running now."""
        for mark in MARKS:
            with contextlib.suppress(FileNotFoundError):
                (self.path / mark).unlink()

    # The lock.
    def in_use(self) -> bool:
        """Whether another process holds the folder's lock (never this process's own)."""
        if fcntl is None or _key(self.path) in _held:
            return False
        try:
            handle = os.open(self.lock_file, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(handle)  # also releases the shared lock of the probe
        return False

    def lock(self) -> None:
        """Take the folder's lock for this process (again: a no-op); a folder that another
        process holds is a :class:`KDADError` naming it."""
        if fcntl is None or not _first_process() or _key(self.path) in _held:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(_LOCK_ATTEMPTS):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt + 1 < _LOCK_ATTEMPTS:
                    time.sleep(0.02)
        else:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (process {int(os.pread(handle, 32, 0).decode().strip())})"
            os.close(handle)
            raise KDADError(
                f"run folder {self.path} is in use by another kdad run{holder}: give this run "
                "another hydra.run.dir (or hydra.sweep.dir), or wait for that one to end"
            )
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        _held[_key(self.path)] = handle

    def unlock(self) -> None:
        """Release the lock if this process holds it (a multirun's next job takes its own)."""
        handle = _held.pop(_key(self.path), None)
        if handle is not None:
            os.close(handle)


def resolve_checkpoint(given: str | Path, resume: RunFolder | None = None) -> Path:
    """The checkpoint file a ``ckpt_path`` means, for every command.

    A checkpoint file is itself. A run folder is the checkpoint that run tested
    (:attr:`RunFolder.tested_checkpoint`: kdad-eval, -predict, -export). When resuming
    (``resume``: the folder kdad-train writes into) a run folder is its ``last.ckpt`` (a run
    continues from its last state, never its best) and ``last`` is ``resume``'s own.
    A missing checkpoint is a :class:`KDADError` naming it.
    """
    text = str(given)
    path = resume.last if resume is not None and text == "last" else Path(text).expanduser()
    if path.is_dir():
        folder = RunFolder(path)
        candidate = folder.last if resume is not None else folder.tested_checkpoint
        if not candidate.is_file():
            if resume is not None:
                raise KDADError(f"ckpt_path={text}: no checkpoint at {candidate}")
            raise KDADError(
                f"ckpt_path={path} is a folder without {candidate.relative_to(path)} "
                "(not a kdad-train run folder?)"
            )
        if resume is None:
            log.info("ckpt_path=%s: using %s", path, candidate)
        return candidate
    if not path.is_file():
        if resume is None:
            raise KDADError(f"ckpt_path={path}: no such file")
        hint = (
            " (pass hydra.run.dir=<the run folder> with ckpt_path=last)" if text == "last" else ""
        )
        raise KDADError(f"ckpt_path={text}: no checkpoint at {path}{hint}")
    return path


@dataclass(frozen=True)
class SweepFolder:
    """A multirun's folder: one job folder per job below it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def status_file(self) -> Path:
        return self.path / SWEEP_STATUS

    @property
    def multirun(self) -> Path:
        return self.path / MULTIRUN

    def jobs(self) -> list[RunFolder]:
        """The job folders below it (each has Hydra's ``.hydra``, or a mark), in path order;
        not the sweep folder itself (its own ``.hydra`` holds the sweep's config)."""
        found = {p.parent for name in (HYDRA, *MARKS) for p in self.path.rglob(name)}
        return [RunFolder(p) for p in sorted(found - {self.path})]

    def status(self) -> dict[str, Any]:
        """How many jobs have a folder, how many finished, which failed and why, which were
        interrupted (the key only when some were)."""
        jobs = {job: job.status for job in self.jobs()}

        def listed(status: str, mark: str) -> list[dict[str, str]]:
            return [
                {"folder": str(job.path), "reason": job.reason(mark) or ""}
                for job, found in jobs.items()
                if found == status
            ]

        failed, interrupted = listed("failed", FAILED), listed("interrupted", INTERRUPTED)
        finished = sum(found == "done" for found in jobs.values())
        status: dict[str, Any] = {"jobs": len(jobs), "finished": finished, "failed": failed}
        if interrupted:
            status["interrupted"] = interrupted
        return status

    def write_status(self) -> dict[str, Any]:
        """:meth:`status` into ``sweep_status.json`` (atomically); returns it."""
        status = self.status()
        write_json_atomic(self.status_file, status)
        return status


__all__ = [
    "BEST",
    "CHECKPOINTS",
    "CONFIG",
    "CURVES",
    "CURVES_FIGURE",
    "FAILED",
    "HYDRA",
    "IMAGES",
    "INTERRUPTED",
    "LAST",
    "LOCK",
    "MARKS",
    "METRICS",
    "MULTIRUN",
    "OVERLAYS",
    "PREDICTIONS",
    "SAMPLES",
    "SCORES",
    "SWEEP_STATUS",
    "THRESHOLDS",
    "TRAIN_LOG",
    "WANDB_ID",
    "RunFolder",
    "Status",
    "SweepFolder",
    "resolve_checkpoint",
]
