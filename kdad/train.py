"""``kdad-train``: compose the config, fit the variant, test it, write the run's results.

kdad-train model=stfpm data=mvtec data.category=bottle logger=wandb
kdad-train -m model=rd,stfpm data.category=stripes,checker
kdad-train experiment=demo
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from kdad import cli
from kdad.callbacks import SpeedMonitor
from kdad.errors import KDADError
from kdad.lightning_module import DistillationModule
from kdad.results import build_results, write_json_atomic, write_text_atomic

log = logging.getLogger("kdad")
cli.register_resolvers()


def build_module(cfg: DictConfig, datamodule: Any) -> DistillationModule:
    preprocess = {"image_size": cfg.data.image_size, "crop_size": cfg.data.get("crop_size")}
    return DistillationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True)
        if cfg.get("scheduler")
        else None,
        model_name=str(cfg.model_name),
        preprocess=preprocess,
    )


def build_trainer(
    cfg: DictConfig, extra_callbacks: list[L.Callback], **overrides: Any
) -> L.Trainer:
    callbacks = cli.instantiate_group(cfg.get("callbacks"), "callbacks") + extra_callbacks
    loggers = cli.instantiate_group(cfg.get("logger"), "logger")
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides
    )


def log_run_config(trainer: L.Trainer, cfg: DictConfig, module: DistillationModule) -> None:
    """Flattened config plus parameter counts, so runs can be filtered and grouped by any key."""
    params = {
        "params_trainable": module.net.num_parameters(trainable=True),
        "params_total": module.net.num_parameters(),
    }
    log.info(
        "%s: %d trainable / %d total parameters",
        cfg.model_name,
        params["params_trainable"],
        params["params_total"],
    )
    for logger in trainer.loggers:
        logger.log_hyperparams({**cli.flatten(cfg), **params})


def write_run_results(
    seed: int, trainer: L.Trainer, module: DistillationModule, datamodule: Any, speed: SpeedMonitor
) -> dict[str, Any]:
    """metrics.json in the run folder (and the same numbers to the loggers), from rank 0."""
    results = build_results(
        model=str(module.hparams.model_name),
        data=datamodule.dataset_name,
        category=datamodule.category_name,
        seed=int(seed),
        metrics=module.test_results,
        train_stats=module.train_stats,
        test_images_per_second=speed.test_images_per_second,
        params_trainable=module.net.num_parameters(trainable=True),
        params_total=module.net.num_parameters(),
    )
    if trainer.is_global_zero:
        write_json_atomic(cli.output_dir() / "metrics.json", results)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"summary/{k}": v for k, v in results.items() if isinstance(v, int | float)}
            )
    log.info(
        "results: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
    )
    log.info("run folder: %s", cli.output_dir())
    return results


def _resume_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    if not cfg.get("ckpt_path"):
        return None
    path = ckpt_dir / "last.ckpt" if str(cfg.ckpt_path) == "last" else Path(str(cfg.ckpt_path))
    if not path.is_file():
        raise KDADError(f"ckpt_path={cfg.ckpt_path}: no checkpoint at {path}")
    return str(path)


def train(cfg: DictConfig) -> float | None:
    """Fit, test and write metrics.json; return ``cfg.optimized_metric`` for sweepers."""
    out = cli.output_dir()
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True)
    cli.prepare_wandb(cfg)

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    if datamodule.val_dataset is None and cfg.get("test_ckpt") == "best":
        raise KDADError(
            "test_ckpt=best needs validation images: set data.val_fraction > 0 (or test_ckpt=last)"
        )
    if (
        datamodule.val_dataset is None
        and cfg.get("callbacks")
        and cfg.callbacks.get("model_checkpoint")
    ):
        cfg.callbacks.model_checkpoint.monitor = None  # nothing to monitor without validation

    module = build_module(cfg, datamodule)
    speed = SpeedMonitor()
    # Without validation images, tell Lightning so instead of letting it warn about an empty loader.
    trainer = build_trainer(
        cfg, [speed], **({"limit_val_batches": 0} if datamodule.val_dataset is None else {})
    )
    log_run_config(trainer, cfg, module)

    ckpt_dir = out / "checkpoints"
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, ckpt_dir))
    final = ckpt_dir / "last.ckpt"
    trainer.save_checkpoint(
        final, weights_only=False
    )  # final weights + optimizer state, for resuming

    if not cfg.get("test", True):
        return None
    test_ckpt = str(final)
    if cfg.get("test_ckpt") == "best":
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            raise KDADError(
                "test_ckpt=best but no best checkpoint was saved (callbacks.model_checkpoint.monitor is unset)"
            )
        test_ckpt = best
    trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True)
    results = write_run_results(cfg.seed, trainer, module, datamodule, speed)
    metric = cfg.get("optimized_metric")
    if metric:
        if metric not in results:
            raise KDADError(
                f"optimized_metric={metric}: not a metrics.json key ({', '.join(results)})"
            )
        return float(results[metric])
    return None


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return cli.guarded(train)(cfg)


def main() -> None:
    _hydra_main()
    cli.exit_if_failed()


if __name__ == "__main__":
    main()
