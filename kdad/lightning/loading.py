"""Rebuilding the LightningModule a kdad checkpoint describes, and saving one without a trainer.

Because the model is rebuilt from the checkpoint's hyper-parameters, those are checked before
anything is called: the ``_target_`` must be a kdad variant class (a tampered checkpoint cannot
make Hydra call an arbitrary function).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdad.config import current_target
from kdad.errors import KDADError
from kdad.io.checkpoint import (
    checkpoint_model_name,
    plain,
    read_checkpoint,
    write_checkpoint,
)
from kdad.io.run_folder import resolve_checkpoint
from kdad.lightning.module import DistillationModule, check_model_target

# Variant classes a checkpoint may name (modules are imported to check the class).
TRUSTED_TARGET_PREFIXES = ("kdad.",)


def _checked_model_config(path: Path, hparams: Mapping[str, Any]) -> dict[str, Any]:
    model_cfg = hparams.get("model")
    if not isinstance(model_cfg, Mapping):
        raise KDADError(f"ckpt_path={path}: its hyper-parameters hold no model config")
    target = str(model_cfg.get("_target_", ""))
    target = current_target(target)  # a checkpoint from before a class was renamed
    if not target.startswith(TRUSTED_TARGET_PREFIXES):
        raise KDADError(
            f"ckpt_path={path}: its model._target_={target!r} is not a kdad variant; refusing to build it"
        )
    model_cfg = {**model_cfg, "_target_": target}
    try:
        check_model_target(model_cfg)
    except KDADError as exc:
        raise KDADError(f"ckpt_path={path}: {exc}") from None
    return model_cfg


def load_module(
    path: str | Path, expected_model: str | None = None, allow_unsigned: bool = False
) -> DistillationModule:
    """Rebuild the LightningModule stored in ``path`` (on CPU, in eval mode); a checkpoint
    without kdad's digest only with ``allow_unsigned`` (see :func:`kdad.io.checkpoint.read_checkpoint`)."""
    path = resolve_checkpoint(path)
    checkpoint = read_checkpoint(path, allow_unsigned=allow_unsigned)
    hparams = dict(checkpoint["hyper_parameters"])
    name = checkpoint_model_name(checkpoint)
    if expected_model is not None and name != expected_model:
        raise KDADError(
            f"ckpt_path={path} holds a model={name} checkpoint, but model={expected_model} was requested; "
            f"drop the model override or pass model={name}"
        )
    model_cfg = _checked_model_config(path, hparams)
    # The teacher's weights are in the state dict: never download or read them again.
    model_cfg["pretrained"] = False
    model_cfg["weights_path"] = None
    try:
        module = DistillationModule(
            model=model_cfg,
            optimizer=hparams.get("optimizer") or {},
            scheduler=hparams.get("scheduler"),
            model_name=name,
            preprocess=hparams.get("preprocess"),
        )
    except KDADError as exc:
        raise KDADError(f"ckpt_path={path}: cannot rebuild its model={name}: {exc}") from None
    try:
        result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise KDADError(
            f"ckpt_path={path}: its weights do not fit the model={name} it describes ({first})"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        sample = (result.missing_keys or result.unexpected_keys)[:3]
        raise KDADError(
            f"ckpt_path={path}: its weights do not fit the model={name} it describes "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, e.g. {sample})"
        )
    module.on_load_checkpoint(checkpoint)
    return module.eval()


def save_checkpoint(module: DistillationModule, path: str | Path) -> Path:
    """Write ``module`` as a weights-only kdad checkpoint (no trainer or optimiser state).

    What :func:`load_module` needs: the state dict, the hyper-parameters and the ``kdad``
    metadata (model name, thresholds). Written atomically.
    """
    checkpoint: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": plain(dict(module.hparams)),
    }
    module.on_save_checkpoint(checkpoint)
    return write_checkpoint(checkpoint, path)
