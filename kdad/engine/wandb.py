"""Weights & Biases for the way kdad is used: sweeps and ablations compared in dashboards.

- **Names and groups.** A run is named by what distinguishes it from its sweep siblings: its
  Hydra overrides, without paths and settings that do not change the science (see
  :data:`NOISE`), e.g. ``hkt alignment=cross cbam=false seed=1``. Runs are grouped by
  ``task_name`` (the experiment, e.g. ``hkt_ablation``) with ``job_type`` the command
  (``train``/``eval``), and every run carries its overrides as ``config.overrides`` and as
  tags, and its sweep folder as ``config.sweep``, so a dashboard can group or filter by any
  swept key and by sweep.
- **One copy of the config**, flattened (``model.backbone``, ``data.category``, ...), plus the
  parameter counts; Lightning's nested copy is switched off (``save_hyperparameters(logger=False)``).
- **Summaries that mean something**: ``define_metric`` makes a loss's summary its minimum and a
  test metric's its maximum; each metrics.json value has one name (``test/<metric>``, the
  timings under their metrics.json names).
- **Resuming** keeps the W&B run: its id is kept in the run folder (``wandb_id``) and a resumed
  run (``ckpt_path=...``) continues it.
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

log = logging.getLogger("kdad")

ID_FILE = "wandb_id"
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
        sweep = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
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


def tags(*values: Any) -> list[str]:
    """Distinct non-empty tags from values and lists of values, plus this job's overrides."""
    found: list[str] = []
    for value in [*values, overrides()]:
        items = value if isinstance(value, list | tuple | ListConfig) else [value]
        for item in items:
            text = str(item)[:MAX_TAG]
            if item not in (None, "") and text not in found:
                found.append(text)
    return found


def run_id(output_dir: str, ckpt_path: Any = None) -> str:
    """The W&B run id of this run folder: the one kept in ``wandb_id`` (this folder's, or the
    folder of the checkpoint being resumed), else a new one, kept there for a later resume."""
    folder = Path(output_dir)
    candidates = [folder / ID_FILE]
    if ckpt_path not in (None, "", "last"):
        given = Path(str(ckpt_path)).expanduser()
        run_folder = given if given.is_dir() else given.parent.parent
        candidates.append(run_folder / ID_FILE)
    for path in candidates:
        if path.is_file() and re.fullmatch(r"[\w-]{1,64}", path.read_text().strip()):
            return path.read_text().strip()
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:  # DDP: rank 0 logs
        write_text_atomic(folder / ID_FILE, new + "\n")
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


def wandb_loggers(loggers: Sequence[Any]) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def start(loggers: Sequence[Any], config: Mapping[str, Any]) -> None:
    """Log the flattened config once and set each metric's summary (min loss, max metric)."""
    for logger in wandb_loggers(loggers):
        run = logger.experiment
        run.config.update(dict(config), allow_val_change=True)
        for name in ("train/loss", "train/loss_step", "train/loss_epoch", "val/loss"):
            run.define_metric(name, summary="min")
        for key in METRIC_KEYS:
            run.define_metric(f"test/{key}", summary="max")


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

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def log_model_requested(cfg: DictConfig) -> bool:
    return enabled(cfg) and bool(OmegaConf.select(cfg, "logger.wandb.log_model", default=False))
