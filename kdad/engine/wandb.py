"""Weights & Biases for the way kdad is used: sweeps and ablations compared in dashboards.

- **Names and groups.** A run is named by what distinguishes it from its sweep siblings: its
  Hydra overrides, without paths and settings that do not change the science (see
  :data:`NOISE`), e.g. ``hkt alignment=cross cbam=false seed=1``. Runs are grouped by
  ``task_name`` (the experiment, e.g. ``hkt_ablation``: every ``conf/experiment`` file sets it)
  with ``job_type`` the command (``train``/``eval``), and every run carries its overrides as
  ``config.overrides`` and as tags, and its sweep folder as ``config.sweep``, so a dashboard
  can group or filter by any swept key and by sweep.
- **One copy of the config**, flattened (``model.backbone``, ``data.category``, ...), plus the
  parameter counts; Lightning's nested copy is switched off (``save_hyperparameters(logger=False)``).
- **Summaries are plain numbers**, the columns a runs table sorts and plots: each metrics.json
  value under one name (``test/<metric>``, the timings under their metrics.json names) and
  each loss's last value; the best of training has its own name (:data:`BEST_OF`:
  ``val/loss_min``, ``train/loss_epoch_min``), set when the run finishes.
- **Exit status**: a job that fails finishes its W&B run with its exit code (2 user error,
  1 crash, 143 SIGTERM: :func:`kdad.engine.hydra.guarded`), which W&B shows as failed.
- **Quiet**: W&B's own console output (header, history sparklines, sync hints) is off unless
  ``logger.wandb.quiet=false``; kdad logs one line saying where the run is (:func:`wandb_logger`).
- **Resuming** keeps the W&B run: its id is kept in the run folder (``wandb_id``) and a resumed
  run (``ckpt_path=...``) continues it. Under a W&B sweep agent the agent's run id is used.
- **Checkpoints as artifacts** with ``logger.wandb.log_model=true`` (off by default): the
  final checkpoint and the resolved config, once, after training.
- Without an account runs are written offline under the run folder (``wandb sync`` later).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import string
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdad.io.atomic import write_text_atomic
from kdad.io.results import METRIC_KEYS
from kdad.io.run_folder import RunFolder, SweepFolder

log = logging.getLogger("kdad")

# Override keys (prefixes) that say where or how a run ran, not what it is.
NOISE = (
    "hydra.",
    "paths.",
    "logger",
    "launcher",
    "callbacks",
    "experiment",
    "hparams_search",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "data.root",
    "data.num_workers",
    "data.download",
    "ckpt_path",
    "tags",
    "task_name",
)
MAX_TAG = 64  # W&B's limit on a tag's length
# The best of training, kept beside the last value: logged key -> (summary kind, own name).
BEST_OF = {
    "train/loss_epoch": ("min", "train/loss_epoch_min"),
    "val/loss": ("min", "val/loss_min"),
}


def _hydra() -> Any | None:
    try:
        return HydraConfig.get()
    except ValueError:
        return None


def swept_keys() -> frozenset[str] | None:
    """The keys a multirun sweeps (several values on its command line or in the experiment's
    ``hydra.sweeper.params``), read from the sweep's ``multirun.yaml`` (any launcher writes
    it before the jobs start); None outside a multirun or when it cannot be read."""
    hydra_cfg = _hydra()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return _swept_keys_of(str(hydra_cfg.sweep.dir))


@functools.cache
def _swept_keys_of(sweep_dir: str) -> frozenset[str] | None:
    """(Read once per sweep: the run's name, tags and logged overrides all need it.)"""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sweep = OmegaConf.load(SweepFolder(Path(sweep_dir)).multirun)
        items = [str(o) for o in sweep.hydra.overrides.task]
        params = sweep.hydra.sweeper.get("params") or {}
        items += [f"{key}={value}" for key, value in params.items()]
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:  # an unreadable file only costs the short names
        return None
    return frozenset(o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override())


def command_line() -> list[str]:
    """This job's task overrides as Hydra recorded them (empty outside Hydra)."""
    hydra_cfg = _hydra()
    return [str(o) for o in hydra_cfg.overrides.task] if hydra_cfg is not None else []


def overrides() -> list[str]:
    """What tells this run apart: in a multirun, its values of the swept keys; otherwise
    its command-line overrides. Both without :data:`NOISE` and values that are paths."""
    given = command_line()
    swept = swept_keys()
    kept = []
    for item in given:
        key, _, value = str(item).lstrip("+~").partition("=")
        if any(key == n.rstrip(".") or key.startswith(n) for n in NOISE) or "/" in value:
            continue
        if swept is not None and key not in swept:
            continue
        value = {"True": "true", "False": "false", "None": "null"}.get(value, value)  # as typed
        kept.append(f"{key}={value}")
    return kept


def run_name(model_name: str, category: str, seed: Any) -> str:
    """``<model> <override> ...``: the distinguishing overrides (``model.`` dropped from keys);
    without any, ``<model>-<category>-seed<seed>``."""
    parts = []
    for item in overrides():
        key, _, value = item.partition("=")
        if key == "model":
            continue  # the name starts with it
        parts.append(f"{key.removeprefix('model.')}={value}")
    if not parts:
        return f"{model_name}-{category}-seed{seed}"
    return " ".join([str(model_name), *parts])


def run_group(task_name: str = "") -> str:
    """The experiment's name: every run of ``experiment=hkt_ablation`` (any sweep) shares it."""
    return str(task_name) or "kdad"


def sweep_id() -> str | None:
    """The multirun's folder (``config.sweep``), so one sweep can be picked out of its group."""
    hydra_cfg = _hydra()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        return str(hydra_cfg.sweep.dir)
    return None


def tags(*values: Any) -> ListConfig:
    """Distinct non-empty tags from values and lists of values, plus this job's overrides
    (a ListConfig: a plain list cannot be resolved in place, as ``--cfg job --resolve`` does)."""
    found: list[str] = []
    for value in [*values, overrides()]:
        items = value if isinstance(value, list | tuple | ListConfig) else [value]
        for item in items:
            text = str(item)[:MAX_TAG]
            if item not in (None, "") and text not in found:
                found.append(text)
    return ListConfig(found)


def run_id(output_dir: str | None, ckpt_path: Any = None) -> str | None:
    """The W&B run id of this run folder: the one kept in ``wandb_id`` (this folder's, or the
    folder of the checkpoint being resumed), else a new one, kept there for a later resume.
    Under a W&B sweep agent, the agent's (W&B ignores any other id there). None before there
    is a run folder (the config shown by ``--cfg job``)."""
    agent_id = os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None
    if not output_dir:
        return agent_id
    folder = RunFolder(output_dir)
    new = agent_id
    if not new:
        candidates = [folder.wandb_id]
        if ckpt_path not in (None, "", "last"):
            candidates.append(RunFolder.of(ckpt_path).wandb_id)
        for path in candidates:
            if path.is_file() and re.fullmatch(r"[\w-]{1,64}", path.read_text().strip()):
                return path.read_text().strip()
        new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:  # DDP: rank 0 logs
        write_text_atomic(folder.wandb_id, new + "\n")
    return new


def offline_unless_configured(folder: Path) -> None:
    """Run W&B offline when no account is configured, instead of prompting or failing."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"
    log.warning(
        "W&B: no account configured; logging offline. Upload later with: wandb sync %s/wandb/offline-run-*",
        folder,
    )


def enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("logger")) and "wandb" in cfg.logger


def prepare(cfg: DictConfig, folder: Path) -> None:
    if enabled(cfg):
        offline_unless_configured(folder)


def init_settings(quiet: bool) -> Any:
    """``wandb.Settings`` for a run of kdad's: with ``quiet``, none of W&B's console output."""
    import wandb

    return wandb.Settings(silent=bool(quiet))


def wandb_logger(quiet: bool, **kwargs: Any) -> Any:
    """Lightning's ``WandbLogger`` (``logger.wandb``; ``kwargs`` are its arguments and
    ``wandb.init``'s) with W&B's own console output off when ``quiet``: the run header,
    history sparklines and sync hints, ~27 lines per job. :func:`start` logs where the run is."""
    from lightning.pytorch.loggers import WandbLogger

    made = WandbLogger(settings=init_settings(quiet), **kwargs)
    # Lightning always passes wandb.init(anonymous=None); wandb >= 0.19 warns about any value.
    init = getattr(made, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    # Offline, W&B ignores ``resume`` (the run keeps its id, which is what resuming needs) and
    # wandb 0.20 warns that it does, even when silent.
    offline = kwargs.get("offline") or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    if isinstance(init, dict) and offline:
        init.pop("resume", None)
    return made


def wandb_loggers(loggers: Sequence[Any]) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def start(loggers: Sequence[Any], config: Mapping[str, Any]) -> None:
    """Log the flattened config once, keep the best of training (:data:`BEST_OF`) beside
    each loss's last value, and say where the run is."""
    from lightning.pytorch.loggers.logger import DummyExperiment

    for logger in wandb_loggers(loggers):
        run = logger.experiment
        if isinstance(run, DummyExperiment):  # DDP: rank 0 logs
            continue
        run.config.update(dict(config), allow_val_change=True)
        for name, (kind, _) in BEST_OF.items():
            run.define_metric(name, summary=f"{kind},last")
        if run.offline:
            log.info(
                "W&B: run %s offline in %s (wandb sync uploads it)", run.id, run.settings.sync_dir
            )
        else:
            log.info("W&B: run %s at %s", run.id, run.url)


def settle_summary(run: Any) -> None:
    """The summary as dashboards use it: each :data:`BEST_OF` key's last value as a plain
    number, its best under its own name (``define_metric`` kept them as ``{min, last}``; a
    resumed run's best also counts what it logged before)."""
    updates = {}
    for name, (kind, best_name) in BEST_OF.items():
        value = run.summary.get(name)
        if isinstance(value, Mapping) and kind in value:
            before = run.summary.get(best_name)
            best = {"min": min, "max": max}[kind]
            updates[best_name] = (
                best(value[kind], before) if isinstance(before, int | float) else value[kind]
            )
            if "last" in value:
                updates[name] = value["last"]
    if updates:
        run.summary.update(updates)


def log_results(loggers: Sequence[Any], results: Mapping[str, Any]) -> None:
    """metrics.json's values that are not test metrics (``test/*``, logged by the module) nor
    config (parameter counts): the timings, in the run's summary under their own names."""
    skip = {*METRIC_KEYS, "model", "data", "category", "seed", "params_trainable", "params_total"}
    for logger in wandb_loggers(loggers):
        logger.experiment.summary.update(
            {k: v for k, v in results.items() if k not in skip and isinstance(v, int | float)}
        )


def log_model(loggers: Sequence[Any], checkpoint: Path, config_file: Path, config: Mapping) -> None:
    """The final checkpoint and its config as one ``model`` artifact (``logger.wandb.log_model``)."""
    import wandb

    for logger in wandb_loggers(loggers):
        run = logger.experiment
        # W&B allows 100 metadata keys: the flattened config goes in as one entry.
        artifact = wandb.Artifact(
            f"model-{run.id}",
            type="model",
            metadata={"model_name": config.get("model_name"), "config": dict(config)},
        )
        artifact.add_file(str(checkpoint), name=checkpoint.name)
        artifact.add_file(str(config_file), name=config_file.name)
        run.log_artifact(artifact, aliases=["latest", "final"])
        log.info("W&B: checkpoint %s logged as artifact %s", checkpoint, artifact.name)


def finish(exit_code: int = 0) -> None:
    """Close this job's W&B run so the next job of a multirun starts its own (and never hangs);
    a non-zero ``exit_code`` marks the W&B run failed, as the job did."""
    if "wandb" in sys.modules:
        import wandb

        run = wandb.run
        if run is not None:
            try:
                settle_summary(run)
            except Exception as exc:  # the run must still be closed, with its exit code
                log.warning("W&B: summary not settled: %s", exc)
            run.finish(exit_code=exit_code)


def log_model_requested(cfg: DictConfig) -> bool:
    return enabled(cfg) and bool(OmegaConf.select(cfg, "logger.wandb.log_model", default=False))
