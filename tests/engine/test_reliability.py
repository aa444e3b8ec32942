"""Reliability as a user meets it on the command line: resume after kill -9 with the shipped
callbacks, evaluation with the checkpoint's preprocessing, one-line errors for config
mistakes before any work, corrupt files found before training, and a sweep that survives a
killed and a failing job and continues when its command is run again."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clirun import DATA, TINY, run, run_in_process
from inprocess import assert_same_weights

from kdad.data.synthetic import ensure_synthetic

# Several batches per epoch; the shipped callbacks (last.ckpt after every epoch).
RESUMABLE = [
    *TINY,
    "data.batch_size=4",
    "logger=none",
]


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdad.cli.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds."""
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, (
            f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
        )
        assert time.monotonic() - start < timeout, "timed out waiting to kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_then_resume_with_the_shipped_callbacks_reaches_the_same_weights(
    env: dict[str, str], tmp_path: Path
) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = [*RESUMABLE, "trainer.max_epochs=3", "test=false"]
    run("kdad.cli.train", [*args, f"hydra.run.dir={reference}"], env, tmp_path)
    last = killed / "checkpoints" / "last.ckpt"
    proc = _start([*args, f"hydra.run.dir={killed}"], env, tmp_path)
    _kill_when(proc, last.is_file)  # epoch 1's checkpoint exists: killed in epoch 2
    assert 0 < torch.load(last, map_location="cpu", weights_only=True)["global_step"] < 12
    # The documented resume: the same folder, ckpt_path=last.
    proc = run(
        "kdad.cli.train", [*args, "ckpt_path=last", f"hydra.run.dir={killed}"], env, tmp_path
    )
    assert "resuming from" in proc.stdout + proc.stderr
    assert_same_weights(reference / "checkpoints" / "last.ckpt", last)
    assert not list((killed / "checkpoints").glob(".*partial"))


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    """Checkpoints are written beside the target and moved onto it: a write that dies keeps
    the previous last.ckpt as it was."""
    from types import SimpleNamespace

    from kdad.lightning.callbacks import Checkpoints

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def dies(path, weights_only=False):
        Path(path).write_bytes(b"half a checkp")
        raise KeyboardInterrupt  # the process is stopped mid-write

    trainer = SimpleNamespace(save_checkpoint=dies, is_global_zero=True, global_step=3)
    callback = Checkpoints(dirpath=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        callback._save_checkpoint(trainer, str(target))
    assert target.read_bytes() == b"previous"


def test_eval_uses_the_checkpoints_preprocessing(env: dict[str, str], tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    run(
        "kdad.cli.train",
        [*TINY, "logger=none", "callbacks=none", f"hydra.run.dir={trained}"],
        env,
        tmp_path,
    )
    evaluated = tmp_path / "eval"
    data = [arg for arg in DATA if not arg.startswith("data.image_size")]  # 256 px by default
    proc = run_in_process(  # the real command's main(), without a second process start
        "kdad.cli.eval",
        [*data, f"ckpt_path={trained}", "logger=none", f"hydra.run.dir={evaluated}"],
        env,
        tmp_path,
    )
    assert "data.image_size=64 from the checkpoint" in proc.stdout + proc.stderr
    assert "image_size: 64" in (evaluated / "config.yaml").read_text()
    a = json.loads((trained / "metrics.json").read_text())
    b = json.loads((evaluated / "metrics.json").read_text())
    assert a["image_auroc"] == pytest.approx(b["image_auroc"], abs=1e-6)
    # An explicit value wins, and the log says it differs from training.
    proc = run_in_process(  # the real command's main(), without a second process start
        "kdad.cli.eval",
        [
            *data,
            "data.image_size=96",
            f"ckpt_path={trained}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'e2'}",
        ],
        env,
        tmp_path,
    )
    assert "overrides the checkpoint's image_size=64" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.image_size=16"], "the smallest that works is"),
        (["data.image_size=1"], "the smallest that works is"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': expected an integer"),
        (["trainer.max_epochs=0"], "0 trains nothing"),
        (["data=folder"], "data.root is required"),
        (["model=stfpm", "model.layers=[5]"], "model.layers=[5]: 5 not a feature stage"),
        (["data.batch_size=-2"], "data.batch_size=-2: expected an integer >= 1"),
        (["+data.no_such_key=1"], "data: cannot be built from the config"),
    ],
)
def test_config_mistakes_are_one_line_before_any_work(
    env: dict[str, str], tmp_path: Path, overrides: list[str], expected: str
) -> None:
    base = TINY if overrides != ["data=folder"] else [a for a in TINY if "synthetic" not in a]
    args = [*base, "logger=none", *overrides, f"hydra.run.dir={tmp_path}"]
    # In this process (the command's own main(), no start-up): the checks stop before training.
    proc = run_in_process("kdad.cli.train", args, env, tmp_path, expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert expected in (tmp_path / "FAILED").read_text()
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


def _small_synthetic(cache: Path, category: str) -> Path:
    """A 64 px synthetic category (16 training images, 6 good and 2 per defect in test)."""
    return ensure_synthetic(
        cache / "synthetic",
        category,
        resolution=64,
        num_train=16,
        num_test_good=6,
        num_test_per_defect=2,
    )


def test_a_corrupt_test_image_is_found_before_training(env: dict[str, str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = _small_synthetic(cache, "dots")
    bad = sorted((root / "dots" / "test").rglob("*.png"))[-1]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    out = tmp_path / "run"
    proc = run_in_process(
        "kdad.cli.train",
        [*TINY, "logger=none", "data.category=dots", f"hydra.run.dir={out}"],
        {**env, "KDAD_CACHE_DIR": str(cache)},
        tmp_path,
        expect=2,
    )
    assert str(bad) in proc.stderr and "nothing was trained" in proc.stderr
    assert not (out / "checkpoints").exists()


def test_a_mask_of_the_wrong_size_is_found_before_training(
    env: dict[str, str], tmp_path: Path
) -> None:
    from PIL import Image

    cache = tmp_path / "cache"
    root = _small_synthetic(cache, "dots")
    mask = sorted((root / "dots" / "ground_truth").rglob("*_mask.png"))[0]
    Image.new("L", (64, 32)).save(mask)  # another image's mask: 64x32 for a 64x64 image
    out = tmp_path / "run"
    proc = run_in_process(
        "kdad.cli.train",
        [*TINY, "logger=none", "data.category=dots", f"hydra.run.dir={out}"],
        {**env, "KDAD_CACHE_DIR": str(cache)},
        tmp_path,
        expect=2,
    )
    assert f"mask {mask} is 64x32 but its image" in proc.stderr
    assert "nothing was trained" in proc.stderr and not (out / "checkpoints").exists()


def test_aggregate_skips_a_malformed_metrics_file_and_pngs_are_readable(
    env: dict[str, str], tmp_path: Path
) -> None:
    for name, text in {
        "good": json.dumps(
            {
                "model": "rd4ad",
                "data": "synthetic",
                "category": "dots",
                "seed": 0,
                "image_auroc": 0.9,
            }
        ),
        "broken": "{not json",
        "foreign": json.dumps([1, 2, 3]),
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    proc = run_in_process("kdad.cli.aggregate", [str(tmp_path)], env, tmp_path)
    assert proc.stderr.count("warning: skipping") == 2
    mode = stat.S_IMODE(os.stat(tmp_path / "aggregate_bars.png").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "aggregate.md").st_mode)


def test_sweep_with_a_killed_and_a_failing_job_continues_when_run_again(
    env: dict[str, str], tmp_path: Path
) -> None:
    """4 jobs: one finished, one reading a corrupt file, one killed with SIGKILL mid-epoch, one
    not started yet. Running the same multirun command again skips the finished job, fails the
    corrupt one again, resumes the killed one from its last.ckpt and runs the last; kdad-aggregate
    accounts for all four."""
    cache = tmp_path / "cache"
    env = {**env, "KDAD_CACHE_DIR": str(cache)}
    root = _small_synthetic(cache, "wood")
    bad = sorted((root / "wood" / "test" / "good").glob("*.png"))[0]
    bad.write_bytes(b"not a png")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *RESUMABLE,
        "trainer.max_epochs=2",
        "callbacks.heatmaps.num_images=0",
        "data.category=stripes,wood,cells,dots",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = _start(args, env, tmp_path)
    # Jobs run in order (job 1 reads the corrupt file): kill during job 2's second epoch.
    _kill_when(proc, (sweep / "2" / "checkpoints" / "last.ckpt").is_file)
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "2" / "metrics.json").exists()
    assert (sweep / "1" / "FAILED").is_file() and not (sweep / "3").exists()
    finished_before = {p.parent.name: p.stat().st_mtime for p in sweep.glob("*/metrics.json")}

    again = run("kdad.cli.train", args, env, tmp_path, expect=2)  # the corrupt job fails again
    log = again.stdout + again.stderr
    assert "already holds a finished run" in log and "holds an unfinished run; resuming" in log
    for job, mtime in finished_before.items():  # finished jobs were skipped, not re-run
        assert (sweep / job / "metrics.json").stat().st_mtime == mtime
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status["jobs"] == 4 and status["finished"] == 3 and len(status["failed"]) == 1
    assert str(bad) in status["failed"][0]["reason"]
    agg = run_in_process("kdad.cli.aggregate", [str(sweep), "plots=false"], env, tmp_path)
    table = (sweep / "aggregate.md").read_text()
    for category in ("stripes", "cells", "dots"):
        assert category in table
    assert "Missing runs (1)" in table and bad.name in table and "missing" in agg.stdout.lower()


def _terminate_when(proc: subprocess.Popen, ready, timeout: float = 300) -> str:
    """SIGTERM ``proc`` (what Slurm sends on pre-emption or time limit) once ``ready()``
    holds; wait for it and return its stderr."""
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"finished first: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - start < timeout, "timed out waiting to terminate"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return stderr


def test_sigterm_leaves_a_resumable_marked_run_and_a_rerun_finishes_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    args = [*RESUMABLE, "trainer.max_epochs=4", f"hydra.run.dir={folder}"]
    last = folder / "checkpoints" / "last.ckpt"
    proc = _start(args, env, tmp_path)
    stderr = _terminate_when(proc, last.is_file)  # in epoch 2 or later
    assert proc.returncode == 143, stderr[-2000:]
    assert "kdad: interrupted: stopped by SIGTERM" in stderr
    assert "checkpoints/last.ckpt saved" in stderr
    assert (folder / "INTERRUPTED").is_file() and not (folder / "FAILED").exists()
    assert not (folder / "metrics.json").exists()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] > 0 and saved["kdad"]["sha256"]  # a signed, resumable checkpoint
    # The same command again resumes it (resume=auto) and finishes; the mark is cleared.
    proc = run("kdad.cli.train", args, env, tmp_path)
    assert "resuming from" in proc.stdout + proc.stderr
    assert (folder / "metrics.json").is_file() and not (folder / "INTERRUPTED").exists()


def test_sigterm_stops_a_multirun_with_its_status_and_a_rerun_completes_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *RESUMABLE, "trainer.max_epochs=4", "seed=1,2", f"hydra.sweep.dir={sweep}"]
    proc = _start(args, env, tmp_path)
    stderr = _terminate_when(proc, (sweep / "0" / "checkpoints" / "last.ckpt").is_file)
    assert proc.returncode == 143, stderr[-2000:]
    assert not (sweep / "1").exists()  # the later job never started
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status["finished"] == 0 and status["failed"] == []
    assert [item["folder"] for item in status["interrupted"]] == [str(sweep / "0")]
    # Re-running the sweep resumes the interrupted job and runs the other.
    proc = run("kdad.cli.train", args, env, tmp_path)
    assert "holds an unfinished run; resuming" in proc.stdout + proc.stderr
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status == {"jobs": 2, "finished": 2, "failed": []}


def test_a_corrupted_optimiser_state_is_refused_before_resuming(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    args = [*RESUMABLE, "trainer.max_epochs=2", "test=false", f"hydra.run.dir={folder}"]
    run_in_process("kdad.cli.train", args, env, tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    state = checkpoint["optimizer_states"][0]["state"]
    first = next(iter(state.values()))
    first["exp_avg"][(0,) * first["exp_avg"].dim()] = float("nan")  # one corrupted number
    torch.save(checkpoint, last)
    proc = run_in_process(
        "kdad.cli.train",
        [*RESUMABLE, "trainer.max_epochs=3", "ckpt_path=last", f"hydra.run.dir={folder}"],
        env,
        tmp_path,
        expect=2,
    )
    assert "do not match the digest recorded when it was saved" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_run_into_a_folder_in_use_refuses_and_a_killed_run_leaves_it_free(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    args = [*RESUMABLE, "trainer.max_epochs=4", f"hydra.run.dir={folder}"]
    first = _start(args, env, tmp_path)
    _kill_when_ready = (folder / "checkpoints" / "last.ckpt").is_file
    start = time.monotonic()
    while not _kill_when_ready():
        assert first.poll() is None, first.stderr.read()[-2000:]
        assert time.monotonic() - start < 300
        time.sleep(0.05)
    second = run_in_process("kdad.cli.train", args, env, tmp_path, expect=2)
    assert f"run folder {folder} is in use by another kdad run (process {first.pid})" in (
        second.stderr
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = run_in_process("kdad.cli.train", args, env, tmp_path)  # the lock died with it
    assert "resuming" in again.stdout + again.stderr and (folder / "metrics.json").is_file()


def test_a_full_disk_during_a_checkpoint_write_leaves_no_partial_file(tmp_path: Path) -> None:
    import errno
    from types import SimpleNamespace

    from kdad.errors import disk_full
    from kdad.lightning.callbacks import save_checkpoint_atomically

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def full(path, weights_only=False):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    trainer = SimpleNamespace(save_checkpoint=full, is_global_zero=True)
    with pytest.raises(OSError) as raised:
        save_checkpoint_atomically(trainer, target, weights_only=False)
    assert f"writing {target}" in disk_full(raised.value)  # the checkpoint, not its temp file
    assert target.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [target]
