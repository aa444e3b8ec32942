"""W&B for sweeps and ablations, checked from the offline run files (never an account).

An ablation multirun's runs are named by their swept values, grouped by the experiment,
carry one flattened copy of the config and their overrides, have overlayable curves, a
per-image table with thumbnails, summaries that are plain numbers, and the sweep ends with a
summary run in the same group. A failed job ends its W&B run failed (its exit code), W&B's own
console output stays out of kdad's, every experiment has its own group, and the W&B sweep
recipe (conf/wandb_sweep.yaml) builds a command that Hydra composes. A resumed run continues
its W&B run, and ``log_model`` uploads the final checkpoint once as an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from clirun import TINY, run, run_in_process
from hydra import compose, initialize_config_dir
from wandb_reader import find_run_files, read_run

from kdad.config import CONFIG_DIR
from kdad.engine.hydra import register_resolvers
from kdad.io.results import METRIC_KEYS

QUIET = ["callbacks.heatmaps.num_images=2"]
SWEEP_RECIPE = Path(CONFIG_DIR) / "wandb_sweep.yaml"


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
        # Summaries: plain numbers (sortable columns), the best of training under its own name.
        assert isinstance(r["summary"]["test/image_auroc"], float)
        assert r["summary"]["val/loss_min"] <= r["summary"]["val/loss"]
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
    metrics = {"model": "rd4ad", "data": "synthetic", "category": "stripes", "seed": 0}
    metrics |= {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7}
    (job / "metrics.json").write_text(json.dumps(metrics))
    proc = run_in_process(
        "kdad.cli.aggregate", [given.format(sweep=sweep), "plots=false"], env, tmp_path
    )
    assert "rd4ad" in proc.stdout and (sweep / "aggregate.md").is_file()
    bad = run_in_process("kdad.cli.aggregate", [str(sweep), "colour=red"], env, tmp_path, expect=2)
    assert "colour=red: unknown key" in bad.stderr


def _wandb_chatter(proc: Any) -> list[str]:
    return [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.startswith("wandb:") or "reinit" in line or "anonymous setting" in line
    ]


def test_failed_job_of_a_multirun_ends_its_wandb_run_failed_and_summaries_are_plain_numbers(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Two jobs: test_ckpt=last succeeds; test_ckpt=best fails on a user error after training
    (RD4AD keeps no best checkpoint), so after its W&B run started."""
    sweep = tmp_path / "sweep"
    # As a user's shell (no WANDB_SILENT): kdad keeps W&B quiet by default.
    env = {k: v for k, v in env.items() if k != "WANDB_SILENT"}
    proc = run(
        "kdad.cli.train",
        [
            "-m",
            *TINY,
            *QUIET,
            "model=rd4ad",
            "test_ckpt=last,best",
            "logger=wandb",
            f"hydra.sweep.dir={sweep}",
            # The sweep's summary run is kdad/engine/aggregate.py's (tested above): jobs only here.
            "~hydra.callbacks.sweep_summary",
        ],
        env,
        tmp_path,
        expect=2,
    )
    runs = {r["config"]["test_ckpt"]: r for r in map(read_run, find_run_files(sweep))}
    assert set(runs) == {"last", "best"}
    assert runs["last"]["exit_code"] == 0
    assert runs["best"]["exit_code"] == 2  # W&B shows it failed, as the job did
    assert (sweep / "1" / "FAILED").is_file()
    # The summary as dashboards use it: every test metric and loss a plain number, the best of
    # training under its own name, also for the failed run (settled when it finished).
    # Read from the logged values (history), not from W&B's metric definitions: a metric that
    # is defined but never logged fails here.
    done = runs["last"]
    written = json.loads((sweep / "0" / "metrics.json").read_text())
    for key in METRIC_KEYS:
        (logged,) = done["history"][f"test/{key}"]  # logged once, at the end of testing
        assert logged == pytest.approx(written[key], rel=1e-6, abs=1e-6), key
        assert done["summary"][f"test/{key}"] == logged, key
        assert not done["metrics"].get(f"test/{key}"), key  # no {max: ...} summary
    for r in runs.values():
        for loss in ("val/loss", "train/loss_epoch"):
            logged = r["history"][loss]
            assert logged and all(isinstance(v, float) for v in logged), loss
            assert r["summary"][loss] == logged[-1]
            assert r["summary"][f"{loss}_min"] == min(logged)
        assert r["group"] == "train" and not r["deprecated"]  # no reinit=True and the like
    # The W&B sweep recipe's objective is one of these plain numbers.
    objective = yaml.safe_load(SWEEP_RECIPE.read_text())["metric"]["name"]
    assert isinstance(done["summary"][objective], float)
    # Quiet by default: no W&B console output (header, sparklines, sync hints, warnings), one
    # kdad line per job saying where its run is.
    assert not _wandb_chatter(proc), _wandb_chatter(proc)
    assert (proc.stdout + proc.stderr).count("W&B: run ") == 2


