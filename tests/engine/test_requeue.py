"""A job scheduler's requeue signal (submitit's USR2, which Slurm sends before the time limit
and on pre-emption): kdad stops at a step's end, saves a resumable checkpoint and marks the run
before the scheduler's handler requeues the job, and the requeued job resumes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from clirun import TINY, run_in_process

RESUMABLE = [*TINY, "data.batch_size=4", "logger=none", "callbacks.heatmaps.num_images=0"]


def _signal_when(path: Path, number: int, pid: int, timeout: float = 300) -> threading.Thread:
    """Send ``number`` to ``pid`` once ``path`` exists (epoch 1's last.ckpt: mid-training)."""

    def wait_and_send() -> None:
        start = time.monotonic()
        while not path.is_file() and time.monotonic() - start < timeout:
            time.sleep(0.05)
        os.kill(pid, number)

    thread = threading.Thread(target=wait_and_send, daemon=True)
    thread.start()
    return thread


def test_the_schedulers_signal_saves_and_marks_the_run_before_its_handler_requeues(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    last = folder / "checkpoints" / "last.ckpt"
    args = [*RESUMABLE, "trainer.max_epochs=5", f"hydra.run.dir={folder}"]
    seen: list[dict] = []

    def scheduler(signum: int, frame) -> None:  # what submitit's handler does: requeue, exit
        saved = torch.load(last, map_location="cpu", weights_only=True)
        seen.append(
            {
                "signal": signum,
                "step": saved["global_step"],
                "signed": bool(saved["kdad"]["sha256"]),
                "marked": (folder / "INTERRUPTED").is_file(),
            }
        )
        sys.exit(144)

    previous = signal.signal(signal.SIGUSR2, scheduler)
    try:
        _signal_when(last, signal.SIGUSR2, os.getpid())
        proc = run_in_process(
            "kdad.cli.train", args, {**env, "SUBMITIT_EXECUTOR": "local"}, tmp_path, expect=144
        )
    finally:
        signal.signal(signal.SIGUSR2, previous)
    # The scheduler's handler ran once, after a resumable checkpoint and the mark were written.
    assert len(seen) == 1, proc.stderr[-2000:]
    assert seen[0]["signal"] == signal.SIGUSR2 and seen[0]["marked"] and seen[0]["signed"]
    assert 0 < seen[0]["step"] < 5 * 4  # mid-training: 4 steps per epoch, 5 epochs
    assert "stopped by the job scheduler's SIGUSR2" in proc.stderr
    assert not (folder / "metrics.json").exists()
    # The requeued job runs the same command in the same folder: it resumes and finishes.
    proc = run_in_process("kdad.cli.train", args, env, tmp_path)
    assert "resuming from" in proc.stdout + proc.stderr
    assert (folder / "metrics.json").is_file() and not (folder / "INTERRUPTED").exists()


def test_without_a_scheduler_its_signal_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside submitit kdad installs no handler for USR2: the process's own one stays."""
    from kdad.lightning.callbacks import SaveOnInterrupt, scheduler_signal

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert scheduler_signal() is None
    previous = signal.getsignal(signal.SIGUSR2)
    SaveOnInterrupt(tmp_path / "last.ckpt").on_train_start(None, None)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGUSR2) is previous


@pytest.mark.slow  # ~50-90 s on 2 CPU cores: make test-all
def test_a_submitit_job_signalled_mid_training_is_requeued_and_resumed(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The real path: Hydra's submitit launcher (launcher=local_cpu), USR2 to the job's process
    as Slurm sends it; submitit requeues the job, which resumes the run and finishes it."""
    sweep = tmp_path / "sweep"
    args = ["-m", "launcher=local_cpu", *RESUMABLE, "trainer.max_epochs=6", "seed=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdad.cli.train", *args, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    start = time.monotonic()
    while not last.is_file():
        assert proc.poll() is None and time.monotonic() - start < 300, "no epoch finished"
        time.sleep(0.05)
    job = subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True, text=True
    ).stdout.split()
    assert job, "the submitit job's process was not found"
    os.kill(int(job[0]), signal.SIGUSR2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "stopped by the job scheduler's SIGUSR2" in logs
    assert "Requeued job" in logs and "holds an unfinished run; resuming" in logs
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status == {"jobs": 1, "finished": 1, "failed": []}
