"""Exact, threshold-free anomaly-detection metrics as pure torch functions.

Definitions
-----------
* ROC AUC and average precision follow scikit-learn exactly:
  ``sklearn.metrics._ranking._binary_clf_curve`` (one point per *distinct* score, ties
  handled by keeping the last index of each run of equal scores), ``roc_auc_score``
  (trapezoidal area under the ROC curve) and ``average_precision_score``
  (``AP = sum_n (R_n - R_{n-1}) P_n``, no interpolation).
* F1-max is the maximum F1 over all distinct thresholds of the precision-recall curve.
* PRO / AUPRO follow the official MVTec AD evaluation code
  (``generic_util.compute_pro`` and ``generic_util.trapezoid`` of
  "mvtec_ad_evaluation", Bergmann et al., IJCV 2021): all test images are pooled, the FPR is
  the fraction of all normal pixels above the threshold, the PRO is the mean over *all*
  ground-truth connected components (8-connectivity) of the fraction of the component's
  pixels above the threshold, and the AUPRO is the area up to ``fpr_limit`` (interpolated at
  the limit) divided by ``fpr_limit``.

Conventions
-----------
* Scores are only ever *ranked*: no sigmoid or other squashing is applied, so any strictly
  increasing transform of the scores leaves every metric unchanged.
* Targets / masks are binarised as ``bool`` if already boolean, else ``> 0.5`` (so 0/1, 0/255
  and bilinearly resized masks all work).
* All accumulations are in float64; the results are float64 scalar tensors on the device of
  the inputs. Undefined cases (a single class, no defect region, no normal pixel) return
  ``nan`` and emit an :class:`UndefinedMetricWarning` instead of raising.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = [
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "connected_components",
    "f1_max",
    "pro_curve",
    "pro_rd4ad",
    "pro_stfpm",
]


class UndefinedMetricWarning(UserWarning):
    """The metric is undefined for the given input (e.g. a single class) and is ``nan``."""


def _nan(device: torch.device, reason: str) -> Tensor:
    # stacklevel=3 points the warning at the caller of the public function.
    warnings.warn(f"{reason}; returning nan.", UndefinedMetricWarning, stacklevel=3)
    return torch.tensor(float("nan"), dtype=torch.float64, device=device)


def _binarize(target: Tensor) -> Tensor:
    return target if target.dtype == torch.bool else target > 0.5


def _ranked_scores(scores: Tensor) -> Tensor:
    """Scores as a floating tensor whose *order and ties* are exactly those of the input."""
    if not scores.is_floating_point():
        # Integers up to 2**53 are exact in float64.
        return scores.to(torch.float64)
    if scores.dtype in (torch.float16, torch.bfloat16):
        return scores.to(torch.float32)  # exact widening; sort kernels prefer float32
    return scores


def _check_scores(scores: Tensor) -> None:
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; ranking metrics are undefined for NaN scores.")


def _last_of_runs(sorted_values: Tensor) -> Tensor:
    """Boolean mask of the last element of each run of equal values (one per threshold)."""
    keep = torch.ones_like(sorted_values, dtype=torch.bool)
    keep[:-1] = sorted_values[1:] != sorted_values[:-1]
    return keep


def binary_clf_curve(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """False/true positive counts for every distinct threshold, descending.

    Same semantics as ``sklearn.metrics._ranking._binary_clf_curve`` without sample weights:
    ``tps[i]`` / ``fps[i]`` are the numbers of positives / negatives with
    ``score >= thresholds[i]``.

    Args:
        scores: anomaly scores, any shape (flattened).
        targets: binary ground truth, same number of elements.

    Returns:
        ``(fps, tps, thresholds)``: float64 counts and the distinct thresholds (in the
        floating dtype of ``scores``), in decreasing order of threshold.
    """
    scores = _ranked_scores(scores.detach().reshape(-1))
    targets = _binarize(targets.detach().reshape(-1))
    if scores.numel() != targets.numel():
        raise ValueError(
            f"scores and targets differ in size: {scores.numel()} vs {targets.numel()}."
        )
    _check_scores(scores)
    sorted_scores, order = torch.sort(scores, descending=True)
    keep = _last_of_runs(sorted_scores)
    # Cumulative counts in float64: exact for any realistic number of elements.
    tps = torch.cumsum(targets[order], dim=0, dtype=torch.float64)[keep]
    # Index + 1 = number of elements at or above the threshold.
    fps = torch.arange(1, scores.numel() + 1, device=scores.device, dtype=torch.float64)[keep]
    fps = fps - tps
    return fps, tps, sorted_scores[keep]


def auroc(scores: Tensor, targets: Tensor) -> Tensor:
    """Exact ROC AUC (trapezoidal over distinct thresholds); equals ``roc_auc_score``.

    Returns ``nan`` with an :class:`UndefinedMetricWarning` if only one class is present.
    """
    fps, tps, _ = binary_clf_curve(scores, targets)
    if tps.numel() == 0 or tps[-1] == 0 or fps[-1] == 0:
        return _nan(scores.device, "AUROC is undefined when only one class is present")
    zero = fps.new_zeros(1)
    # Prepend (0, 0): the curve starts with nothing predicted positive.
    fpr = torch.cat([zero, fps / fps[-1]])
    tpr = torch.cat([zero, tps / tps[-1]])
    # Ties form a diagonal segment, which the trapezoid rule scores as 1/2 (tie-correct).
    return torch.trapezoid(tpr, fpr)


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n``; equals ``average_precision_score``.

    Returns ``nan`` with an :class:`UndefinedMetricWarning` if there is no positive (recall
    is undefined). With no negative the value is 1, as in scikit-learn.
    """
    fps, tps, _ = binary_clf_curve(scores, targets)
    if tps.numel() == 0 or tps[-1] == 0:
        return _nan(scores.device, "Average precision is undefined without positive targets")
    precision = tps / (tps + fps)  # tps + fps >= 1 at every threshold
    recall = tps / tps[-1]
    recall_prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return torch.sum((recall - recall_prev) * precision)


