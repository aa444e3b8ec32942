"""kdad.io.run_folder: a run folder's files, its status from them, its marks and lock, and the
one resolution of ``ckpt_path`` (a checkpoint, a run folder, or ``last`` when resuming)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdad.errors import KDADError
from kdad.io import run_folder
from kdad.io.run_folder import RunFolder, SweepFolder, resolve_checkpoint

ROOT = Path(__file__).parents[2]


def _run(path: Path, *, last: bool = True, best: bool = False, test_ckpt: str | None = None):
    folder = RunFolder(path)
    folder.checkpoints.mkdir(parents=True, exist_ok=True)
    if last:
        folder.last.write_bytes(b"")
    if best:
        folder.best.write_bytes(b"")
    if test_ckpt is not None:
        folder.config.write_text(f"task_name: train\ntest_ckpt: {test_ckpt}\n")
    return folder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def test_every_file_is_named_once_in_the_folder(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path))  # a str is taken too
    assert folder.path == tmp_path
    assert folder.metrics == tmp_path / "metrics.json"
    assert folder.config == tmp_path / "config.yaml"
    assert folder.last == tmp_path / "checkpoints" / "last.ckpt"
    assert folder.best == tmp_path / "checkpoints" / "best.ckpt"
    assert folder.samples == tmp_path / "images" / "samples.npz"
    assert folder.curves_figure.with_suffix(".png") == tmp_path / "curves.png"
    assert folder.failed == tmp_path / "FAILED" and folder.interrupted == tmp_path / "INTERRUPTED"
    paths = [
        getattr(folder, name)
        for name, value in vars(RunFolder).items()
        if isinstance(value, property) and name not in ("status", "tested_checkpoint")
    ]
    assert all(p.is_relative_to(tmp_path) for p in paths)
    assert len(set(paths)) == len(paths), "two properties name the same file"
    sweep = SweepFolder(tmp_path)
    assert sweep.status_file.name == "sweep_status.json"
    assert sweep.multirun.name == "multirun.yaml"


def test_the_run_folder_of_a_checkpoint(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    assert RunFolder.of(run.path) == run
    assert RunFolder.of(run.last) == run
    assert RunFolder.of(str(run.best)) == run  # not there yet: named by its place
    assert RunFolder.of(tmp_path / "loose.ckpt") == RunFolder(tmp_path)


def test_status_from_the_files(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert folder.status == "unfinished"
    folder.mark(run_folder.FAILED, "data.root=/x: no such folder")
    assert folder.status == "failed"
    assert folder.reason(run_folder.FAILED) == "data.root=/x: no such folder"
    assert folder.reason(run_folder.INTERRUPTED) is None
    # The newer mark tells: a run interrupted after an earlier attempt failed.
    folder.mark(run_folder.INTERRUPTED, "stopped by SIGTERM")
    past = time.time() - 60
    os.utime(folder.failed, (past, past))
    assert folder.status == "interrupted"
    os.utime(folder.interrupted, (past - 60, past - 60))
    assert folder.status == "failed"
    folder.metrics.write_text("{}\n")  # results win over the marks of an earlier attempt
    assert folder.status == "done"
    folder.clear_marks()
    assert not folder.failed.exists() and not folder.interrupted.exists()
    folder.metrics.unlink()
    assert folder.status == "unfinished"
    with pytest.raises(ValueError, match="not a mark"):
        folder.mark("metrics.json", "no")


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that takes ``folder``'s lock and keeps it until its stdin closes."""
    code = (
        "import sys; from kdad.io.run_folder import RunFolder; "
        f"RunFolder({str(folder)!r}).lock(); print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.skipif(run_folder.fcntl is None, reason="runs are locked on POSIX only")
def test_a_folder_another_process_holds_is_running_and_refused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.mark(run_folder.FAILED, "an earlier attempt")
    holder = _holder(folder.path)
    try:
        assert folder.in_use() and folder.status == "running"
        with pytest.raises(KDADError) as caught:
            folder.lock()
        assert f"run folder {folder.path} is in use by another kdad run (process {holder.pid})" in (
            _one_line(caught)
        )
        assert folder.status == "running"  # the probe left the holder's lock as it was
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=60)
    assert not folder.in_use() and folder.status == "failed"  # the lock ended with it
    folder.lock()
    try:
        # This process's own folder is not "running" to itself: it knows its state.
        assert not folder.in_use() and folder.status == "failed"
        folder.lock()  # again: a no-op
        assert RunFolder(tmp_path / "run" / ".." / "run").status == "failed"  # one folder
    finally:
        folder.unlock()
    folder.unlock()  # not held: a no-op


