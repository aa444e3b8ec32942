"""``kdad-eval ckpt_path=PATH``: re-test a checkpoint (kdad.engine.run.evaluate).

    kdad-eval ckpt_path=logs/train/runs/X/checkpoints/last.ckpt data=mvtec data.category=bottle

The variant, its weights and its preprocessing come from the checkpoint (``ckpt_path`` may also
be a kdad-train run folder). Naming a model (``model=rd``) checks that the checkpoint is one.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from kdad.config import CONFIG_DIR
from kdad.engine import hydra as kdad_hydra
from kdad.engine.run import evaluate as task

kdad_hydra.register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> Any:
    return kdad_hydra.guarded(task)(cfg)


def main() -> None:
    _hydra_main()
    kdad_hydra.exit_if_failed()


if __name__ == "__main__":
    main()
