"""What every training or evaluation run does, from a composed config to its run folder.

:func:`train` (``kdad-train``): write the resolved config, build data, module and trainer from
the config, fit (or resume), fit the decision thresholds on the validation split
(:class:`~kdad.lightning.callbacks.ThresholdFitter`, never the test set), save the final
checkpoint with them, test, write ``metrics.json``. :func:`evaluate` (``kdad-eval``): rebuild
a checkpoint's module and test it. Both return ``optimized_metric`` for Hydra sweepers.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from kdad.config import flatten
from kdad.data.datamodule import instantiate_data
from kdad.data.dataset import verify_files
from kdad.engine import hydra as kdad_hydra
from kdad.engine import validate
from kdad.engine import wandb as kdad_wandb
from kdad.errors import Interrupted, KDADError
from kdad.io.atomic import write_json_atomic, write_text_atomic
from kdad.io.checkpoint import checkpoint_model_name, read_checkpoint, write_checkpoint
from kdad.io.results import build_results
from kdad.io.run_folder import METRICS, RunFolder, resolve_checkpoint
from kdad.lightning.callbacks import (
    SaveOnInterrupt,
    SpeedMonitor,
    ThresholdFitter,
    save_checkpoint_atomically,
)
from kdad.lightning.loading import load_module
from kdad.lightning.module import DistillationModule
from kdad.metrics import thresholds as kdad_thresholds

log = logging.getLogger("kdad")


def build_module(cfg: DictConfig) -> DistillationModule:
    # What evaluation and prediction repeat from the checkpoint (kdad-eval, kdad-predict).
    # Hyper-parameters are plain data, choices as strings (the schema's Enums are not
    # allowed by torch.load(weights_only=True)).
    preprocess = {
        "image_size": cfg.data.image_size,
        "crop_size": cfg.data.get("crop_size"),
        "mask_resize": str(cfg.data.get("mask_resize", "nearest")),
    }
    return DistillationModule(
        model=OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True) if cfg.optimizer else None,
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
        model_name=str(cfg.model_name),
        preprocess=preprocess,
        channels_last=bool(cfg.channels_last),
        compile=bool(cfg.compile),
        teacher_cache=cfg.teacher_cache,
        teacher_cache_max_gb=float(cfg.teacher_cache_max_gb),
    )


def build_trainer(
    cfg: DictConfig, extra_callbacks: list[L.Callback], **overrides: Any
) -> L.Trainer:
    callbacks = kdad_hydra.instantiate_group(cfg.get("callbacks"), "callbacks") + extra_callbacks
    # kdad uploads the final checkpoint itself (logger.wandb.log_model): Lightning's own upload off.
    loggers = kdad_hydra.instantiate_group(
        cfg.get("logger"), "logger", overrides={"wandb": {"log_model": False}}
    )
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides
    )


def log_run_config(trainer: L.Trainer, cfg: DictConfig, module: DistillationModule) -> None:
    """Flattened config, parameter counts and the run's overrides, once, to every logger, so
    runs can be filtered and grouped by any key."""
    params = {
        "params_trainable": module.net.num_parameters(trainable=True),
        "params_total": module.net.num_parameters(),
    }
    log.info(
        "%s: %d trainable / %d total parameters",
        module.hparams.model_name,
        params["params_trainable"],
        params["params_total"],
    )
    config = {
        **flatten(cfg),
        **params,
        "overrides": kdad_wandb.overrides(),
        "sweep": kdad_wandb.sweep_id(),
    }
    for logger in trainer.loggers:
        if logger in kdad_wandb.wandb_loggers(trainer.loggers):
            continue
        logger.log_hyperparams(config)
    kdad_wandb.start(trainer.loggers, config)


def write_run_results(
    seed: int, trainer: L.Trainer, module: DistillationModule, datamodule: Any, speed: SpeedMonitor
) -> dict[str, Any]:
    """metrics.json in the run folder (and its timings to W&B), from rank 0."""
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
        write_json_atomic(RunFolder(kdad_hydra.output_dir()).metrics, results)
        kdad_wandb.log_results(trainer.loggers, results)
    log.info(
        "results: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}
    )
    log.info("run folder: %s", kdad_hydra.output_dir())
    return results


def _optimized(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in results:
        raise KDADError(f"optimized_metric={metric}: not a {METRICS} key ({', '.join(results)})")
    return float(results[metric])


def resume_path(cfg: DictConfig, out: RunFolder) -> str | None:
    """The checkpoint to resume from (``out``: this run's folder): ``last`` (out's last.ckpt),
    a run folder (its checkpoints/last.ckpt) or a checkpoint file
    (:func:`~kdad.io.run_folder.resolve_checkpoint`); checked to be a kdad checkpoint of the
    configured variant before Lightning reads it."""
    if not cfg.get("ckpt_path"):
        return None
    given = str(cfg.ckpt_path)
    path = resolve_checkpoint(given, resume=out)
    checkpoint = read_checkpoint(path, allow_unsigned=bool(cfg.allow_unsigned))
    name = checkpoint_model_name(checkpoint)
    if name != str(cfg.model_name):
        raise KDADError(
            f"ckpt_path={given} holds a model={name} checkpoint, but this run trains model={cfg.model_name}; "
            f"pass model={name} to resume it"
        )
    changed = _model_changes(checkpoint, cfg)
    if changed:
        trained = [f"{key}={_typed(old)}" for key, old, _ in changed]
        now = ", ".join(f"{key}={_typed(new)}" for key, _, new in changed)
        raise KDADError(
            f"ckpt_path={given} was trained with {', '.join(trained)}, but this run has {now}: "
            f"resuming needs the checkpoint's model (pass {' '.join(trained)}), or train a new "
            "run (another hydra.run.dir, without ckpt_path)"
        )
    log.info("resuming from %s", path)
    return str(path)


# Model keys that only choose the initial weights, which resuming replaces.
RESUME_FREE_KEYS = ("model.pretrained", "model.weights_path")


def _typed(value: Any) -> str:
    """``value`` as typed on the command line."""
    if isinstance(value, list):
        return f"[{','.join(_typed(v) for v in value)}]"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _model_changes(checkpoint: dict[str, Any], cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, trained value, this run's value) for each model key the run changes from the
    checkpoint's (keys only one of them has are skipped: another kdad version)."""
    trained = flatten((checkpoint.get("hyper_parameters") or {}).get("model") or {}, "model")
    given = flatten(cfg.get("model") or {}, "model")
    return [
        (key, trained[key], given[key])
        for key in given
        if key in trained and key not in RESUME_FREE_KEYS and trained[key] != given[key]
    ]


