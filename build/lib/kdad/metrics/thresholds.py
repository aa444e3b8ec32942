"""Decision thresholds and score normalisation, fit on held-out validation images.

After training, kdad-train runs the final model over the validation split (a seeded,
held-out part of the *normal training images*, see :class:`kdad.data.AnomalyDataModule`) and
fits two thresholds, stored in the checkpoint under ``checkpoint["kdad"]["thresholds"]``:

- image level, on the raw image scores: an image is anomalous when ``score > threshold``;
- pixel level, on the raw anomaly-map values: a pixel belongs to the predicted defect mask
  when ``map > threshold``.

Method (``thresholds.method``):

- ``quantile`` (what happens with kdad's normal-only validation split): the threshold is the
  ``image_quantile`` quantile of the validation image scores (default 0.99: about 1 % of
  normal parts rejected), and the ``pixel_quantile`` quantile of all validation map values
  (default 0.999: about 0.1 % of normal pixels inside a predicted mask);
- ``f1``: the threshold that maximises F1 between normal and anomalous validation images (or
  pixels, with ground-truth masks). Needs labelled anomalies in the validation data;
- ``auto`` (default): ``f1`` where the validation data holds labelled anomalies (masks for the
  pixel level), ``quantile`` otherwise.

Normalised scores are a linear, unclipped rescaling that puts the threshold at 1 and the
median of the normal validation scores at 0::

    normalized = 1 + (raw - threshold) / scale,     scale = threshold - median(normal)

so ``normalized > 1`` exactly when the image (pixel) is labelled anomalous, and values stay
comparable across models and categories. Raw scores are never squashed by a sigmoid. If the
validation scores have no spread (``threshold <= median``, e.g. a single validation image),
``scale`` falls back to ``|threshold|`` (1 if that is 0).

Thresholds are never fit on test images: :func:`fit_thresholds` is only ever given the
validation loader. Without a validation split (``data.val_fraction=0``) nothing is fit: the
checkpoint holds no thresholds and kdad-predict reports raw scores only (unless thresholds
are given on its command line).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdad.config import defaults, merge_settings
from kdad.errors import KDADError
from kdad.metrics.functional import binary_clf_curve

log = logging.getLogger("kdad")

METHODS = ("auto", "quantile", "f1")
FORMAT = 1


def settings(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``thresholds.*`` from the config over conf/train.yaml's, validated."""
    merged = merge_settings("thresholds", given, defaults("train.yaml", "thresholds"))
    if merged["method"] not in METHODS:
        raise KDADError(f"thresholds.method={merged['method']!r}: expected one of {list(METHODS)}")
    for key in ("image_quantile", "pixel_quantile"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise KDADError(f"thresholds.{key}={value!r}: expected a number in (0, 1]")
        merged[key] = float(value)
    if isinstance(merged["max_pixels"], bool) or int(merged["max_pixels"]) < 1:
        raise KDADError(f"thresholds.max_pixels={merged['max_pixels']!r}: expected an integer >= 1")
    merged["max_pixels"] = int(merged["max_pixels"])
    return merged


def normalize(raw: Any, level: Mapping[str, Any]) -> Any:
    """``1 + (raw - threshold) / scale`` for floats, numpy arrays or tensors."""
    return 1.0 + (raw - level["threshold"]) / level["scale"]


def _scale(threshold: float, center: float) -> float:
    spread = threshold - center
    if spread > 1e-12 * max(1.0, abs(threshold)):
        return float(spread)
    return float(abs(threshold)) or 1.0


def level_thresholds(method: str, threshold: float, center: float, **extra: Any) -> dict[str, Any]:
    """The stored record of one level: method, threshold, normalisation centre and scale."""
    if not math.isfinite(threshold):
        raise KDADError(
            f"cannot fit a threshold: the validation values are not finite ({threshold})"
        )
    return {
        "method": method,
        "threshold": float(threshold),
        "center": float(center),
        "scale": _scale(float(threshold), float(center)),
        **extra,
    }


def f1_threshold(values: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the F1-optimal cut, placed so that ``value > threshold`` is anomalous.

    The best distinct value ``v`` (positives are ``value >= v``) becomes the midpoint between
    ``v`` and the next lower distinct value, so the strict rule reproduces it exactly.
    """
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    targets = torch.as_tensor(targets).reshape(-1).bool()
    fps, tps, cuts = binary_clf_curve(values, targets)
    f1 = 2.0 * tps / (tps + fps + tps[-1])
    best = int(torch.argmax(f1))
    upper = float(cuts[best])
    if best + 1 < len(cuts):
        lower = float(cuts[best + 1])
    else:  # every value is flagged: any cut just below the smallest one
        lower = upper - max(1e-6 * abs(upper), 1e-12)
    return (upper + lower) / 2.0, float(f1[best])


class _PixelSample:
    """Map values (and mask labels) of all validation images, evenly subsampled to a budget."""

    def __init__(self, total: int, budget: int) -> None:
        self.stride = max(1, math.ceil(total / budget))
        self.offset = 0
        self.values: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, maps: Tensor, masks: Tensor | None) -> None:
        flat = maps.reshape(-1)
        # Keep every stride-th value of the concatenated stream (continuing across batches).
        start = (-self.offset) % self.stride
        self.values.append(flat[start :: self.stride].double().cpu().numpy())
        if masks is not None:
            self.labels.append((masks.reshape(-1)[start :: self.stride] > 0.5).cpu().numpy())
        self.offset += flat.numel()


def _batches(loader: Iterable) -> Iterable[tuple[Tensor, Tensor | None, Tensor | None]]:
    for batch in loader:
        if isinstance(batch, Mapping):
            yield batch["image"], batch.get("label"), batch.get("mask")
        else:
            yield batch, None, None


@torch.no_grad()
def collect(
    net: torch.nn.Module, loader: Iterable, device: torch.device | str, max_pixels: int
) -> dict[str, Any]:
    """Image scores, labels and a pixel sample of ``net.predict`` over ``loader``."""
    dataset = getattr(loader, "dataset", None)
    num_images = len(dataset) if dataset is not None else None
    scores, labels, pixels = [], [], None
    for images, label, mask in _batches(loader):
        maps, batch_scores = net.predict(images.to(device))
        maps = maps.float()
        if pixels is None:
            per_image = maps[0].numel()
            pixels = _PixelSample(per_image * (num_images or len(images)), max_pixels)
        has_masks = mask is not None and label is not None
        pixels.add(maps, mask.to(maps.device) if has_masks else None)
        scores.append(batch_scores.double().cpu())
        labels.append(
            torch.as_tensor(label).long().cpu()
            if label is not None
            else torch.zeros(len(images), dtype=torch.long)
        )
    if not scores:
        raise KDADError("cannot fit thresholds: the validation split holds no images")
    pixel_values = np.concatenate(pixels.values)
    pixel_labels = np.concatenate(pixels.labels) if pixels.labels else None
    return {
        "scores": torch.cat(scores).numpy(),
        "labels": torch.cat(labels).numpy(),
        "pixel_values": pixel_values,
        "pixel_labels": pixel_labels,
    }


def fit_from_values(collected: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Thresholds from collected validation values (see the module docstring)."""
    cfg = settings(config)
    scores, labels = collected["scores"], collected["labels"]
    normal = scores[labels == 0]
    num_anomalous = int((labels == 1).sum())
    if normal.size == 0:
        raise KDADError("cannot fit thresholds: the validation split holds no normal image")
    center = float(np.median(normal))
    image_method = cfg["method"]
    if image_method == "auto":
        image_method = "f1" if num_anomalous > 0 else "quantile"
    if image_method == "f1":
        if num_anomalous == 0:
            raise KDADError(
                "thresholds.method=f1 needs labelled anomalies in the validation data; kdad's "
                "validation split holds normal training images only: use thresholds.method=quantile (or auto)"
            )
        threshold, f1 = f1_threshold(scores, labels)
        image = level_thresholds("f1", threshold, center, f1=f1)
    else:
        threshold = float(np.quantile(normal, cfg["image_quantile"]))
        image = level_thresholds("quantile", threshold, center, quantile=cfg["image_quantile"])

    values, pixel_labels = collected["pixel_values"], collected["pixel_labels"]
    has_defect_pixels = pixel_labels is not None and bool(pixel_labels.any())
    normal_pixels = values[~pixel_labels] if has_defect_pixels else values
    pixel_center = float(np.median(normal_pixels))
    pixel_method = cfg["method"]
    if pixel_method == "auto":
        pixel_method = "f1" if has_defect_pixels else "quantile"
    if pixel_method == "f1" and has_defect_pixels:
        threshold, f1 = f1_threshold(values, pixel_labels)
        pixel = level_thresholds("f1", threshold, pixel_center, f1=f1)
    else:
        if pixel_method == "f1":
            log.warning(
                "thresholds.method=f1: no defect masks in the validation data; pixel threshold by quantile"
            )
        threshold = float(np.quantile(normal_pixels, cfg["pixel_quantile"]))
        pixel = level_thresholds(
            "quantile", threshold, pixel_center, quantile=cfg["pixel_quantile"]
        )
    return {
        "format": FORMAT,
        "split": "validation",
        "num_images": int(scores.size),
        "num_anomalous": num_anomalous,
        "num_pixels": int(values.size),
        "image": image,
        "pixel": pixel,
    }


def fit_thresholds(
    net: torch.nn.Module,
    val_loader: Iterable,
    config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Fit image and pixel thresholds of ``net`` on ``val_loader`` (validation data only).

    ``net`` is put in eval mode and run in float32 on ``device``, as kdad-predict runs it.
    """
    cfg = settings(config)
    net.eval()
    collected = collect(net, val_loader, device, cfg["max_pixels"])
    return fit_from_values(collected, cfg)


def override(
    stored: Mapping[str, Any] | None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
) -> dict[str, Any] | None:
    """Stored thresholds with user-given raw thresholds replacing the fitted ones.

    A given threshold keeps the stored normalisation scale where one exists (else ``|t|``),
    so ``normalized > 1`` still means "above the threshold".
    """
    if stored is None and image_threshold is None and pixel_threshold is None:
        return None
    result: dict[str, Any] = dict(stored or {"format": FORMAT, "split": "command line"})
    for key, given in (("image", image_threshold), ("pixel", pixel_threshold)):
        if given is None:
            continue
        given = float(given)
        previous = result.get(key)
        scale = previous["scale"] if previous else _scale(given, given)
        result[key] = {
            "method": "given",
            "threshold": given,
            "center": given - scale,
            "scale": scale,
        }
    return result


def describe(thresholds: Mapping[str, Any] | None) -> str:
    """One line for logs."""
    if not thresholds:
        return "no thresholds"
    parts = []
    for key in ("image", "pixel"):
        level = thresholds.get(key)
        if level:
            how = level["method"] + (f" q={level['quantile']}" if "quantile" in level else "")
            parts.append(f"{key} {level['threshold']:.6g} ({how})")
    source = thresholds.get("split", "?")
    count = thresholds.get("num_images")
    return ", ".join(parts) + f" from {source}" + (f" ({count} images)" if count else "")


__all__ = [
    "METHODS",
    "collect",
    "describe",
    "f1_threshold",
    "fit_from_values",
    "fit_thresholds",
    "level_thresholds",
    "normalize",
    "override",
    "record",
    "settings",
]


def record(fitted: dict[str, Any] | None, checkpoint: str) -> dict[str, Any]:
    """thresholds.json: the thresholds of the checkpoint that is tested, flat for readers."""
    flat: dict[str, Any] = {"checkpoint": str(checkpoint), "fitted": fitted is not None}
    for level in ("image", "pixel"):
        values = (fitted or {}).get(level) or {}
        for key in ("threshold", "method", "quantile", "center", "scale"):
            flat[f"{level}_{key}"] = values.get(key)
    flat["num_validation_images"] = (fitted or {}).get("num_images", 0)
    return flat
