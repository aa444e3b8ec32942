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

from kdad.metrics.anomaly import AUPRO, AUROC, PRORD4AD, PROSTFPM, AveragePrecision, F1Max
from kdad.metrics.functional import (
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    connected_components,
    f1_max,
    pro_curve,
    pro_rd4ad,
    pro_stfpm,
)

__all__ = [
    "AUPRO",
    "AUROC",
    "METRIC_LEVEL",
    "PRORD4AD",
    "PROSTFPM",
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
    "pro_rd4ad",
    "pro_stfpm",
]

#: Which input each metric of :func:`build_metrics` takes: "image" = one score per image
#: (N,), "pixel" = anomaly maps and ground-truth masks (N,H,W) or (N,1,H,W).
METRIC_LEVEL: dict[str, str] = {
    "image_auroc": "image",
    "image_f1_max": "image",
    "pixel_auroc": "pixel",
    "pixel_aupro": "pixel",
    "pixel_ap": "pixel",
    "pixel_pro_rd4ad": "pixel",
    "pixel_pro_stfpm": "pixel",
}


def build_metrics(aupro_fpr_limit: float = 0.3, states_on_cpu: bool = True) -> dict[str, Metric]:
    """Fresh instances of the standard metrics, keyed as in :data:`METRIC_LEVEL`.

    ``pixel_aupro`` is the MVTec AD definition (the headline number); ``pixel_pro_rd4ad`` and
    ``pixel_pro_stfpm`` are the PRO computations of the official RD4AD and STFPM code, for a
    comparison with those papers' PRO columns. ``states_on_cpu``: keep every stored score and
    map in host memory (torchmetrics ``compute_on_cpu``), so the test device holds one batch.
    """
    host = {"compute_on_cpu": bool(states_on_cpu)}
    return {
        "image_auroc": AUROC(**host),
        "image_f1_max": F1Max(**host),
        "pixel_auroc": AUROC(**host),
        "pixel_aupro": AUPRO(fpr_limit=aupro_fpr_limit, **host),
        "pixel_ap": AveragePrecision(**host),
        "pixel_pro_rd4ad": PRORD4AD(**host),
        "pixel_pro_stfpm": PROSTFPM(**host),
    }
