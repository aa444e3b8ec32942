"""kdad-train in the test process (no subprocess start-up), and checkpoint comparisons."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from clirun import TINY
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from kdad.config import CONFIG_DIR
from kdad.engine import run as kdad_train

BASE = [
    *[arg for arg in TINY if not arg.startswith("trainer.max_epochs")],
    "data.batch_size=4",  # 4 batches per epoch: the shuffling order changes the result
    "test=false",
    "logger=none",
]


def train(args: list[str], run_dir: Path) -> None:
    """kdad-train's ``train`` in this process, as Hydra runs it with ``hydra.run.dir=run_dir``.

    In-process rather than as a subprocess: five runs would otherwise spend most of their time
    importing Lightning (test_cli runs the real command line).
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=[*BASE, *args], return_hydra_config=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        kdad_train.train(cfg)
    finally:
        HydraConfig.instance().cfg = None


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load(a)["state_dict"], load(b)["state_dict"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
