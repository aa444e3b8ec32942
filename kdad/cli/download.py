"""``kdad-download data=mvtec data.root=PATH``: fetch and verify a dataset (kdad.data.download).

kdad-download data=mvtec data.root=~/data/mvtec
kdad-download data=btad data.root=~/data/btad archive=/downloads/BTech_Dataset_transformed.zip
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from kdad.config import CONFIG_DIR
from kdad.data.download import download as task
from kdad.engine import hydra as kdad_hydra

kdad_hydra.register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="download")
def _hydra_main(cfg: DictConfig) -> Any:
    return kdad_hydra.guarded(task)(cfg)


def main() -> None:
    _hydra_main()
    kdad_hydra.exit_if_failed()


if __name__ == "__main__":
    main()