def test_a_run_folder_means_the_checkpoint_it_tested(tmp_path: Path) -> None:
    run = _run(tmp_path, best=True, test_ckpt="last")
    assert resolve_checkpoint(tmp_path) == run.last
    run.config.write_text("task_name: train\ntest_ckpt: best\n")  # STFPM's default
    assert resolve_checkpoint(str(tmp_path)) == run.best
    assert run.tested_checkpoint == run.best
    run.best.unlink()  # a run without a best checkpoint tested its last
    assert resolve_checkpoint(tmp_path) == run.last
    run.config.write_text(": not yaml [")  # an unreadable config: the last one
    _run(tmp_path, best=True)
    assert resolve_checkpoint(tmp_path) == run.last
    assert resolve_checkpoint(run.best) == run.best  # a file is itself


def test_resuming_takes_the_last_checkpoint(tmp_path: Path) -> None:
    here = RunFolder(tmp_path / "here")
    other = _run(tmp_path / "other", best=True, test_ckpt="best")
    assert resolve_checkpoint(other.path, resume=here) == other.last  # never the best
    assert resolve_checkpoint(other.best, resume=here) == other.best
    _run(here.path)
    assert resolve_checkpoint("last", resume=here) == here.last


def test_checkpoint_errors_are_one_line_and_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(KDADError) as caught:
        resolve_checkpoint(tmp_path / "missing.ckpt")
    assert _one_line(caught) == f"ckpt_path={tmp_path / 'missing.ckpt'}: no such file"
    with pytest.raises(KDADError) as caught:
        resolve_checkpoint(tmp_path)
    assert _one_line(caught) == (
        f"ckpt_path={tmp_path} is a folder without checkpoints/last.ckpt "
        "(not a kdad-train run folder?)"
    )
    _run(tmp_path / "best_only", last=False, best=True, test_ckpt="best")
    assert resolve_checkpoint(tmp_path / "best_only").name == "best.ckpt"
    with pytest.raises(KDADError, match=r"best_only: no checkpoint at .*checkpoints/last\.ckpt$"):
        resolve_checkpoint(tmp_path / "best_only", resume=RunFolder(tmp_path))
    here = RunFolder(tmp_path / "here")
    with pytest.raises(KDADError) as caught:
        resolve_checkpoint("last", resume=here)
    assert _one_line(caught) == (
        f"ckpt_path=last: no checkpoint at {here.last} "
        "(pass hydra.run.dir=<the run folder> with ckpt_path=last)"
    )
    with pytest.raises(KDADError) as caught:
        resolve_checkpoint(tmp_path / "x.ckpt", resume=here)
    assert (
        _one_line(caught)
        == f"ckpt_path={tmp_path / 'x.ckpt'}: no checkpoint at {tmp_path / 'x.ckpt'}"
    )
    with pytest.raises(KDADError, match="no such file"):
        resolve_checkpoint("last")  # outside a resume, last is a path like any other


def test_a_sweep_folder_reports_its_jobs(tmp_path: Path) -> None:
    sweep = SweepFolder(tmp_path)
    (tmp_path / ".hydra").mkdir()  # the sweep's own config: not a job
    jobs = [RunFolder(tmp_path / str(n)) for n in range(5)]
    for job in jobs[:4]:
        job.hydra.mkdir(parents=True)
    jobs[0].metrics.write_text("{}\n")
    jobs[1].mark(run_folder.FAILED, "data.root: no such folder")
    jobs[2].mark(run_folder.INTERRUPTED, "stopped by SIGTERM")
    jobs[4].path.mkdir()
    jobs[4].mark(run_folder.FAILED, "crashed")  # a job whose Hydra copy is missing: still one
    assert sweep.jobs() == jobs
    expected = {
        "jobs": 5,
        "finished": 1,
        "failed": [
            {"folder": str(jobs[1].path), "reason": "data.root: no such folder"},
            {"folder": str(jobs[4].path), "reason": "crashed"},
        ],
        "interrupted": [{"folder": str(jobs[2].path), "reason": "stopped by SIGTERM"}],
    }
    assert sweep.write_status() == expected
    assert json.loads(sweep.status_file.read_text()) == expected
    jobs[2].clear_marks()
    assert "interrupted" not in sweep.status()  # the key only when some were


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_the_shipped_callbacks_write_where_the_run_folder_says(
    config_name: str, tmp_path: Path
) -> None:
    """conf/callbacks/*.yaml spell the callbacks' paths for Hydra; they must stay the paths
    RunFolder reads (a renamed file in one place would leave runs that nothing finds)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kdad.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=[f"paths.output_dir={tmp_path}"])
    OmegaConf.resolve(cfg.callbacks)
    run = RunFolder(tmp_path)
    callbacks = cfg.callbacks
    if config_name == "train":
        checkpoints = callbacks.model_checkpoint
        assert Path(checkpoints.dirpath) == run.checkpoints
        assert run.checkpoints / f"{checkpoints.filename}.ckpt" == run.best
    assert Path(callbacks.heatmaps.dirpath) == run.images
    assert Path(callbacks.scores.path) == run.scores
    assert Path(callbacks.curves.dirpath) == run.path