def f1_max(scores: Tensor, targets: Tensor) -> Tensor:
    """Maximum F1 score over all distinct thresholds of the precision-recall curve.

    Returns ``nan`` with an :class:`UndefinedMetricWarning` if there is no positive.
    """
    fps, tps, _ = binary_clf_curve(scores, targets)
    if tps.numel() == 0 or tps[-1] == 0:
        return _nan(scores.device, "F1-max is undefined without positive targets")
    # F1 = 2 TP / (2 TP + FP + FN) with FN = P - TP; the denominator is >= P > 0.
    f1 = 2.0 * tps / (tps + fps + tps[-1])
    return f1.max()


def _as_maps(x: Tensor, name: str) -> Tensor:
    """Bring (H,W), (N,H,W) or (N,1,H,W) to (N,H,W)."""
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim == 4 and x.shape[1] == 1:
        return x.squeeze(1)
    if x.ndim != 3:
        raise ValueError(f"{name} must be (H,W), (N,H,W) or (N,1,H,W); got {tuple(x.shape)}.")
    return x


def connected_components(masks: Tensor) -> tuple[Tensor, int]:
    """Label the 8-connected components of a batch of binary masks.

    Uses ``scipy.ndimage.label`` with the structure ``np.ones((3, 3))`` of the MVTec AD
    evaluation code. The batch is labelled as one 3-D volume whose structuring element does
    not connect neighbouring images, so region ids are unique across the batch.

    Args:
        masks: (N,H,W), (N,1,H,W) or (H,W) binary masks.

    Returns:
        ``(labels, num_regions)``: int64 labels of shape (N,H,W) on the device of ``masks``
        (0 = background, regions 1..num_regions) and the total number of regions.
    """
    masks = _binarize(_as_maps(masks.detach(), "masks"))
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within an image, nothing across images
    labels, num_regions = ndimage.label(masks.cpu().numpy(), structure=structure)
    return torch.from_numpy(labels).to(device=masks.device, dtype=torch.long), int(num_regions)


