"""Resuming a killed kdad-train run reaches the same final weights as an uninterrupted run.

Run A trains 3 epochs without interruption and keeps the checkpoint ModelCheckpoint writes
after every epoch. A run killed during its third epoch leaves exactly A's epoch-2 checkpoint
as its ``last.ckpt``: a copy of it in a run folder is resumed with ``ckpt_path=<run folder>``
to 3 epochs. Another run stops normally after 2 epochs (kdad-train's final save, after the
thresholds are fit) and is continued in place with ``ckpt_path=last``. Both must end with A's
state dict, bit for bit (CPU, same seed). Several batches per epoch make the shuffling order
(the random state a resume must restore) matter: without restoring it these tests fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from clirun import TINY
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from kdad import cli
from kdad import train as kdad_train
from kdad.errors import KDADError

pytestmark = [
    # Lightning's notes about the frozen teacher and the changed checkpoint cadence, expected here.
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]

RESUME = [
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
    with initialize_config_dir(config_dir=cli.CONFIG_DIR, version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=[*RESUME, *args], return_hydra_config=True)
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


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private synthetic-data cache for this module's runs."""
    previous = os.environ.get("KDAD_CACHE_DIR")
    os.environ["KDAD_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdad_cache"))
    yield
    if previous is None:
        del os.environ["KDAD_CACHE_DIR"]
    else:
        os.environ["KDAD_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def uninterrupted(cache: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(
        [
            "trainer.max_epochs=3",
            "callbacks.model_checkpoint.every_n_epochs=1",
            "callbacks.model_checkpoint.save_top_k=-1",  # keep every epoch's checkpoint
            "callbacks.model_checkpoint.filename='epoch{epoch}'",
        ],
        out,
    )
    return out


def test_killed_run_resumes_from_its_folder_to_the_same_weights(
    uninterrupted: Path, tmp_path: Path
) -> None:
    # What a run killed during epoch 3 leaves behind: the checkpoint written after epoch 2.
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(uninterrupted / "checkpoints" / "epoch1.ckpt", killed / "checkpoints" / "last.ckpt")
    resumed = tmp_path / "resumed"
    train(["trainer.max_epochs=3", f"ckpt_path={killed}"], resumed)
    reference, final = (
        (uninterrupted / "checkpoints" / "last.ckpt"),
        (resumed / "checkpoints" / "last.ckpt"),
    )
    assert_same_weights(reference, final)
    a, b = load(reference), load(final)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (3, 12)
    assert b["kdad"]["thresholds"] == a["kdad"]["thresholds"]
    assert (
        b["optimizer_states"][0]["state"][0]["step"] == a["optimizer_states"][0]["state"][0]["step"]
    )


def test_finished_run_continues_with_ckpt_path_last_to_the_same_weights(
    uninterrupted: Path, tmp_path: Path
) -> None:
    # kdad-train's final checkpoint is saved after fitting thresholds (more random draws):
    # the continued run must still start from the random state at the end of epoch 2.
    run = tmp_path / "run"
    train(["trainer.max_epochs=2"], run)
    train(["trainer.max_epochs=3", "ckpt_path=last"], run)
    assert_same_weights(
        uninterrupted / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt"
    )


def test_resume_path_errors_are_one_line(uninterrupted: Path, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"ckpt_path": "last", "model_name": "rd"})
    with pytest.raises(KDADError, match=r"ckpt_path=last: no checkpoint at .*hydra.run.dir"):
        kdad_train._resume_path(cfg, tmp_path / "checkpoints")
    cfg = OmegaConf.create({"ckpt_path": str(uninterrupted), "model_name": "stfpm"})
    with pytest.raises(KDADError, match=r"holds a model=rd checkpoint.*pass model=rd"):
        kdad_train._resume_path(cfg, tmp_path)
    cfg = OmegaConf.create({"ckpt_path": str(uninterrupted), "model_name": "rd"})
    assert kdad_train._resume_path(cfg, tmp_path) == str(
        uninterrupted / "checkpoints" / "last.ckpt"
    )
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    cfg = OmegaConf.create({"ckpt_path": str(tmp_path / "junk.ckpt"), "model_name": "rd"})
    with pytest.raises(KDADError, match="not a readable kdad checkpoint"):
        kdad_train._resume_path(cfg, tmp_path)