def _thresholds_for_best(
    trainer: L.Trainer, module: DistillationModule, fitter: ThresholdFitter, best: str
) -> dict[str, Any] | None:
    """Fit thresholds on the best weights too and store them in best.ckpt (weights untouched);
    return them. The module keeps its final weights and thresholds."""
    checkpoint = read_checkpoint(best)
    final_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    final_thresholds = module.thresholds
    module.load_state_dict(checkpoint["state_dict"])
    fitter.fit(trainer, module, weights="best")
    if trainer.is_global_zero:
        checkpoint["kdad"]["thresholds"] = module.thresholds
        write_checkpoint(checkpoint, best)
    best_thresholds = module.thresholds
    module.load_state_dict(final_state)
    module.thresholds = final_thresholds
    return best_thresholds


def _previous(cfg: DictConfig, out: RunFolder) -> tuple[str, Any]:
    """What ``resume=auto`` finds in the run folder: ("finished", metrics), ("unfinished",
    its last.ckpt) or ("new", None). A re-run multirun command continues where it stopped."""
    if cfg.resume == "never" or cfg.get("ckpt_path"):
        return "new", None
    metrics = out.metrics
    if metrics.is_file():
        try:
            return "finished", json.loads(metrics.read_text())
        except (OSError, ValueError):
            log.warning("%s is unreadable: the run is trained again", metrics)
    return ("unfinished", out.last) if out.last.is_file() else ("new", None)


