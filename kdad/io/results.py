"""The metrics.json contract: its keys, in order, and the object a run writes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The contract of metrics.json (kdad/io/README.md): exactly these keys, metrics as fractions in [0, 1]; after the
# MVTec AD AUPRO, the PRO as the official RD4AD and STFPM code compute it (kdad/README.md, "Metrics").
METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "image_f1_max",
    "pixel_ap",
    "pixel_pro_rd4ad",
    "pixel_pro_stfpm",
)
RESULT_KEYS = (
    "model",
    "data",
    "category",
    "seed",
    *METRIC_KEYS,
    "train_seconds",
    "train_images_per_second",
    "test_images_per_second",
    "params_trainable",
    "params_total",
)


def build_results(
    *,
    model: str,
    data: str,
    category: str,
    seed: int,
    metrics: Mapping[str, float],
    train_stats: Mapping[str, float],
    test_images_per_second: float,
    params_trainable: int,
    params_total: int,
) -> dict[str, Any]:
    """The flat metrics.json object, exactly the contract's keys in the contract's order."""
    results = {
        "model": model,
        "data": data,
        "category": category,
        "seed": int(seed),
        **{key: float(metrics[key]) if key in metrics else float("nan") for key in METRIC_KEYS},
        "train_seconds": float(train_stats.get("train_seconds", float("nan"))),
        "train_images_per_second": float(train_stats.get("train_images_per_second", float("nan"))),
        "test_images_per_second": float(test_images_per_second),
        "params_trainable": int(params_trainable),
        "params_total": int(params_total),
    }
    assert tuple(results) == RESULT_KEYS
    return results
