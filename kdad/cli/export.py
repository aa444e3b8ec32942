"""``kdad-export ckpt_path=PATH``: ONNX or TorchScript for deployment (kdad.inference.export).

kdad-export ckpt_path=logs/train/runs/<run> format=onnx
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from kdad.config import CONFIG_DIR
from kdad.engine import hydra as kdad_hydra
from kdad.inference.export import export as task

kdad_hydra.register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def _hydra_main(cfg: DictConfig) -> Any:
    return kdad_hydra.guarded(task)(cfg)


def main() -> None:
    _hydra_main()
    kdad_hydra.exit_if_failed()


if __name__ == "__main__":
    main()
