"""Loading kdad checkpoints safely and rebuilding the module they describe.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only,
no arbitrary pickled code. The variant, its settings and the preprocessing come from the
checkpoint itself, so evaluation and prediction need no training config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdad.errors import KDADError
from kdad.lightning_module import DistillationModule


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KDADError(f"ckpt_path={path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KDADError(f"ckpt_path={path}: not a readable kdad checkpoint ({reason})") from None
    if (
        not isinstance(checkpoint, dict)
        or "kdad" not in checkpoint
        or "hyper_parameters" not in checkpoint
    ):
        raise KDADError(
            f"ckpt_path={path}: not a kdad checkpoint (no kdad metadata; was it written by kdad-train?)"
        )
    return checkpoint


def checkpoint_model_name(checkpoint: dict[str, Any]) -> str:
    return str(checkpoint["hyper_parameters"].get("model_name", "?"))


def load_module(path: str | Path, expected_model: str | None = None) -> DistillationModule:
    """Rebuild the LightningModule stored in ``path`` (on CPU, in eval mode)."""
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    name = checkpoint_model_name(checkpoint)
    if expected_model is not None and name != expected_model:
        raise KDADError(
            f"ckpt_path={path} holds a model={name} checkpoint, but model={expected_model} was requested; "
            f"drop the model override or pass model={name}"
        )
    model_cfg = dict(hparams["model"])
    # The teacher's weights are in the state dict: never download or read them again.
    model_cfg["pretrained"] = False
    model_cfg["weights_path"] = None
    module = DistillationModule(
        model=model_cfg,
        optimizer=hparams["optimizer"],
        scheduler=hparams.get("scheduler"),
        model_name=name,
        preprocess=hparams.get("preprocess"),
    )
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        sample = (result.missing_keys or result.unexpected_keys)[:3]
        raise KDADError(
            f"ckpt_path={path}: its weights do not fit the model={name} it describes "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, e.g. {sample})"
        )
    module.on_load_checkpoint(checkpoint)
    return module.eval()
