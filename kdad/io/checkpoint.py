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

import hashlib
import logging
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdad.errors import KDADError
from kdad.io.atomic import atomic_path
from kdad.io.run_folder import resolve_checkpoint

DIGEST_KEY = "sha256"

log = logging.getLogger("kdad")


def _load_error(path: Path, exc: BaseException) -> KDADError:
    """One line saying why ``torch.load(weights_only=True)`` refused ``path``."""
    text = " ".join(str(exc).split())
    # torch words the refusal "Unsupported global: GLOBAL x.y was not an allowed global" or
    # "Trying to load unsupported GLOBAL x.y whose module x is blocked", by version and module.
    refused = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", text)
    if refused:
        reason = (
            f"this file contains pickled code ({refused.group(1)}) and was refused without running it "
            "(a kdad checkpoint holds tensors and plain data only; the file may be unsafe)"
        )
    elif isinstance(exc, EOFError):
        reason = "the file is empty or truncated"
    elif isinstance(exc, pickle.UnpicklingError):
        reason = "not a torch checkpoint file, or a corrupted one"
    else:  # the zip container or the pickle inside it is damaged
        reason = f"the file is truncated or corrupted ({type(exc).__name__}: {text[:120]})"
    return KDADError(f"ckpt_path={path}: not a readable kdad checkpoint: {reason}")


def read_checkpoint(path: str | Path, allow_unsigned: bool = False) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (a file or a run folder), loaded with weights_only=True
    and checked against its digest (:func:`checkpoint_digest`): a mismatch is always an error,
    a missing digest one unless ``allow_unsigned``."""
    path = resolve_checkpoint(path)
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
    expected = checkpoint["kdad"].get(DIGEST_KEY)
    if expected is None:
        if not allow_unsigned:
            raise KDADError(
                f"ckpt_path={path}: the checkpoint carries no integrity digest (kdad.{DIGEST_KEY}: "
                "written by an older kdad, or removed), so a changed or corrupted content could "
                "not be detected; refused. If you trust the file, pass allow_unsigned=true"
            )
        log.warning("ckpt_path=%s: no integrity digest; loaded anyway (allow_unsigned=true)", path)
    elif checkpoint_digest(checkpoint) != expected:
        raise KDADError(
            f"ckpt_path={path}: its contents (weights, optimiser or training state, thresholds or "
            "settings) do not match the digest recorded when it was saved (the file was corrupted "
            "or modified); refused"
        )
    return checkpoint


def _update(digest: Any, value: Any) -> None:
    """Feed ``value`` (tensors, mappings, sequences, plain data) into ``digest``, canonically:
    mappings by sorted key, tensors by name of dtype, shape and bytes."""
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}|".encode())
        for key in sorted(value, key=str):
            digest.update(f"K{key!s}|".encode())
            _update(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}|".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(f"V{type(value).__name__}|{value!r}|".encode())


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 over the whole checkpoint but the digest itself: the weights, the
    hyper-parameters (the model's config and the preprocessing it was trained with), kdad's
    metadata (model name, thresholds, random state), and the optimiser, scheduler, loop and
    callback states a resumed run continues from. Any of them corrupted or changed after
    saving is found before it is used."""
    digest = hashlib.sha256()
    kdad = {k: v for k, v in dict(checkpoint.get("kdad") or {}).items() if k != DIGEST_KEY}
    _update(digest, {**{k: v for k, v in checkpoint.items() if k != "kdad"}, "kdad": kdad})
    return digest.hexdigest()


def sign(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Record :func:`checkpoint_digest` in ``checkpoint["kdad"]`` (in place); returns it."""
    checkpoint["kdad"][DIGEST_KEY] = checkpoint_digest(checkpoint)
    return checkpoint


def checkpoint_model_name(checkpoint: dict[str, Any]) -> str:
    """The variant ``checkpoint`` holds, by its current name (:data:`kdad.config.MODEL_ALIASES`)."""
    from kdad.config import current_model_name

    return current_model_name(str(checkpoint["hyper_parameters"].get("model_name", "?")))


def write_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Sign ``checkpoint`` (it was changed: e.g. thresholds added), ``torch.save`` it to a
    temporary file beside ``path``, then move it into place."""
    checkpoint = sign(dict(checkpoint))
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)


def plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


__all__ = [
    "checkpoint_digest",
    "checkpoint_model_name",
    "read_checkpoint",
    "sign",
    "write_checkpoint",
]
