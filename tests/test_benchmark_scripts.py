"""experiments/benchmark/nferd_parts.py runs and names every part it times, and
train_throughput.py pairs each window with its reference's (tiny sizes; the timings
themselves are never checked in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments" / "benchmark"))
from train_throughput import paired_ratios  # noqa: E402


def test_step_time_ratios_are_paired_window_by_window() -> None:
    """Each window's time is divided by the reference's in the same round: a slow phase that
    hits both (here windows 3-5, 4x slower) leaves the ratio alone."""
    median, low, high = paired_ratios([1.1, 1.1, 4.4, 4.4, 4.4], [1.0, 1.0, 4.0, 4.0, 4.0])
    assert (median, low, high) == pytest.approx((1.1, 1.1, 1.1))
    # ratios 2, 1.5, 3, 1: median 1.75, quartiles (statistics.quantiles, exclusive) 1.125, 2.75
    assert paired_ratios([2.0, 3.0, 6.0, 4.0], [1.0, 2.0, 2.0, 4.0]) == pytest.approx(
        (1.75, 1.125, 2.75)
    )
    assert paired_ratios([3.0], [2.0]) == pytest.approx((1.5, 1.5, 1.5))


@pytest.mark.slow  # 11 s quiet, 30 s beside other jobs, on 2 CPU cores: make test-all
def test_nferd_parts_times_every_bank_and_fusion_stage(tmp_path: Path) -> None:
    out = tmp_path / "parts"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "benchmark" / "nferd_parts.py"),
            "--backbone=resnet18",
            "--size=64",
            "--batch=2",
            "--repeats=1",
            "--windows=1",
            f"--out={out}",
        ],
        check=True,
        capture_output=True,
    )
    ms = json.loads(out.with_suffix(".json").read_text())["ms"]
    expected = {"rd4ad: whole training step", "rd4ad: loss"}
    for model in ("nferd", "nferd_plus"):
        expected |= {f"{model}: whole training step", f"{model}: loss"}
        expected |= {
            f"{model}: {kind} {stage}" for kind in ("bank", "fusion") for stage in range(3)
        }
    assert set(ms) == expected
    assert all(value > 0 for value in ms.values())
    assert "| nferd: bank 0 |" in out.with_suffix(".md").read_text()
