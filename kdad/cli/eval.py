"""``kdad-eval ckpt_path=PATH``: re-test a checkpoint and write the run's results.

    kdad-eval ckpt_path=logs/train/runs/X/checkpoints/last.ckpt data=mvtec data.category=bottle

The variant, its weights and its preprocessing come from the checkpoint (``ckpt_path`` may also
be a kdad-train run folder: its checkpoints/last.ckpt). Naming a model (``model=rd``) checks
that the checkpoint is one.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from kdad import cli
from kdad.callbacks import SpeedMonitor
from kdad.checkpoint import load_module
from kdad.download import instantiate_data
from kdad.errors import KDADError
from kdad.results import write_text_atomic
from kdad.train import build_trainer, write_run_results

log = logging.getLogger("kdad")
cli.register_resolvers()


def evaluate(cfg: DictConfig) -> float | None:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise KDADError("kdad-eval needs ckpt_path=PATH (a checkpoint written by kdad-train)")
    write_text_atomic(cli.output_dir() / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True)
    cli.prepare_wandb(cfg)
    module = load_module(cfg.ckpt_path, expected_model=cfg.get("model_name"))
    trained = module.hparams.get("preprocess") or {}
    if trained.get("image_size") not in (None, cfg.data.image_size):
        log.warning(
            "checkpoint was trained at image_size=%s, testing at data.image_size=%s",
            trained["image_size"],
            cfg.data.image_size,
        )
    datamodule = instantiate_data(cfg.data)
    speed = SpeedMonitor()
    cli.prepare_ddp_relaunch()
    trainer = build_trainer(cfg, [speed])
    trainer.test(module, datamodule=datamodule)
    results = write_run_results(cfg.seed, trainer, module, datamodule, speed)
    metric = cfg.get("optimized_metric")
    return float(results[metric]) if metric else None


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> float | None:
    return cli.guarded(evaluate)(cfg)


def main() -> None:
    _hydra_main()
    cli.exit_if_failed()


if __name__ == "__main__":
    main()
