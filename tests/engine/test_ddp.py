"""DDP on CPU (``trainer=ddp_sim``: 2 processes, gloo): same numbers as one process.

The test set is split across the ranks without padding, metric states are gathered, and the
run's files (metrics.json, scores.csv, heatmaps) are written once, into the one run folder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch.distributed as dist
from clirun import DATA, TINY, run

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend"
)
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_ap")


@pytest.fixture(scope="module")
def checkpoint(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_train")
    run(
        "kdad.cli.train", [*TINY, "logger=none", "callbacks=none", f"hydra.run.dir={out}"], env, out
    )
    return out / "checkpoints" / "last.ckpt"


def _scores(folder: Path) -> list[tuple[str, float]]:
    with open(folder / "scores.csv") as handle:
        return [(row["path"], float(row["score"])) for row in csv.DictReader(handle)]


@pytest.mark.slow  # ~20-30 s each on 2 CPU cores: make test-all
def test_ddp_sim_eval_equals_single_process(
    checkpoint: Path, env: dict[str, str], tmp_path: Path
) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run(
        "kdad.cli.eval",
        [*DATA, f"ckpt_path={checkpoint}", "logger=none", f"hydra.run.dir={single}"],
        env,
        tmp_path,
    )
    run(
        "kdad.cli.eval",
        [
            *DATA,
            f"ckpt_path={checkpoint}",
            "logger=none",
            "trainer=ddp_sim",
            f"hydra.run.dir={ddp}",
        ],
        env,
        tmp_path,
    )
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    # Every test image scored exactly once, by one rank or the other, with the same score.
    single_scores, ddp_scores = _scores(single), _scores(ddp)
    assert len(ddp_scores) == len({p for p, _ in ddp_scores}) == len(single_scores)
    assert dict(ddp_scores) == pytest.approx(dict(single_scores), abs=1e-5)
    assert len(list((ddp / "images").glob("*.png"))) == 16  # written once, by rank 0


@pytest.mark.slow  # ~20-30 s each on 2 CPU cores: make test-all
def test_ddp_sim_training_in_a_multirun_keeps_one_folder_per_run(
    env: dict[str, str], tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    run(
        "kdad.cli.train",
        [
            "-m",
            *TINY,
            "trainer=ddp_sim",
            "logger=none",
            "callbacks=none",
            "seed=7",
            f"hydra.sweep.dir={sweep}",
        ],
        env,
        tmp_path,
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0"]  # no stray folders from the second rank
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["seed"] == 7 and 0.0 <= metrics["image_auroc"] <= 1.0
