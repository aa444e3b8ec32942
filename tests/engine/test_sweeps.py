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
        "hparams_search=rd4ad_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
    ]
    run("kdad.cli.train", [*args, *TINY, *QUIET, f"hydra.sweep.dir={sweep}"], env, tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads(p.read_text())["pixel_aupro"] for p in sweep.rglob("metrics.json")]
    assert len(values) == 2
    assert results["best_value"] == max(values)  # Optuna got the metric the jobs returned
    assert set(results["best_params"]) == {"optimizer.lr", "model.anomaly_map.sigma"}


# A multirun typed as a user types it: no hydra.sweep.dir, started in an empty folder outside
# the checkout. (Every other sweep test passes hydra.sweep.dir; that hid a crash of this one.)
AS_TYPED = {
    "basic": ["model=hkt", "model.cbam=true,false"],
    "submitit_local": ["launcher=local_cpu", "seed=1,2"],
    "optuna": [
        "hparams_search=rd4ad_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
    ],
}


@pytest.mark.parametrize("launcher", list(AS_TYPED))
def test_multirun_without_sweep_dir_from_an_empty_folder(
    launcher: str, env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    env = {k: v for k, v in env.items() if k not in ("KDAD_ROOT", "KDAD_LOG_DIR")}
    args = ["-m", *AS_TYPED[launcher], *TINY, *QUIET]
    if launcher == "optuna":
        args.remove("-m")  # the search config sets hydra.mode=MULTIRUN itself
    run("kdad.cli.train", args, env, folder)
    sweeps = list((folder / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # the default sweep folder, under the folder typed in
    status = json.loads((sweeps[0] / "sweep_status.json").read_text())
    assert status == {"jobs": 2, "finished": 2, "failed": []}
    assert sorted(p.parent.name for p in sweeps[0].rglob("metrics.json")) == ["0", "1"]
