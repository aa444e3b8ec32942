"""``kdad-train``: fit a variant, fit its thresholds, test it (kdad.engine.run.train).

kdad-train model=stfpm data=mvtec data.category=bottle logger=wandb
kdad-train -m model=rd,stfpm data.category=stripes,checker
kdad-train experiment=demo
kdad-train ckpt_path=last hydra.run.dir=logs/train/runs/<run>   # resume a killed run
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from kdad.config import CONFIG_DIR
from kdad.engine import hydra as kdad_hydra
from kdad.engine.run import train as task

kdad_hydra.register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    return kdad_hydra.guarded(task)(cfg)


def main() -> None:
    _hydra_main()
    kdad_hydra.exit_if_failed()


if __name__ == "__main__":
    main()
