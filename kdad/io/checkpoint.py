"""Reading and writing kdad checkpoints safely (rebuilding the module: kdad.lightning.loading).

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
import hashlib
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
from torch import Tensor

from kdad.errors import KDADError
from kdad.io.atomic import atomic_path

log = logging.getLogger("kdad")


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


def state_dict_digest(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors, in order."""
    digest = hashlib.sha256()
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def checkpoint_model_name(checkpoint: dict[str, Any]) -> str:
    return str(checkpoint["hyper_parameters"].get("model_name", "?"))


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
    "read_checkpoint",
    "resolve_checkpoint_path",
    "state_dict_digest",
    "write_checkpoint",
]
