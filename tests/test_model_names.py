"""One name per variant: RD4AD is ``model=rd4ad``, kdad.models.rd4ad.RD4AD. Its earlier config
name ``rd`` stays an alias, and what older runs wrote under it (checkpoints naming
``model_name: rd`` and the class ``ReverseDistillation``, results with ``"model": "rd"``) is read
under the current name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from clirun import DATA, TINY, run_in_process

from kdad.config import MODEL_ALIASES, MODEL_SCHEMAS, RENAMED_TARGETS
from kdad.io.checkpoint import write_checkpoint

OLD_TARGET = "kdad.models.rd4ad.ReverseDistillation"


def test_each_variant_has_one_name_in_config_module_and_class() -> None:
    for name, target in MODEL_SCHEMAS.items():
        module, _, cls = target.rpartition(".")
        assert module == f"kdad.models.{name.removesuffix('_plus')}", target
        assert cls.lower() == name.removesuffix("_plus"), target
    for old, new in MODEL_ALIASES.items():
        assert new in MODEL_SCHEMAS and old not in MODEL_SCHEMAS
        text = (Path(__file__).parents[1] / "conf" / "model" / f"{old}.yaml").read_text()
        assert f"- {new}\n" in text  # the alias config composes the current one
    for old, new in RENAMED_TARGETS.items():  # each earlier class name maps to a current one
        assert new in MODEL_SCHEMAS.values() and old not in MODEL_SCHEMAS.values()


@pytest.mark.parametrize("override", ["model=rd", "model=rd4ad"])
def test_the_alias_composes_the_same_config(
    override: str, env: dict[str, str], tmp_path: Path
) -> None:
    proc = run_in_process("kdad.cli.train", [override, "--cfg", "job"], env, tmp_path)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model_name"] == "rd4ad" and cfg["model"]["_target_"] == MODEL_SCHEMAS["rd4ad"]


def test_a_checkpoint_and_results_written_under_the_old_name_are_read_under_the_new(
    env: dict[str, str], tmp_path: Path
) -> None:
    run = tmp_path / "runs" / "new"
    args = [*TINY, "data.synthetic.num_train=4", "+trainer.limit_train_batches=1"]
    args += ["+trainer.limit_val_batches=1", "logger=none", "callbacks=none"]
    run_in_process("kdad.cli.train", [*args, "model=rd", f"hydra.run.dir={run}"], env, tmp_path)
    assert json.loads((run / "metrics.json").read_text())["model"] == "rd4ad"
    # What an older kdad wrote: the old model name and class, in the checkpoint and results.
    old = tmp_path / "runs" / "old"
    shutil.copytree(run, old)
    ckpt = torch.load(old / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["model_name"] = "rd"
    ckpt["hyper_parameters"]["model"]["_target_"] = OLD_TARGET
    write_checkpoint(ckpt, old / "checkpoints" / "last.ckpt")
    metrics = json.loads((old / "metrics.json").read_text())
    (old / "metrics.json").write_text(json.dumps({**metrics, "model": "rd"}))
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["model_name"], config["model"]["_target_"] = "rd", OLD_TARGET
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    # The old checkpoint evaluates as model=rd4ad (and is accepted where model=rd4ad is named).
    out = tmp_path / "eval"
    run_in_process(
        "kdad.cli.eval",
        [*DATA, "model=rd4ad", f"ckpt_path={old}", f"hydra.run.dir={out}", "logger=none"],
        env,
        tmp_path,
    )
    assert json.loads((out / "metrics.json").read_text())["model"] == "rd4ad"
    # Old and new results aggregate as one variant: one rd4ad row of 2 runs, no [key=value].
    runs = tmp_path / "runs"
    run_in_process("kdad.cli.aggregate", [str(runs), "plots=false"], env, tmp_path)
    rows = (runs / "aggregate.csv").read_text().splitlines()
    models = {line.split(",")[0] for line in rows[1:]}
    assert models == {"rd4ad"}, rows
