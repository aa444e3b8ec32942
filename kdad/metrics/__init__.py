"""Exact anomaly-detection metrics: functional torch code and torchmetrics wrappers.

* :mod:`kdad.metrics.functional` — pure torch functions (CPU or CUDA, float64 accumulation,
  no binning, no squashing of scores). AUROC / AP follow scikit-learn's definitions, PRO /
  AUPRO the official MVTec AD evaluation code.
* :mod:`kdad.metrics.anomaly` — :class:`torchmetrics.Metric` subclasses that store all
  samples and are correct under DDP (states gathered with ``cat``).

:func:`build_metrics` returns the standard set evaluated by the framework; :data:`METRIC_LEVEL`
says whether each is fed image-level scores (N,) or pixel-level maps (N,H,W).
"""

from __future__ import annotations

from torchmetrics import Metric

from kdad.metrics.anomaly import AUPRO, AUROC, AveragePrecision, F1Max
from kdad.metrics.functional import (
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    connected_components,
    f1_max,
    pro_curve,
)

__all__ = [
    "AUPRO",
    "AUROC",
    "METRIC_LEVEL",
    "AveragePrecision",
    "F1Max",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "build_metrics",
    "connected_components",
    "f1_max",
    "pro_curve",
]

#: Which input each metric of :func:`build_metrics` takes: "image" = one score per image
#: (N,), "pixel" = anomaly maps and ground-truth masks (N,H,W) or (N,1,H,W).
METRIC_LEVEL: dict[str, str] = {
    "image_auroc": "image",
    "image_f1_max": "image",
    "pixel_auroc": "pixel",
    "pixel_aupro": "pixel",
    "pixel_ap": "pixel",
}


def build_metrics(aupro_fpr_limit: float = 0.3) -> dict[str, Metric]:
    """Fresh instances of the standard metrics, keyed as in :data:`METRIC_LEVEL`."""
    return {
        "image_auroc": AUROC(),
        "image_f1_max": F1Max(),
        "pixel_auroc": AUROC(),
        "pixel_aupro": AUPRO(fpr_limit=aupro_fpr_limit),
        "pixel_ap": AveragePrecision(),
    }
