"""``data.pin_memory`` is a key of every data config and reaches every DataLoader."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import DATA
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kdad.config import CONFIG_DIR
from kdad.data import AnomalyDataModule
from kdad.errors import KDADError


def _data(overrides: list[str]) -> AnomalyDataModule:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return instantiate(cfg.data)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml")))
def test_every_data_config_has_pin_memory(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", "data.pin_memory=true"])
    assert cfg.data.pin_memory is True


def test_pin_memory_reaches_the_loaders(tmp_path):
    dm = _data([*DATA, f"data.root={tmp_path}", "data.pin_memory=true"])
    dm.prepare_data()
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert [loader.pin_memory for loader in loaders] == [True, True, True]

    dm = _data([*DATA, f"data.root={tmp_path}", "data.pin_memory=false"])
    assert [dm.train_dataloader().pin_memory, dm.test_dataloader().pin_memory] == [False, False]


def test_pin_memory_auto_follows_the_device(tmp_path, monkeypatch):
    import torch

    dm = _data([*DATA, f"data.root={tmp_path}"])  # the shipped default: auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dm.pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dm.pin_memory is True

    class Trainer:  # attached to a CPU trainer on a CUDA machine: nothing to pin for
        class strategy:
            root_device = torch.device("cpu")

    dm.trainer = Trainer()
    assert dm.pin_memory is False


def test_pin_memory_other_values_are_an_error():
    with pytest.raises(KDADError, match=r"data\.pin_memory='yes'"):
        AnomalyDataModule("synthetic", "/nonexistent", "stripes", pin_memory="yes")
