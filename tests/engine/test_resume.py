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

import shutil
from pathlib import Path

import pytest
from inprocess import assert_same_weights, load, train
from omegaconf import OmegaConf

from kdad.engine import run as kdad_train
from kdad.errors import KDADError
from kdad.io.run_folder import RunFolder

pytestmark = [
    # Lightning's notes about the frozen teacher and the changed checkpoint cadence, expected here.
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


@pytest.fixture(scope="module")
def uninterrupted(inprocess_data_cache: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
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
    cfg = OmegaConf.create({"ckpt_path": "last", "model_name": "rd4ad", "allow_unsigned": False})
    with pytest.raises(KDADError, match=r"ckpt_path=last: no checkpoint at .*hydra.run.dir"):
        kdad_train.resume_path(cfg, RunFolder(tmp_path))
    cfg = OmegaConf.create(
        {"ckpt_path": str(uninterrupted), "model_name": "stfpm", "allow_unsigned": False}
    )
    with pytest.raises(KDADError, match=r"holds a model=rd4ad checkpoint.*pass model=rd4ad"):
        kdad_train.resume_path(cfg, RunFolder(tmp_path))
    cfg = OmegaConf.create(
        {"ckpt_path": str(uninterrupted), "model_name": "rd4ad", "allow_unsigned": False}
    )
    assert kdad_train.resume_path(cfg, RunFolder(tmp_path)) == str(
        uninterrupted / "checkpoints" / "last.ckpt"
    )
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    cfg = OmegaConf.create(
        {"ckpt_path": str(tmp_path / "junk.ckpt"), "model_name": "rd4ad", "allow_unsigned": False}
    )
    with pytest.raises(KDADError, match="not a readable kdad checkpoint"):
        kdad_train.resume_path(cfg, RunFolder(tmp_path))
