"""experiments/benchmark/nferd_parts.py runs and names every part it times (tiny sizes; the
timings themselves are never checked in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    expected = {"rd4ad: whole training step"}
    for model in ("nferd", "nferd_plus"):
        expected.add(f"{model}: whole training step")
        expected |= {
            f"{model}: {kind} {stage}" for kind in ("bank", "fusion") for stage in range(3)
        }
    assert set(ms) == expected
    assert all(value > 0 for value in ms.values())
    assert "| nferd: bank 0 |" in out.with_suffix(".md").read_text()
