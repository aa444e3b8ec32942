"""Shared test set-up: never touch the network or a W&B account."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for the subprocesses: a shared synthetic-data cache, no network, no account."""
    cache = tmp_path_factory.mktemp("kdad_cache")
    return {
        **os.environ,
        "KDAD_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "PYTHONUNBUFFERED": "1",
    }
