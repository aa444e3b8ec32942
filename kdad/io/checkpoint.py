"""Loading kdad checkpoints safely and rebuilding the module they describe.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
no arbitrary pickled code. The variant, its settings and the preprocessing come from the
checkpoint itself, so evaluation and prediction need no training config. Because the model is
rebuilt from the checkpoint's hyper-parameters, those are checked before anything is called:
the ``_target_`` must be a kdad variant class (a tampered checkpoint cannot make Hydra call an
arbitrary function). Every way a file can fail to be a usable kdad checkpoint (missing,
truncated, corrupted, foreign, pickled objects, weights of another shape) is a one-line
:class:`~kdad.errors.KDADError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from kdad.errors import KDADError
from kdad.lightning_module import DistillationModule, check_model_target, state_dict_digest
from kdad.results import atomic_path

log = logging.getLogger("kdad")

# Variant classes a checkpoint may name (modules are imported to check the class).
TRUSTED_TARGET_PREFIXES = ("kdad.",)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a kdad-train run folder: the checkpoint that run tested.

    That is ``checkpoints/last.ckpt``, or ``checkpoints/best.ckpt`` for a run with
    ``test_ckpt: best`` (STFPM's default) in its config.yaml. (Resuming always takes
    last.ckpt: see kdad.train.)
    """
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        checkpoints = path / "checkpoints"
        candidate = checkpoints / "last.ckpt"
        config = path / "config.yaml"
        if (checkpoints / "best.ckpt").is_file() and config.is_file():
            with contextlib.suppress(Exception):
                if OmegaConf.load(config).get("test_ckpt") == "best":
                    candidate = checkpoints / "best.ckpt"
        if not candidate.is_file():
            raise KDADError(
                f"ckpt_path={path} is a folder without {candidate.relative_to(path)} (not a kdad-train run folder?)"
            )
        log.info("ckpt_path=%s: using %s", path, candidate)
        return candidate
    if not path.is_file():
        raise KDADError(f"ckpt_path={path}: no such file")
    return path


def _load_error(path: Path, exc: BaseException) -> KDADError:
    """One line saying why ``torch.load(weights_only=True)`` refused ``path``."""
    text = " ".join(str(exc).split())
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        reason = (
            f"it holds a pickled Python object ({refused.group(1)}), which a kdad checkpoint never "
            "does; refused without running it (the file may be unsafe)"
        )
    elif isinstance(exc, EOFError):
        reason = "the file is empty or truncated"
    elif isinstance(exc, pickle.UnpicklingError):
        reason = "not a torch checkpoint file, or a corrupted one"
    else:  # the zip container or the pickle inside it is damaged
        reason = f"the file is truncated or corrupted ({type(exc).__name__}: {text[:120]})"
    return KDADError(f"ckpt_path={path}: not a readable kdad checkpoint: {reason}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (a file or a run folder), loaded with weights_only=True."""
    path = resolve_checkpoint_path(path)
    try:
        with warnings.catch_warnings():  # the one-line error below says it better
            warnings.filterwarnings("ignore", message=r".*pickle protocol.*", category=UserWarning)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("kdad"), dict)
        or not isinstance(checkpoint.get("hyper_parameters"), Mapping)
        or not isinstance(checkpoint.get("state_dict"), Mapping)
    ):
        raise KDADError(
            f"ckpt_path={path}: not a kdad checkpoint (no kdad metadata; was it written by kdad-train?)"
        )
    expected = checkpoint["kdad"].get("state_dict_sha256")
    if expected is not None and state_dict_digest(checkpoint["state_dict"]) != expected:
        raise KDADError(
            f"ckpt_path={path}: its weights do not match the checksum recorded when it was saved "
            "(the file was corrupted or modified)"
        )
    return checkpoint


def checkpoint_model_name(checkpoint: dict[str, Any]) -> str:
    return str(checkpoint["hyper_parameters"].get("model_name", "?"))


def _checked_model_config(path: Path, hparams: Mapping[str, Any]) -> dict[str, Any]:
    model_cfg = hparams.get("model")
    if not isinstance(model_cfg, Mapping):
        raise KDADError(f"ckpt_path={path}: its hyper-parameters hold no model config")
    target = str(model_cfg.get("_target_", ""))
    if not target.startswith(TRUSTED_TARGET_PREFIXES):
        raise KDADError(
            f"ckpt_path={path}: its model._target_={target!r} is not a kdad variant; refusing to build it"
        )
    try:
        check_model_target(model_cfg)
    except KDADError as exc:
        raise KDADError(f"ckpt_path={path}: {exc}") from None
    return dict(model_cfg)


def load_module(path: str | Path, expected_model: str | None = None) -> DistillationModule:
    """Rebuild the LightningModule stored in ``path`` (on CPU, in eval mode)."""
    path = resolve_checkpoint_path(path)
    checkpoint = read_checkpoint(path)
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
        "hyper_parameters": _plain(dict(module.hparams)),
    }
    module.on_save_checkpoint(checkpoint)
    return write_checkpoint(checkpoint, path)


def write_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then move it into place."""
    with atomic_path(path) as tmp:
        torch.save(dict(checkpoint), tmp)
    return Path(path)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


__all__ = [
    "checkpoint_model_name",
    "load_module",
    "read_checkpoint",
    "resolve_checkpoint_path",
    "save_checkpoint",
    "write_checkpoint",
]
