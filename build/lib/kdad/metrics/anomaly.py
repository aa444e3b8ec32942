"""Exact anomaly-detection metrics as :class:`torchmetrics.Metric` subclasses.

The metrics are not decomposable into per-batch sums, so every score and target is kept
and the exact functional metric (:mod:`kdad.metrics.functional`) runs once in
``compute()``. The states are lists with ``dist_reduce_fx="cat"``: under DDP torchmetrics
gathers every process's samples before ``compute()``, so each rank returns the metric over
the whole (distributed) test set. Definitions: scikit-learn for AUROC / AP, the official
MVTec AD evaluation code for AUPRO (see :mod:`kdad.metrics.functional`).

Memory: scores are stored as float32 and targets / masks as uint8 (uint8 rather than bool
because not every collective backend gathers bool tensors): 5 bytes per pixel and pixel
metric. With ``compute_on_cpu=True`` (a standard :class:`~torchmetrics.Metric` option, what
:func:`kdad.metrics.build_metrics` uses by default) each batch's states move to host memory
right after ``update``, so the test device holds one batch, and ``compute()`` runs on the
CPU: the same values, bit for bit (experiments/benchmark/pixel_metric_memory.py). Under DDP
the host states are gathered over a gloo process group when the default backend (NCCL)
cannot move CPU tensors. Every rank must call ``update`` at least once before ``compute()``
(true with a ``DistributedSampler``): torchmetrics cannot gather an empty rank's state
together with (N,H,W) states of other ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from kdad.metrics import functional as F
from kdad.metrics.functional import UndefinedMetricWarning

__all__ = ["AUPRO", "AUROC", "PRORD4AD", "PROSTFPM", "AveragePrecision", "F1Max"]


def _cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A list state as one tensor (after a DDP sync it already is one); None if empty."""
    if isinstance(state, Tensor):
        return state if state.numel() > 0 else None
    if len(state) == 0:
        return None
    return dim_zero_cat(state)


def _empty_nan(name: str, device: torch.device) -> Tensor:
    warnings.warn(
        f"{name}.compute() called without any samples; returning nan.",
        UndefinedMetricWarning,
        stacklevel=3,
    )
    return torch.tensor(float("nan"), dtype=torch.float64, device=device)


def _check_same_numel(preds: Tensor, target: Tensor) -> None:
    if preds.numel() != target.numel():
        raise ValueError(
            f"preds and target differ in size: {tuple(preds.shape)} vs {tuple(target.shape)}."
        )


_GLOO_GROUP: Any = None


def _host_state_group() -> Any:
    """A process group that can gather CPU tensors: None (the default group) when its
    backend can, else a gloo group over all ranks, created once (collectively, at the first
    sync, which every rank reaches together)."""
    global _GLOO_GROUP
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if "gloo" in str(torch.distributed.get_backend()):
        return None  # gloo, or "cpu:gloo,cuda:nccl"
    if _GLOO_GROUP is None:
        _GLOO_GROUP = torch.distributed.new_group(backend="gloo")
    return _GLOO_GROUP


class _ExactMetric(Metric):
    """Base of kdad's metrics: with ``compute_on_cpu`` the states stay in host memory, also
    while they are gathered across processes."""

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None):
        if self.compute_on_cpu and process_group is None and self.process_group is None:
            process_group = _host_state_group()
        super()._sync_dist(dist_sync_fn, process_group)


class _ScoreMetric(_ExactMetric):
    """Stores flattened scores and binary targets; any input shape (image or pixel level)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    preds: list[Tensor]
    target: list[Tensor]

    _fn: Callable[[Tensor, Tensor], Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` are raw scores (never squashed), ``target`` binary labels."""
        _check_same_numel(preds, target)
        # detach: a stored score must not keep a model's autograd graph alive.
        self.preds.append(preds.detach().reshape(-1).to(torch.float32))
        self.target.append(F._binarize(target.detach().reshape(-1)).to(torch.uint8))

    def compute(self) -> Tensor:
        """The metric over all samples of all processes, as a float64 scalar tensor."""
        preds, target = _cat_state(self.preds), _cat_state(self.target)
        if preds is None or target is None:
            return _empty_nan(type(self).__name__, self.device)
        return self._fn(preds, target)


