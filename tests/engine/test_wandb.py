"""W&B for sweeps and ablations, checked from the offline run files (never an account).

An ablation multirun's runs are named by their swept values, grouped by the experiment,
carry one flattened copy of the config and their overrides, have overlayable curves, a
per-image table with thumbnails, min/max summaries, and the sweep ends with a summary run in
the same group. A resumed run continues its W&B run, and ``log_model`` uploads the final
checkpoint once as an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import TINY, run, run_in_process
from wandb_reader import find_run_files, read_run

QUIET = ["callbacks.heatmaps.num_images=2"]


def test_ablation_sweep_runs_are_named_grouped_and_summarised(
    env: dict[str, str], tmp_path: Path
) -> None:
    sweep = tmp_path / "ablation"
    run(
        "kdad.cli.train",
        [
            "-m",
            *TINY,
            *QUIET,
            "model=hkt",
            "model.cbam=true,false",
            "model.alignment=cross,same",
            "logger=wandb",
            "task_name=hkt_ablation_test",
            f"hydra.sweep.dir={sweep}",
        ],
        env,
        tmp_path,
    )
    runs = [read_run(path) for path in find_run_files(sweep)]
    jobs = [r for r in runs if r["job_type"] == "train"]
    (summary,) = [r for r in runs if r["job_type"] == "aggregate"]  # written when the sweep ended
    assert len(jobs) == 4
    # Named by the swept values only (the fixed test settings are not in the names).
    assert {r["name"] for r in jobs} == {
        f"hkt cbam={c} alignment={a}" for c in ("true", "false") for a in ("cross", "same")
    }
    assert {r["group"] for r in runs} == {"hkt_ablation_test"}
    for r in jobs:
        config = r["config"]
        # The overrides as config and as tags, the sweep folder, one flattened copy of the config.
        assert sorted(o.removeprefix("model.") for o in config["overrides"]) == sorted(
            r["name"].split(" ")[1:]
        )
        assert set(config["overrides"]) <= set(r["tags"])
        assert config["sweep"] == str(sweep)
        assert config["model.cbam"] in (True, False) and "model" not in config
        assert not any(isinstance(v, dict) for k, v in config.items() if not k.startswith("_wandb"))
        # Summaries: a loss's minimum, a metric's maximum.
        assert "min" in r["metrics"]["val/loss"] and "max" in r["metrics"]["test/image_auroc"]
        # One name per number: no summary/* copies of test/*.
        assert not any(k.startswith("summary/") for k in r["history"])
        # Curves as line plots backed by tables, overlayable across runs.
        for curve in ("image_roc", "pixel_roc", "pixel_pro"):
            assert any(k.startswith(f"test/curves/{curve}") for k in r["history"]), curve
    # The per-image table: thumbnails (bounded), normalised score and predicted label.
    tables = sorted(sweep.rglob("media/table/test/scores_*.table.json"))
    assert len(tables) == 4
    table = json.loads(tables[0].read_text())
    assert table["columns"] == [
        "path",
        "defect_type",
        "label",
        "score",
        "normalized_score",
        "predicted_label",
        "thumbnail",
    ]
    thumbs = [row[6] for row in table["data"] if row[6] is not None]
    assert 0 < len(thumbs) <= 64 and all(row[5] in (0, 1) for row in table["data"])
    # The summary run: the aggregate table of the four variants (4 rows + 4 mean rows).
    assert summary["history"]["aggregate/table/nrows"] == [8]
    assert (sweep / "aggregate.md").is_file()
    assert summary["summary"]  # the per-variant means


def test_resumed_run_continues_its_wandb_run_and_log_model_uploads_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    env = {
        **env,
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
    }
    base = [*TINY, *QUIET, "model=stfpm", "logger=wandb", f"hydra.run.dir={folder}"]
    run("kdad.cli.train", [*base, "logger.wandb.log_model=true"], env, tmp_path)
    first = read_run(find_run_files(folder)[0])
    run_id = (folder / "wandb_id").read_text().strip()
    assert first["id"] == run_id
    (artifact,) = [a for a in first["artifacts"] if a["type"] == "model"]
    assert set(artifact["files"]) == {"last.ckpt", "config.yaml"}

    run("kdad.cli.train", [*base, "ckpt_path=last", "trainer.max_epochs=2"], env, tmp_path)
    files = find_run_files(folder)
    assert len(files) == 2
    assert {read_run(f)["id"] for f in files} == {run_id}  # the same W&B run, resumed
    models = [a for f in files for a in read_run(f)["artifacts"] if a["type"] == "model"]
    assert len(models) == 1  # log_model off the second time: nothing more uploaded


@pytest.mark.parametrize("given", ["dir={sweep}", "{sweep}"])
def test_aggregate_takes_hydra_style_and_argparse_arguments(
    env: dict[str, str], tmp_path: Path, given: str
) -> None:
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    job.mkdir(parents=True)
    metrics = {"model": "rd", "data": "synthetic", "category": "stripes", "seed": 0}
    metrics |= {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7}
    (job / "metrics.json").write_text(json.dumps(metrics))
    proc = run_in_process(
        "kdad.cli.aggregate", [given.format(sweep=sweep), "plots=false"], env, tmp_path
    )
    assert "rd" in proc.stdout and (sweep / "aggregate.md").is_file()
    bad = run_in_process("kdad.cli.aggregate", [str(sweep), "colour=red"], env, tmp_path, expect=2)
    assert "colour=red: unknown key" in bad.stderr
