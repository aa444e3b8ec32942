"""Running kdad's entry points as a user does (a subprocess), with tiny settings for tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA = [
    "data.image_size=64",
    "data.num_workers=0",
    "data.synthetic.resolution=64",
    "data.synthetic.num_train=16",
    "data.synthetic.num_test_good=6",
    "data.synthetic.num_test_per_defect=2",
]
TINY = ["model.backbone=resnet18", "model.pretrained=false", *DATA, "trainer.max_epochs=1"]


def run(
    module: str, args: list[str], env: dict[str, str], cwd: Path, expect: int = 0
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != expect:
        # kdad's own one-line errors first: a long log tail must not push them out of sight.
        errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad:")]
        raise AssertionError(
            f"{module} {args} exited {proc.returncode}, expected {expect}\n"
            + "\n".join(errors)
            + f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
        )
    return proc
