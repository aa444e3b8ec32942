"""Sweeps as researchers run them: launchers, failing jobs, Optuna, W&B groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from clirun import TINY, run, run_in_process

QUIET = ["logger=none", "callbacks=none"]


@pytest.mark.slow  # ~20-30 s each on 2 CPU cores: make test-all
def test_submitit_local_two_job_sweep_completes(env: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run(
        "kdad.cli.train",
        ["-m", "launcher=local_cpu", *TINY, *QUIET, "seed=1,2", f"hydra.sweep.dir={sweep}"],
        env,
        tmp_path,
    )
    assert sorted(p.parent.name for p in sweep.rglob("metrics.json")) == ["0", "1"]
    assert list(sweep.glob(".submitit/*"))  # really went through submitit
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status == {"jobs": 2, "finished": 2, "failed": []}


def test_failing_job_does_not_stop_the_sweep_and_is_reported_missing(
    env: dict[str, str], tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    proc = run(
        "kdad.cli.train",
        ["-m", *TINY, *QUIET, "data.category=marble,stripes", f"hydra.sweep.dir={sweep}"],
        env,
        tmp_path,
        expect=2,
    )
    assert "unknown synthetic category 'marble'" in proc.stderr
    assert (sweep / "1" / "metrics.json").is_file()  # the job after the failure still ran
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert status["jobs"] == 2 and status["finished"] == 1 and len(status["failed"]) == 1
    agg = run_in_process("kdad.cli.aggregate", [str(sweep)], env, tmp_path)
    assert "Missing runs (1)" in agg.stdout and "marble" in agg.stdout
    table = (sweep / "aggregate.csv").read_text().splitlines()
    assert len(table) == 1 + 2  # header, the stripes row, the mean row: the failure is not a zero


@pytest.mark.slow  # ~20-30 s each on 2 CPU cores: make test-all
def test_optuna_search_runs_two_trials(env: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    args = [
        "hparams_search=rd_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
    ]
    run("kdad.cli.train", [*args, *TINY, *QUIET, f"hydra.sweep.dir={sweep}"], env, tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads(p.read_text())["pixel_aupro"] for p in sweep.rglob("metrics.json")]
    assert len(values) == 2
    assert results["best_value"] == max(values)  # Optuna got the metric the jobs returned
    assert set(results["best_params"]) == {"optimizer.lr", "model.anomaly_map.sigma"}