def train(cfg: DictConfig) -> float | None:
    """Fit, test and write metrics.json; return ``cfg.optimized_metric`` for sweepers."""
    validate.check_train(cfg)  # config mistakes before any work
    out = RunFolder(kdad_hydra.output_dir())
    out.lock()  # one run per folder
    state, found = _previous(cfg, out)
    if state == "finished":
        log.info(
            "%s already holds a finished run (%s): skipped (resume=never, or delete %s, to "
            "train it again)",
            out.path,
            METRICS,
            METRICS,
        )
        return _optimized(cfg, found)
    if state == "unfinished":
        log.info("resume=auto: %s holds an unfinished run; resuming from %s", out.path, found)
        with open_dict(cfg):
            cfg.ckpt_path = str(found)
    resume = resume_path(cfg, out)  # a checkpoint that does not fit, before any work
    write_text_atomic(out.config, OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True)
    kdad_wandb.prepare(cfg, out.path)
    fitter = ThresholdFitter(kdad_thresholds.settings(cfg.get("thresholds")))

    datamodule = validate.built("data", lambda: instantiate_data(cfg.data))
    datamodule.setup("fit")
    # Every file the run will read, before fitting: a corrupt test image must not cost a run.
    verify_files([datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset])
    if datamodule.val_dataset is None and cfg.test_ckpt == "best":
        raise KDADError(
            "test_ckpt=best needs validation images: set data.val_fraction > 0 (or test_ckpt=last)"
        )
    if (
        datamodule.val_dataset is None
        and cfg.get("callbacks")
        and cfg.callbacks.get("model_checkpoint")
    ):
        cfg.callbacks.model_checkpoint.monitor = None  # nothing to monitor without validation

    out.clear_marks()  # a FAILED/INTERRUPTED of an earlier attempt is history now
    module = validate.built(f"model={cfg.model_name}", lambda: build_module(cfg))
    validate.check_input_size(
        module.net,
        int(cfg.data.get("crop_size") or cfg.data.image_size),
        f"model={cfg.model_name} (model.backbone={cfg.model.get('backbone')})",
    )
    kdad_hydra.prepare_ddp_relaunch()
    speed = SpeedMonitor()
    saver = SaveOnInterrupt(out.last)
    # Without validation images, tell Lightning so instead of letting it warn about an empty loader.
    trainer = validate.built(
        "trainer",
        lambda: build_trainer(
            cfg,
            [speed, fitter, saver],
            **({"limit_val_batches": 0} if datamodule.val_dataset is None else {}),
        ),
    )
    log_run_config(trainer, cfg, module)

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    last = out.last.relative_to(out.path)
    stopped = None  # when and with what the run stopped early
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        kept = f"{last} saved" if saver.saved else "no checkpoint could be saved"
        stopped = f"in epoch {trainer.current_epoch + 1}; {kept}"
    else:
        if saver.deferred is not None:  # the scheduler's signal came as fitting ended
            stopped = f"after training; {last} saved"
    if stopped is not None and saver.deferred is None:
        raise Interrupted(
            f"stopped by SIGTERM {stopped}: run the same command again to resume (resume=auto)"
        )
    if stopped is not None:  # the scheduler's requeue signal: its handler takes over
        raise Interrupted(
            f"stopped by the job scheduler's {signal.Signals(saver.deferred[1]).name} {stopped}: "
            "the requeued job (or the same command again) resumes it (resume=auto)",
            hand_over=saver.hand_over,
        )
    # The fitter has set the thresholds (on_fit_end): the final checkpoint carries them, with
    # the optimizer state (for resuming).
    final = out.last
    save_checkpoint_atomically(trainer, final, weights_only=False)
    if trainer.is_global_zero and kdad_wandb.log_model_requested(cfg):
        kdad_wandb.log_model(trainer.loggers, final, out.config, flatten(cfg))

    best, tested_thresholds = "", module.thresholds
    if cfg.test_ckpt == "best":
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best and Path(best).is_file():
            tested_thresholds = _thresholds_for_best(trainer, module, fitter, best)
    if trainer.is_global_zero:
        write_json_atomic(
            out.thresholds,
            kdad_thresholds.record(tested_thresholds, best or str(final)),
        )

    if not cfg.test:
        return None
    test_ckpt = str(final)
    if cfg.test_ckpt == "best":
        if not best:
            raise KDADError(
                "test_ckpt=best but no best checkpoint was saved (callbacks.model_checkpoint.monitor is unset)"
            )
        test_ckpt = best
    trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True)
    return _optimized(cfg, write_run_results(cfg.seed, trainer, module, datamodule, speed))