class AUROC(_ScoreMetric):
    """Exact ROC AUC (equals ``sklearn.metrics.roc_auc_score``), image or pixel level."""

    _fn = staticmethod(F.auroc)

    def curve(self) -> tuple[Tensor, Tensor] | None:
        """The full ROC curve (FPR, TPR) over all processes' data, or None without data."""
        with self.sync_context():
            preds, target = _cat_state(self.preds), _cat_state(self.target)
            if preds is None or target is None:
                return None
            return roc_points(preds, target)


class AveragePrecision(_ScoreMetric):
    """Average precision (equals ``sklearn.metrics.average_precision_score``)."""

    _fn = staticmethod(F.average_precision)


class F1Max(_ScoreMetric):
    """Maximum F1 over all distinct thresholds."""

    _fn = staticmethod(F.f1_max)


def downsample_curve(x: Tensor, y: Tensor, points: int = 2000) -> tuple[list[float], list[float]]:
    """At most ``points`` evenly spaced (by index) points of a curve, endpoints kept, for plots."""
    if x.numel() > points:
        index = torch.linspace(0, x.numel() - 1, points, device=x.device).round().long()
        x, y = x[index], y[index]
    return x.double().cpu().tolist(), y.double().cpu().tolist()


def roc_points(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(FPR, TPR) at every distinct threshold, starting at (0, 0)."""
    fps, tps, _ = F.binary_clf_curve(preds, target)
    zero = fps.new_zeros(1)
    fpr = torch.cat([zero, fps / fps[-1].clamp(min=1)])
    tpr = torch.cat([zero, tps / tps[-1].clamp(min=1)])
    return fpr, tpr


class _MapMetric(_ExactMetric):
    """Stores anomaly maps (float32) and binary masks (uint8), both (N,H,W).

    ``update`` takes maps and masks of shape (N,H,W) or (N,1,H,W). Connected components are
    computed in ``compute()`` on the gathered masks, so every ground-truth region of the
    whole test set counts once, whatever process saw it.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    maps: list[Tensor]
    masks: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of anomaly maps ``preds`` and binary masks ``target``."""
        maps = F._as_maps(preds.detach(), "preds")
        masks = F._as_maps(target.detach(), "target")
        if maps.shape != masks.shape:
            raise ValueError(
                f"preds and target differ in shape: {tuple(maps.shape)} vs {tuple(masks.shape)}."
            )
        self.maps.append(maps.to(torch.float32))
        self.masks.append(F._binarize(masks).to(torch.uint8))

    def _value(self, maps: Tensor, masks: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self) -> Tensor:
        """The metric over all images of all processes, as a float64 scalar tensor."""
        maps, masks = _cat_state(self.maps), _cat_state(self.masks)
        if maps is None or masks is None:
            return _empty_nan(type(self).__name__, self.device)
        return self._value(maps, masks)


class AUPRO(_MapMetric):
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition)."""

    def __init__(self, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}.")
        self.fpr_limit = float(fpr_limit)

    def curve(self) -> tuple[Tensor, Tensor] | None:
        """The full PRO curve (FPR, PRO) over all processes' data, or None without data."""
        with self.sync_context():
            maps, masks = _cat_state(self.maps), _cat_state(self.masks)
            if maps is None or masks is None:
                return None
            return F.pro_curve(maps, masks)

    def _value(self, maps: Tensor, masks: Tensor) -> Tensor:
        return F.aupro(maps, masks, fpr_limit=self.fpr_limit)


class PRORD4AD(_MapMetric):
    """The PRO of RD4AD's official ``test.py`` (per anomalous image, 200 thresholds), see
    :func:`kdad.metrics.functional.pro_rd4ad`. Compare with RD4AD's and NFERD's PRO columns."""

    def __init__(self, num_thresholds: int = 200, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_thresholds, self.fpr_limit = int(num_thresholds), float(fpr_limit)

    def _value(self, maps: Tensor, masks: Tensor) -> Tensor:
        return F.pro_rd4ad(maps, masks, self.num_thresholds, self.fpr_limit)


class PROSTFPM(_MapMetric):
    """The PRO of STFPM's official ``evaluate.py`` (global, 4000 thresholds, min-max rescaled
    FPR and PRO), see :func:`kdad.metrics.functional.pro_stfpm`. Compare with STFPM's PRO."""

    def __init__(self, num_thresholds: int = 4000, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_thresholds, self.fpr_limit = int(num_thresholds), float(fpr_limit)

    def _value(self, maps: Tensor, masks: Tensor) -> Tensor:
        return F.pro_stfpm(maps, masks, self.num_thresholds, self.fpr_limit)
