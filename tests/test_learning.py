"""Training does what it should: the loss goes down and anomalies score above normals.

Short CLI runs of the baselines on the synthetic textures with random-weight resnet18 teachers
(no download). Random teachers and a tiny budget make separation much weaker than with
ImageNet weights, so the bars are "clearly above chance", set from measured runs with margin
(see the README's Tests section for the measured values).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from clirun import run

BUDGET = [
    "model.backbone=resnet18",
    "model.pretrained=false",
    "data.image_size=64",
    "data.batch_size=8",  # more optimiser steps per epoch on the 54 training images
    "data.num_workers=0",
    "data.category=stripes",
    "trainer.max_epochs=8",
    "callbacks=none",
    "test_ckpt=last",  # no checkpoint callback: test the final weights (STFPM's default is "best")
    "logger=csv",
]
# Measured on this budget (see README); the bars leave a wide margin for seed/platform noise.
BARS = {
    "rd": {"image_auroc": 0.70, "pixel_auroc": 0.75},
    "stfpm": {"image_auroc": 0.65, "pixel_auroc": 0.70},
}


def epoch_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [
            float(row["train/loss_epoch"])
            for row in csv.DictReader(handle)
            if row.get("train/loss_epoch")
        ]


@pytest.mark.parametrize("model", ["rd", "stfpm"])
def test_short_run_learns_and_separates(model: str, env: dict[str, str], tmp_path: Path) -> None:
    run("kdad.train", [f"model={model}", *BUDGET, f"hydra.run.dir={tmp_path}"], env, tmp_path)
    losses = epoch_losses(tmp_path)
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key, bar in BARS[model].items():
        assert metrics[key] > bar, (key, metrics[key])
