"""``kdad-train``: compose the config, fit the variant, test it, write the run's results.

kdad-train model=stfpm data=mvtec data.category=bottle logger=wandb
kdad-train -m model=rd,stfpm data.category=stripes,checker
kdad-train experiment=demo
kdad-train ckpt_path=logs/train/runs/<run>     # resume a killed run from its last.ckpt

After fitting, the decision thresholds are fit on the validation split (never the test set,
see :mod:`kdad.thresholds`) and the final checkpoint is saved with them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from kdad import cli
from kdad import thresholds as kdad_thresholds
from kdad.callbacks import SpeedMonitor
from kdad.checkpoint import checkpoint_model_name, read_checkpoint, write_checkpoint
from kdad.download import instantiate_data
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
        channels_last=bool(cfg.get("channels_last", False)),
        compile=bool(cfg.get("compile", False)),
        teacher_cache=cfg.get("teacher_cache", False),
        teacher_cache_max_gb=float(cfg.get("teacher_cache_max_gb", 4.0)),
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
    """The checkpoint to resume from: ``last`` (this run folder's last.ckpt), a run folder
    (its checkpoints/last.ckpt) or a checkpoint file; checked to be a kdad checkpoint of the
    configured variant before Lightning reads it."""
    if not cfg.get("ckpt_path"):
        return None
    given = str(cfg.ckpt_path)
    path = ckpt_dir / "last.ckpt" if given == "last" else Path(given).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        hint = (
            " (pass hydra.run.dir=<the run folder> with ckpt_path=last)" if given == "last" else ""
        )
        raise KDADError(f"ckpt_path={given}: no checkpoint at {path}{hint}")
    name = checkpoint_model_name(read_checkpoint(path))
    if name != str(cfg.model_name):
        raise KDADError(
            f"ckpt_path={given} holds a model={name} checkpoint, but this run trains model={cfg.model_name}; "
            f"pass model={name} to resume it"
        )
    log.info("resuming from %s", path)
    return str(path)


def fit_thresholds(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: DistillationModule,
    datamodule: Any,
    weights: str = "final",
) -> None:
    """Fit the decision thresholds on the validation split (never the test set) and keep them
    on the module, so every checkpoint saved afterwards carries them."""
    settings = kdad_thresholds.settings(cfg.get("thresholds"))
    if datamodule.val_dataset is None:
        module.thresholds = None
        log.warning(
            "no validation split (data.val_fraction=0): no thresholds were fit, so the checkpoint "
            "holds none and kdad-predict reports raw scores only (no normalised score or label) "
            "unless given image_threshold=/pixel_threshold=; train with data.val_fraction>0 to fit them"
        )
        return
    device = trainer.strategy.root_device
    module.to(device)
    module.thresholds = kdad_thresholds.fit_thresholds(
        module.net, datamodule.val_dataloader(), settings, device
    )
    log.info("thresholds (%s weights): %s", weights, kdad_thresholds.describe(module.thresholds))


def _add_thresholds_to_best(
    cfg: DictConfig, trainer: L.Trainer, module: DistillationModule, datamodule: Any, best: str
) -> dict[str, Any] | None:
    """Fit thresholds on the best weights too and store them in best.ckpt (weights untouched);
    return them."""
    checkpoint = read_checkpoint(best)
    final_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    final_thresholds = module.thresholds
    module.load_state_dict(checkpoint["state_dict"])
    fit_thresholds(cfg, trainer, module, datamodule, weights="best")
    if trainer.is_global_zero:
        checkpoint["kdad"]["thresholds"] = module.thresholds
        write_checkpoint(checkpoint, best)
    best_thresholds = module.thresholds
    module.load_state_dict(final_state)
    module.thresholds = final_thresholds
    return best_thresholds


def train(cfg: DictConfig) -> float | None:
    """Fit, test and write metrics.json; return ``cfg.optimized_metric`` for sweepers."""
    out = cli.output_dir()
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True)
    cli.prepare_wandb(cfg)

    datamodule = instantiate_data(cfg.data)
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
    cli.prepare_ddp_relaunch()
    speed = SpeedMonitor()
    # Without validation images, tell Lightning so instead of letting it warn about an empty loader.
    trainer = build_trainer(
        cfg, [speed], **({"limit_val_batches": 0} if datamodule.val_dataset is None else {})
    )
    log_run_config(trainer, cfg, module)

    ckpt_dir = out / "checkpoints"
    kdad_thresholds.settings(cfg.get("thresholds"))  # config mistakes before, not after, training
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=_resume_path(cfg, ckpt_dir), weights_only=True
    )
    # Thresholds first, then the final checkpoint: it must carry them.
    fit_thresholds(cfg, trainer, module, datamodule)
    final = ckpt_dir / "last.ckpt"
    # Final weights + optimizer state (for resuming) + thresholds.
    trainer.save_checkpoint(final, weights_only=False)

    best, tested_thresholds = "", module.thresholds
    if cfg.get("test_ckpt") == "best":
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best and Path(best).is_file():
            tested_thresholds = _add_thresholds_to_best(cfg, trainer, module, datamodule, best)
    if trainer.is_global_zero:
        write_json_atomic(
            out / "thresholds.json", _thresholds_record(tested_thresholds, best or str(final))
        )

    if not cfg.get("test", True):
        return None
    test_ckpt = str(final)
    if cfg.get("test_ckpt") == "best":
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


def _thresholds_record(fitted: dict[str, Any] | None, checkpoint: str) -> dict[str, Any]:
    """thresholds.json: the thresholds of the checkpoint that is tested, flat for readers."""
    record: dict[str, Any] = {"checkpoint": str(checkpoint), "fitted": fitted is not None}
    for level in ("image", "pixel"):
        values = (fitted or {}).get(level) or {}
        for key in ("threshold", "method", "quantile", "center", "scale"):
            record[f"{level}_{key}"] = values.get(key)
    record["num_validation_images"] = (fitted or {}).get("num_images", 0)
    return record


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return cli.guarded(train)(cfg)


def main() -> None:
    _hydra_main()
    cli.exit_if_failed()


if __name__ == "__main__":
    main()