PREPROCESS_KEYS = ("image_size", "crop_size", "mask_resize")


def checkpoint_preprocessing(cfg: DictConfig, trained: dict[str, Any]) -> None:
    """Test as the model was trained: ``data.image_size``, ``data.crop_size`` and
    ``data.mask_resize`` from the checkpoint, unless given on the command line (then the
    given value is used, and the log says it differs from training)."""
    typed = {o.split("=", 1)[0].lstrip("+~") for o in kdad_wandb.command_line()}
    for key in PREPROCESS_KEYS:
        if key not in trained:
            continue
        if f"data.{key}" in typed:
            if cfg.data.get(key) != trained[key]:
                log.warning(
                    "data.%s=%s as given overrides the checkpoint's %s=%s (the model was trained with %s)",
                    key,
                    cfg.data.get(key),
                    key,
                    trained[key],
                    trained[key],
                )
            continue
        if cfg.data.get(key) != trained[key]:
            log.info("data.%s=%s from the checkpoint (it was trained so)", key, trained[key])
        with open_dict(cfg):
            cfg.data[key] = trained[key]


def evaluate(cfg: DictConfig) -> float | None:
    """Re-test a checkpoint (``ckpt_path``) and write the run's results."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise KDADError("kdad-eval needs ckpt_path=PATH (a checkpoint written by kdad-train)")
    validate.resolve(cfg)
    validate.check_numbers(cfg)
    validate.check_targets(cfg)
    out = RunFolder(kdad_hydra.output_dir())
    out.lock()  # one run per folder
    module = load_module(
        cfg.ckpt_path, expected_model=cfg.get("model_name"), allow_unsigned=bool(cfg.allow_unsigned)
    )
    trained = dict(module.hparams.get("preprocess") or {})
    checkpoint_preprocessing(cfg, trained)
    size = int(cfg.data.get("crop_size") or cfg.data.image_size)
    if size != (trained.get("crop_size") or trained.get("image_size")):  # one given here
        validate.check_input_size(
            module.net,
            size,
            f"the checkpoint's model={module.hparams.model_name} "
            f"(model.backbone={(module.hparams.get('model') or {}).get('backbone')})",
            train=False,
        )
    write_text_atomic(out.config, OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True)
    kdad_wandb.prepare(cfg, out.path)
    datamodule = validate.built("data", lambda: instantiate_data(cfg.data))
    datamodule.setup("test")
    verify_files([datamodule.test_dataset])
    speed = SpeedMonitor()
    kdad_hydra.prepare_ddp_relaunch()
    trainer = validate.built("trainer", lambda: build_trainer(cfg, [speed]))
    log_run_config(trainer, cfg, module)
    trainer.test(module, datamodule=datamodule)
    return _optimized(cfg, write_run_results(cfg.seed, trainer, module, datamodule, speed))