def test_single_run_failing_after_wandb_started_ends_its_run_failed(
    env: dict[str, str], tmp_path: Path
) -> None:
    """test_ckpt=best with RD4AD (no best checkpoint kept): a user error after training."""
    folder = tmp_path / "run"
    env = {k: v for k, v in env.items() if k != "WANDB_SILENT"}
    args = [
        *TINY,
        *QUIET,
        "model=rd4ad",
        "test_ckpt=best",
        "logger=wandb",
        f"hydra.run.dir={folder}",
    ]
    proc = run("kdad.cli.train", [*args, "logger.wandb.quiet=false"], env, tmp_path, expect=2)
    assert "kdad: error: test_ckpt=best but no best checkpoint" in proc.stderr
    (logged,) = [read_run(f) for f in find_run_files(folder)]
    assert logged["exit_code"] == 2 and (folder / "FAILED").is_file()
    assert isinstance(logged["summary"]["val/loss"], float)
    # quiet=false: W&B's console output as W&B prints it (less Lightning's stray warning).
    chatter = _wandb_chatter(proc)
    assert any("Run summary" in line for line in chatter), proc.stderr[-3000:]
    assert not [line for line in chatter if "anonymous" in line or "reinit" in line]


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
)
def test_every_experiment_has_its_own_wandb_group(experiment: str) -> None:
    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "logger=wandb"])
    assert cfg.logger.wandb.group == experiment


def _agent_command(recipe: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command line ``wandb agent`` runs for a trial with these parameter values: W&B's own
    macro expansion (wandb_agent.Agent._command_run), without the network."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    trial = {"args": {k: {"value": v} for k, v in values.items()}, "program": recipe["program"]}
    macros = sweep_utils.create_sweep_command_args(trial)
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [recipe["program"]]}
    words = []
    for word in map(str, sweep_utils.create_sweep_command(list(recipe["command"]))):
        is_macro = word.startswith("${") and word.endswith("}")
        words += (macros.get(word[2:-1]) or []) if is_macro else [word]
    return words


def test_wandb_sweep_recipe_builds_a_command_that_hydra_composes(
    env: dict[str, str], tmp_path: Path
) -> None:
    recipe = yaml.safe_load(SWEEP_RECIPE.read_text())
    assert recipe["metric"]["name"] in {f"test/{key}" for key in METRIC_KEYS}
    # One trial: each parameter's value, first value or its range's lower end.
    values = {
        key: spec.get("value", spec["values"][0] if "values" in spec else spec.get("min"))
        for key, spec in recipe["parameters"].items()
    }
    command = _agent_command(recipe, values)
    assert command[:2] == ["/usr/bin/env", "kdad-train"]
    assert [f"{k}={v}" for k, v in values.items()] == command[-len(values) :]  # Hydra's syntax
    # What the agent's trial composes (in its environment: the agent chose the run id).
    env = {**env, "WANDB_SWEEP_ID": "sweep01", "WANDB_RUN_ID": "trial01"}
    proc = run_in_process(
        "kdad.cli.train", [*command[2:], "--cfg", "job", "--resolve"], env, tmp_path
    )
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model_name"] == "rd4ad"
    assert cfg["optimizer"]["lr"] == values["optimizer.lr"]
    assert cfg["model"]["anomaly_map"]["sigma"] == values["model.anomaly_map.sigma"]
    wandb_cfg = cfg["logger"]["wandb"]
    assert wandb_cfg["group"] == "rd4ad_wandb_sweep" and wandb_cfg["id"] == "trial01"