def _prepare_maps(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    maps = _as_maps(maps.detach(), "maps")
    masks = _as_maps(masks.detach(), "masks")
    if maps.shape != masks.shape:
        raise ValueError(
            f"maps and masks differ in shape: {tuple(maps.shape)} vs {tuple(masks.shape)}."
        )
    return maps, masks


def _pro_curve(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor] | str:
    """The PRO curve, or the reason why it is undefined."""
    maps, masks = _prepare_maps(maps, masks)
    labels, num_regions = connected_components(masks)
    labels = labels.reshape(-1)
    scores = _ranked_scores(maps.reshape(-1))
    _check_scores(scores)
    normal = labels == 0
    num_normal = int(normal.sum())
    if num_regions == 0:
        return "AUPRO is undefined without any anomalous region in the masks"
    if num_normal == 0:
        return "AUPRO is undefined without any normal pixel in the masks"

    # Each pixel of region r moves the PRO by 1 / (|r| * R), so every region weighs equally.
    sizes = torch.bincount(labels, minlength=num_regions + 1).to(torch.float64)
    region_weight = 1.0 / (sizes * num_regions)
    region_weight[0] = 0.0  # normal pixels do not move the PRO
    sorted_scores, order = torch.sort(scores, descending=True)
    keep = _last_of_runs(sorted_scores)
    del sorted_scores
    labels = labels[order]
    del order
    # FPR from exact integer counts; PRO as a float64 cumulative sum of per-pixel weights.
    fpr = torch.cumsum(labels == 0, dim=0, dtype=torch.float64)[keep] / num_normal
    pro = torch.cumsum(region_weight[labels], dim=0)[keep]
    # As in the reference code: cumulative-sum round-off must not push the curve above 1.
    fpr.clamp_(max=1.0)
    pro.clamp_(max=1.0)
    zero, one = fpr.new_zeros(1), fpr.new_ones(1)
    return torch.cat([zero, fpr, one]), torch.cat([zero, pro, one])


def pro_curve(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-region-overlap curve over all images jointly (MVTec AD definition).

    One point per distinct score (the last point of each run of equal scores, which accounts
    for every pixel at that threshold), preceded by (0, 0) and followed by (1, 1).

    Args:
        maps: (N,H,W), (N,1,H,W) or (H,W) anomaly maps.
        masks: binary ground-truth masks of the same shape.

    Returns:
        ``(fpr, pro)``: float64 tensors, non-decreasing in ``fpr``. Empty tensors with an
        :class:`UndefinedMetricWarning` if there is no defect region or no normal pixel.
    """
    curve = _pro_curve(maps, masks)
    if isinstance(curve, str):
        warnings.warn(f"{curve}; returning an empty curve.", UndefinedMetricWarning, stacklevel=2)
        empty = torch.empty(0, dtype=torch.float64, device=maps.device)
        return empty, empty.clone()
    return curve


def aupro(maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> Tensor:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition).

    Trapezoid rule over the exact :func:`pro_curve`; when ``fpr_limit`` is not a curve point,
    the curve is linearly interpolated at ``fpr_limit``. The area is divided by ``fpr_limit``,
    so a perfect map scores 1. Returns ``nan`` with an :class:`UndefinedMetricWarning` if
    there is no defect region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}.")
    curve = _pro_curve(maps, masks)
    if isinstance(curve, str):
        return _nan(maps.device, curve)
    fpr, pro = curve
    inside = fpr <= fpr_limit  # a prefix, since fpr is non-decreasing and fpr[0] = 0
    x, y = fpr[inside], pro[inside]
    area = torch.trapezoid(y, x)
    n_inside = x.numel()
    if x[-1] < fpr_limit:
        # The next point lies beyond the limit (fpr ends at 1 >= fpr_limit): add the strip
        # from the last point inside up to the limit, with the PRO interpolated there.
        x0, x1 = fpr[n_inside - 1], fpr[n_inside]
        y0, y1 = pro[n_inside - 1], pro[n_inside]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area = area + 0.5 * (y0 + y_lim) * (fpr_limit - x0)
    return area / fpr_limit


# --- The papers' own PRO computations -------------------------------------------------------
# Both official codes threshold the maps at a fixed number of evenly spaced values instead of
# at every distinct score. For a threshold grid ``t`` (ascending) the number of pixels of each
# region with ``map > t_k`` follows from one ``searchsorted`` per pixel: ``idx = #{k: t_k < v}``
# is the number of thresholds a pixel of value ``v`` exceeds. Counting ``idx`` per region with
# ``bincount`` gives every region's above-threshold counts at all thresholds at once, exactly
# (float64 comparisons, integer counts), in O(pixels * log(thresholds)) and image by image.


def _above_counts(
    values: np.ndarray, labels: np.ndarray, num_labels: int, thresholds: np.ndarray
) -> np.ndarray:
    """(num_labels, T): per label, the number of pixels with ``value > thresholds[k]``.

    ``thresholds`` must be ascending; ``values`` float64, ``labels`` in ``[0, num_labels)``.
    """
    num_thresholds = thresholds.size
    exceeded = np.searchsorted(thresholds, values, side="left")  # thresholds strictly below v
    counts = np.bincount(
        labels * (num_thresholds + 1) + exceeded, minlength=num_labels * (num_thresholds + 1)
    ).reshape(num_labels, num_thresholds + 1)
    # Pixels above t_k are those exceeding at least k + 1 thresholds.
    at_least = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    return at_least[:, 1:]


def _sklearn_auc(x: np.ndarray, y: np.ndarray) -> float:
    """``sklearn.metrics.auc``: trapezoid area of a monotonic curve, either direction."""
    if x.size < 2:
        return float("nan")
    dx = np.diff(x)
    direction = -1.0 if np.any(dx < 0) and np.all(dx <= 0) else 1.0
    if np.any(dx < 0) and not np.all(dx <= 0):
        raise ValueError("x is neither increasing nor decreasing")
    return float(direction * np.trapezoid(y, x))


def _maps_masks_numpy(maps: Tensor, masks: Tensor) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = _prepare_maps(maps, masks)
    _check_scores(maps)
    return maps.cpu().numpy(), _binarize(masks).cpu().numpy()


def pro_rd4ad(
    maps: Tensor, masks: Tensor, num_thresholds: int = 200, fpr_limit: float = 0.3
) -> Tensor:
    """The PRO of RD4AD's official ``test.py`` (``compute_pro``), as published by RD4AD/NFERD.

    For each test image with a defect region, on its own: thresholds
    ``np.arange(min, max, (max - min) / num_thresholds)`` of that image's map; at each, the
    mean over the image's 8-connected regions of the fraction of region pixels with
    ``map > t``, and the FPR over the image's normal pixels; the points with
    ``FPR < fpr_limit`` kept, their FPR divided by its maximum, and the trapezoid area
    (``sklearn.metrics.auc``). The result is the mean over those images (normal images do not
    count). Returns ``nan`` with an :class:`UndefinedMetricWarning` if no image has a defect
    region; an image whose map is constant (no threshold grid) or that has no normal pixel
    (the official code fails on both) is left out with a warning.
    """
    values, defects = _maps_masks_numpy(maps, masks)
    areas, skipped = [], 0
    for image, defect in zip(values, defects, strict=True):
        if not defect.any():
            continue
        labels, num_regions = ndimage.label(defect, structure=np.ones((3, 3), dtype=bool))
        image = image.astype(np.float64).reshape(-1)
        labels = labels.reshape(-1)
        low, high = image.min(), image.max()
        if not high > low or defect.all():
            skipped += 1
            continue
        thresholds = np.arange(low, high, (high - low) / num_thresholds)
        above = _above_counts(image, labels, num_regions + 1, thresholds)
        sizes = np.bincount(labels, minlength=num_regions + 1).astype(np.float64)
        pro = (above[1:] / sizes[1:, None]).mean(axis=0)
        fpr = above[0] / sizes[0]
        keep = fpr < fpr_limit
        fpr, pro = fpr[keep], pro[keep]
        with np.errstate(invalid="ignore", divide="ignore"):
            fpr = fpr / fpr.max() if fpr.size else fpr
        areas.append(_sklearn_auc(fpr, pro))
    if skipped:
        warnings.warn(
            f"pro_rd4ad: {skipped} anomalous image(s) left out (constant map or no normal pixel)",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    if not areas:
        return _nan(maps.device, "PRO (RD4AD) is undefined without any anomalous region")
    return torch.tensor(float(np.mean(areas)), dtype=torch.float64, device=maps.device)


def pro_stfpm(
    maps: Tensor, masks: Tensor, num_thresholds: int = 4000, fpr_limit: float = 0.3
) -> Tensor:
    """The PRO of STFPM's official ``evaluate.py`` (``pro``), as published by STFPM.

    All test images jointly: thresholds ``max - k * (max - min) / num_thresholds`` for
    ``k = 0 .. num_thresholds - 1`` of all maps; at each, the mean over *all* 8-connected
    regions of all images of the fraction of region pixels with ``map > t``, and the FPR over
    all normal pixels; the points with ``FPR <= fpr_limit`` kept, FPR and PRO each min-max
    rescaled to [0, 1], and the trapezoid area (``sklearn.metrics.auc``). Returns ``nan``
    with an :class:`UndefinedMetricWarning` without a defect region, a normal pixel or a
    spread of the map values.
    """
    values, defects = _maps_masks_numpy(maps, masks)
    if not defects.any():
        return _nan(maps.device, "PRO (STFPM) is undefined without any anomalous region")
    if defects.all():
        return _nan(maps.device, "PRO (STFPM) is undefined without any normal pixel")
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return _nan(maps.device, "PRO (STFPM) is undefined for constant maps")
    delta = (high - low) / num_thresholds
    descending = np.float64(high) - np.arange(num_thresholds, dtype=np.float64) * delta
    ascending = descending[::-1].copy()
    normal_above = np.zeros(num_thresholds, dtype=np.int64)
    region_fractions = []
    structure = np.ones((3, 3), dtype=bool)
    for image, defect in zip(values, defects, strict=True):
        labels, num_regions = ndimage.label(defect, structure=structure)
        labels = labels.reshape(-1)
        above = _above_counts(
            image.astype(np.float64).reshape(-1), labels, num_regions + 1, ascending
        )
        normal_above += above[0]
        if num_regions:
            sizes = np.bincount(labels, minlength=num_regions + 1)[1:, None]
            region_fractions.append(above[1:] / sizes)
    fpr = (normal_above / np.count_nonzero(~defects))[::-1]
    pro = np.concatenate(region_fractions).mean(axis=0)[::-1]
    keep = fpr <= fpr_limit
    fpr, pro = fpr[keep], pro[keep]

    def rescale(x: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (x - x.min()) / (x.max() - x.min())

    return torch.tensor(
        _sklearn_auc(rescale(fpr), rescale(pro)), dtype=torch.float64, device=maps.device
    )
