"""experiments/photos/study.py: a finished run's results appear whole under results/, its
RUN.md line names the commit, CPU and threads it ran with, and a done run is skipped."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Stands in for the venv's python: writes the run folder's files as kdad-train would (or fails).
FAKE_PYTHON = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in hydra.run.dir=*) folder="${arg#hydra.run.dir=}";; esac
done
case " $* " in *" seed=9 "*) exit 3;; esac
mkdir -p "$folder"
echo '{"image_auroc": 0.5}' > "$folder/metrics.json"
echo "model: knn" > "$folder/config.yaml"
echo "threads=$OMP_NUM_THREADS" > "$folder/scores.csv"
"""


@pytest.fixture
def study(tmp_path, monkeypatch):
    path = ROOT / "experiments" / "photos" / "study.py"
    spec = importlib.util.spec_from_file_location("photos_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(module, "BIN", bin_dir)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(module, "THREADS", "1")
    (tmp_path / "results" / "headline").mkdir(parents=True)
    return module


def test_a_finished_run_is_copied_recorded_with_its_machine_and_then_skipped(study) -> None:
    overrides = ["model=knn", "data.category=moon", "seed=0"]
    assert study.execute("headline", "knn_moon_seed0", overrides, None) is True
    dest = study.RESULTS / "headline" / "knn_moon_seed0"
    assert sorted(p.name for p in dest.iterdir()) == ["config.yaml", "metrics.json", "scores.csv"]
    assert (dest / "scores.csv").read_text().strip() == "threads=1"  # the run got THREADS
    (line,) = (study.RESULTS / "headline" / "RUN.md").read_text().splitlines()
    assert line.startswith("- `knn_moon_seed0`: ")
    assert f", {study.cpu_name()}, OMP_NUM_THREADS=1: `kdad-train " in line
    assert line.endswith("model=knn data.category=moon seed=0`")  # no hydra.run.dir
    # done: skipped, nothing recorded again
    assert study.execute("headline", "knn_moon_seed0", overrides, None) is False
    assert len((study.RESULTS / "headline" / "RUN.md").read_text().splitlines()) == 1


def test_a_failed_run_leaves_no_results_and_no_record(study) -> None:
    study.execute("headline", "knn_moon_seed9", ["model=knn", "seed=9"], None)
    assert not (study.RESULTS / "headline" / "knn_moon_seed9").exists()
    assert not (study.RESULTS / "headline" / "knn_moon_seed9.tmp").exists()
    assert not (study.RESULTS / "headline" / "RUN.md").exists()


@pytest.mark.parametrize(
    ("left", "note"),
    [
        # killed half-way: kdad-train's resume=auto continues from last.ckpt
        ("checkpoints/last.ckpt", " s after resuming an interrupted run, commit "),
        # finished but not copied: kept as it is and only copied
        ("metrics.json", " s (finished before, only copied now), commit "),
    ],
)
def test_a_run_left_in_its_log_folder_says_what_became_of_it(study, left, note) -> None:
    file = study.LOGS / "headline" / "knn_coins_seed0" / left
    file.parent.mkdir(parents=True)
    file.write_text('{"image_auroc": 0.5}')
    assert study.execute("headline", "knn_coins_seed0", ["model=knn", "seed=0"], None) is True
    (line,) = (study.RESULTS / "headline" / "RUN.md").read_text().splitlines()
    assert note in line


def test_the_layers_stage_reruns_the_short_variants_on_deeper_layers(study) -> None:
    runs = {name: overrides for name, overrides, _ in study.stage_runs("layers")}
    assert len(runs) == 3 * 3 * 3  # rd, nferd, knn x flower, coffee, china x seeds 0-2
    rd = runs["rd_layers-2-3-4_flower_seed0"]
    assert "model.layers=[2,3,4]" in rd and "model.backbone=tf_efficientnet_lite0" in rd
    assert f"trainer.max_epochs={study.EPOCHS['rd']}" in rd  # the headline's budget
    knn = runs["knn_layers-2-3-4_china_seed2"]
    assert "model.layers=[2,3,4]" in knn and not any("max_epochs" in o for o in knn)


def test_the_layers_table_holds_the_headline_runs_beside_the_stage(study, monkeypatch) -> None:
    for name in (
        "rd_layers-2-3-4_flower_seed0",
        "knn_layers-2-3-4_flower_seed0",
        "rd_flower_seed0",
        "knn_flower_seed0",
        "rd_flower_seed1",  # the stage has no seed 1 yet: left out
    ):
        stage = "layers" if "layers" in name else "headline"
        (study.RESULTS / stage / name).mkdir(parents=True)
        (study.RESULTS / stage / name / "metrics.json").write_text("{}")
    (study.RESULTS / "headline" / "stfpm_flower_seed0").mkdir()  # not one of the stage's models
    (study.RESULTS / "headline" / "stfpm_flower_seed0" / "metrics.json").write_text("{}")
    seen: list[str] = []

    def aggregate(command, **_):
        seen.extend(sorted(p.name for p in Path(command[-2]).iterdir()))
        (Path(command[-2]) / "aggregate.md").write_text("table")

    monkeypatch.setattr(study.subprocess, "run", aggregate)
    study.LOGS.mkdir()
    study.aggregate("layers")
    assert seen == [
        "knn_flower_seed0",
        "knn_layers-2-3-4_flower_seed0",
        "rd_flower_seed0",
        "rd_layers-2-3-4_flower_seed0",
    ]
    assert (study.RESULTS / "layers" / "aggregate.md").read_text() == "table"
