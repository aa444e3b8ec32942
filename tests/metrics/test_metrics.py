"""Tests of kdad.metrics against independent references.

References: scikit-learn (``roc_auc_score``, ``average_precision_score``,
``precision_recall_curve``, ``auc``), brute-force counting, and straightforward threshold-loop
PRO/AUPRO written here with per-image ``scipy.ndimage.label`` (MVTec AD definition, and the
PRO computations of the official RD4AD ``test.py`` and STFPM ``evaluate.py``). The code under
test is never its own reference.
"""

from __future__ import annotations

import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage
from sklearn.metrics import auc as sklearn_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torchmetrics import Metric

from kdad.metrics import (
    AUPRO,
    AUROC,
    METRIC_LEVEL,
    PRORD4AD,
    PROSTFPM,
    AveragePrecision,
    F1Max,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    build_metrics,
    connected_components,
    f1_max,
    pro_curve,
    pro_rd4ad,
    pro_stfpm,
)

EIGHT = np.ones((3, 3), dtype=int)  # MVTec AD evaluation code's structuring element
FOUR = ndimage.generate_binary_structure(2, 1)


# --------------------------------------------------------------------------- data


def _scores_targets(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 0.8 * y  # informative but imperfect
    if kind == "ties3":
        s = np.round(s).clip(-1, 1)  # 3 distinct values: heavy ties across classes
    elif kind == "ties10":
        s = np.round(s * 2) / 2
    elif kind == "rare_pos":
        y = rng.random(n) < 0.01
        y[0] = True
        s = rng.normal(size=n) + 1.5 * y
    elif kind == "int":
        s = rng.integers(0, 20, size=n) + 3 * y
    return s, y


def _t(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if dtype is None else t.to(dtype)


def _random_masks(n: int, h: int, w: int, seed: int, p_defect: float = 0.6) -> np.ndarray:
    """Masks with 0-4 blobs/rectangles per image; some images have no defect at all."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if rng.random() > p_defect:
            continue
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            dy, dx = rng.integers(1, h // 3), rng.integers(1, w // 3)
            masks[i, y : y + dy, x : x + dx] = True
        # a few isolated and diagonal single pixels: small regions weigh as much as big ones
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(1, h - 2), rng.integers(1, w - 2)
            masks[i, y, x] = True
            masks[i, y + 1, x + 1] = rng.random() < 0.5
    masks[0] = False  # at least one defect-free image
    masks[1, 2:6, 2:6] = True  # at least one defect
    return masks


def _structured_maps(masks: np.ndarray, seed: int, noise: float = 0.35) -> np.ndarray:
    """Maps correlated with the masks (blurred masks) plus noise: AUPRO strictly in (0.5, 1)."""
    rng = np.random.default_rng(seed)
    blurred = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 1.5, 1.5))
    return blurred + noise * rng.random(masks.shape)


# ------------------------------------------------------------------ references


def _ref_binary_clf_curve(s: np.ndarray, y: np.ndarray):
    thresholds = np.unique(s)[::-1]
    tps = np.array([(y & (s >= t)).sum() for t in thresholds], dtype=np.float64)
    fps = np.array([(~y & (s >= t)).sum() for t in thresholds], dtype=np.float64)
    return fps, tps, thresholds


def _ref_f1_max(s: np.ndarray, y: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


def _ref_pro_points(maps, masks, thresholds, structure=EIGHT):
    """(fpr, pro) at each threshold by direct counting; pixels ``>= t`` are positive."""
    region_pix, region_ids, n_regions = [], [], 0
    flat_offset = 0
    for m in masks:
        lab, n = ndimage.label(m, structure=structure)
        lab = lab.ravel()
        for k in range(1, n + 1):
            idx = np.flatnonzero(lab == k)
            region_pix.append(idx + flat_offset)
            region_ids.append(np.full(idx.size, n_regions))
            n_regions += 1
        flat_offset += lab.size
    pix, rid = np.concatenate(region_pix), np.concatenate(region_ids)
    sizes = np.bincount(rid, minlength=n_regions)
    flat_maps, normal = maps.ravel(), ~masks.ravel()
    normal_scores = flat_maps[normal]
    fprs, pros = [], []
    for t in thresholds:  # explicit threshold loop, no sorting or cumulative sums
        fprs.append(np.mean(normal_scores >= t))
        hit = flat_maps[pix] >= t
        pros.append(np.mean(np.bincount(rid, weights=hit, minlength=n_regions) / sizes))
    return np.array(fprs), np.array(pros)


def _ref_area(fprs: np.ndarray, pros: np.ndarray, limit: float) -> float:
    """Trapezoid area up to ``limit`` (curve interpolated at the limit) / limit."""
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


def _ref_aupro_grid(maps, masks, limit=0.3, n_thresholds=3000, structure=EIGHT) -> float:
    """Reference AUPRO on a fine descending threshold grid spanning the score range."""
    grid = np.linspace(maps.max(), maps.min(), n_thresholds)
    thresholds = np.concatenate([[np.inf], grid])  # +inf: nothing positive -> (0, 0)
    fprs, pros = _ref_pro_points(maps, masks, thresholds, structure)
    return _ref_area(fprs, pros, limit)


def _ref_pro_curve_exact(maps, masks):
    """Exact curve: (0,0), one point per distinct score (descending), (1,1)."""
    fprs, pros = _ref_pro_points(maps, masks, np.unique(maps)[::-1])
    return np.r_[0.0, fprs, 1.0], np.r_[0.0, pros, 1.0]


def _ref_regions(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected regions of one image."""
    lab, n = ndimage.label(mask, structure=EIGHT)
    return [lab == k for k in range(1, n + 1)]


def _ref_pro_rd4ad(maps: np.ndarray, masks: np.ndarray, num_th: int = 200) -> float:
    """RD4AD test.py's PRO, written out: per anomalous image, a threshold loop."""
    per_image = []
    for amap, mask in zip(maps.astype(np.float64), masks, strict=True):
        if not mask.any():
            continue
        regions = _ref_regions(mask)
        rows = []
        lo, hi = amap.min(), amap.max()
        for th in np.arange(lo, hi, (hi - lo) / num_th):
            binary = amap > th
            pro = np.mean([binary[r].sum() / r.sum() for r in regions])
            fpr = (binary & ~mask).sum() / (~mask).sum()
            rows.append((fpr, pro))
        fpr, pro = np.array(rows).T
        keep = fpr < 0.3
        per_image.append(sklearn_auc(fpr[keep] / fpr[keep].max(), pro[keep]))
    return float(np.mean(per_image))


def _ref_pro_stfpm(maps: np.ndarray, masks: np.ndarray, max_step: int = 4000) -> float:
    """STFPM evaluate.py's PRO, written out: one threshold loop over all images jointly."""
    maps = maps.astype(np.float64)
    regions = [(i, r) for i, m in enumerate(masks) for r in _ref_regions(m)]
    hi, lo = maps.max(), maps.min()
    delta = (hi - lo) / max_step
    fprs, pros = [], []
    for step in range(max_step):
        binary = maps > hi - step * delta
        pros.append(np.mean([binary[i][r].sum() / r.sum() for i, r in regions]))
        fprs.append((binary & ~masks).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= 0.3

    def rescale(x: np.ndarray) -> np.ndarray:
        return (x - x.min()) / (x.max() - x.min())

    return float(sklearn_auc(rescale(fprs[keep]), rescale(pros[keep])))


# ------------------------------------------------------------- image-level metrics


@pytest.mark.parametrize("kind", ["normal", "ties3", "ties10", "rare_pos", "int"])
def test_binary_clf_curve_matches_brute_force(kind: str) -> None:
    s, y = _scores_targets(kind, 500, seed=1)
    fps, tps, thr = binary_clf_curve(_t(s), _t(y))
    ref_fps, ref_tps, ref_thr = _ref_binary_clf_curve(s, y)
    np.testing.assert_array_equal(thr.numpy(), ref_thr)
    np.testing.assert_array_equal(tps.numpy(), ref_tps)
    np.testing.assert_array_equal(fps.numpy(), ref_fps)


@pytest.mark.parametrize("kind", ["normal", "ties3", "ties10", "rare_pos", "int"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auroc_and_ap_match_sklearn(kind: str, seed: int, dtype: torch.dtype) -> None:
    s, y = _scores_targets(kind, 2000, seed)
    scores = _t(s, dtype)
    s_ref = scores.double().numpy()  # sklearn sees exactly the values under test
    assert auroc(scores, _t(y)).item() == pytest.approx(roc_auc_score(y, s_ref), abs=1e-6)
    assert average_precision(scores, _t(y)).item() == pytest.approx(
        average_precision_score(y, s_ref), abs=1e-6
    )


@pytest.mark.parametrize("kind", ["normal", "ties10"])
def test_auroc_and_ap_match_sklearn_large(kind: str) -> None:
    s, y = _scores_targets(kind, 1_000_000, seed=3)
    scores, targets = _t(s, torch.float64), _t(y)
    for fn, ref in ((auroc, roc_auc_score), (average_precision, average_precision_score)):
        out = fn(scores, targets)
        assert out.dtype == torch.float64 and out.ndim == 0
        assert out.item() == pytest.approx(ref(y, s), abs=1e-6)


def test_auroc_tie_correct() -> None:
    # All scores equal: the ROC is the diagonal, AUROC = 0.5 exactly.
    assert auroc(torch.ones(10), torch.arange(10) % 2).item() == 0.5
    # Hand-computed: positive pairs (p, n) counted 1 if p > n, 1/2 if tied.
    s, y = torch.tensor([0.1, 0.5, 0.5, 0.9]), torch.tensor([0, 1, 0, 1])
    assert auroc(s, y).item() == pytest.approx((1 + 1 + 0.5 + 1) / 4)


@pytest.mark.parametrize("kind", ["normal", "ties3", "ties10", "rare_pos", "int"])
@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_precision_recall_curve(kind: str, seed: int) -> None:
    s, y = _scores_targets(kind, 3000, seed)
    assert f1_max(_t(s), _t(y)).item() == pytest.approx(_ref_f1_max(y=y, s=s), abs=1e-9)


def test_metrics_are_order_only_no_squashing() -> None:
    s, y = _scores_targets("normal", 4000, seed=5)
    # float64 so that these order-preserving maps create no new ties.
    huge = _t(50.0 + 200.0 * (s - s.min()))  # > 1: a sigmoid would saturate them to 1.0
    negative = _t(-1000.0 + 5.0 * s)
    minmax = (huge - huge.min()) / (huge.max() - huge.min())
    for fn in (auroc, average_precision, f1_max):
        values = [fn(x, _t(y)).item() for x in (huge, negative, minmax)]
        assert values == pytest.approx([values[2]] * 3, abs=1e-12)
    assert auroc(huge, _t(y)).item() == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert auroc(huge, _t(y)).item() > 0.6  # not 0.5: scores were not squashed into ties
    assert auroc(torch.sigmoid(huge), _t(y)).item() == 0.5  # what squashing would have done


# ------------------------------------------------------------ connected components


def test_connected_components_eight_connectivity_and_global_ids() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[0, 3, 3] = True  # diagonal chain: ONE region
    masks[0, 6, 6] = True  # separate
    masks[1, 0:2, 0:2] = True
    masks[1, 2, 2] = True  # touches the square only at a corner: same region
    masks[1, 5:7, 5:7] = True
    labels, n = connected_components(_t(masks))
    assert n == 4  # 2 + 2 + 0 (with 4-connectivity it would be 4 + 3)
    lab = labels.numpy()
    assert lab.dtype == np.int64 and lab.shape == masks.shape
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    assert not (set(np.unique(lab[0])) - {0}) & (set(np.unique(lab[1])) - {0})
    assert ((lab > 0) == masks).all()
    assert (lab[2] == 0).all()


def test_connected_components_match_per_image_scipy() -> None:
    masks = _random_masks(12, 24, 24, seed=4)
    labels, n = connected_components(_t(masks)[:, None])  # (N,1,H,W) accepted
    lab = labels.numpy()
    total = 0
    for img_lab, m in zip(lab, masks, strict=True):
        ref, k = ndimage.label(m, structure=EIGHT)
        total += k
        # Same partition up to renaming: (ours, ref) pairs are a bijection.
        pairs = np.unique(np.stack([img_lab.ravel(), ref.ravel()]), axis=1)
        assert pairs.shape[1] == len(np.unique(ref)) == len(np.unique(img_lab))
    assert n == total
    assert set(np.unique(lab)) == set(range(n + 1))


# --------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_curve_exact_points(seed: int) -> None:
    masks = _random_masks(6, 12, 12, seed)
    maps = np.round(_structured_maps(masks, seed), 2)  # rounding creates ties across classes
    fpr, pro = pro_curve(_t(maps), _t(masks))
    ref_fpr, ref_pro = _ref_pro_curve_exact(maps, masks)
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro.numpy(), ref_pro, rtol=0, atol=1e-12)
    for limit in (0.05, 0.3, 1.0):
        exact = _ref_area(ref_fpr, ref_pro, limit)
        assert aupro(_t(maps), _t(masks), limit).item() == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_threshold_grid_reference(seed: int) -> None:
    masks = _random_masks(16, 40, 40, seed)
    maps = _structured_maps(masks, seed)
    ref = _ref_aupro_grid(maps, masks)
    assert 0.55 < ref < 0.98  # a non-trivial value
    assert aupro(_t(maps, torch.float64), _t(masks)).item() == pytest.approx(ref, abs=1e-3)
    # float32 maps and uint8 0/255 masks (MVTec PNG style) give the same value
    out32 = aupro(_t(maps, torch.float32), _t(masks.astype(np.uint8) * 255))
    assert out32.item() == pytest.approx(ref, abs=1e-3)


def test_aupro_other_limits_match_reference() -> None:
    masks = _random_masks(10, 32, 32, seed=7)
    maps = _structured_maps(masks, seed=7, noise=0.6)
    for limit in (0.01, 0.1, 0.5, 1.0):
        ref = _ref_aupro_grid(maps, masks, limit=limit)
        assert aupro(_t(maps), _t(masks), fpr_limit=limit).item() == pytest.approx(ref, abs=1e-3)


def test_aupro_uses_eight_connectivity() -> None:
    # A big square and a single pixel touching its corner diagonally: one region (8-conn).
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:12, 2:12] = True
    masks[0, 12, 12] = True
    masks[1, 3, 3] = masks[1, 4, 4] = masks[1, 5, 5] = True  # diagonal chain, single pixels
    masks[1, 10:14, 10:14] = True
    rng = np.random.default_rng(0)
    maps = rng.random(masks.shape)
    maps[0, 2:12, 2:12] += 1.0  # the square is found, the corner pixel is not
    maps[1, 10:14, 10:14] += 1.0
    ref8 = _ref_aupro_grid(maps, masks, structure=EIGHT)
    ref4 = _ref_aupro_grid(maps, masks, structure=FOUR)
    assert abs(ref8 - ref4) > 0.1  # the case discriminates between connectivities
    assert aupro(_t(maps), _t(masks)).item() == pytest.approx(ref8, abs=1e-3)


def test_aupro_perfect_and_inverted_maps() -> None:
    masks = _random_masks(8, 16, 16, seed=2)
    for perfect in (masks * 5.0 + 2.0, masks + 0.5 * np.random.default_rng(0).random(masks.shape)):
        assert aupro(_t(perfect), _t(masks)).item() == pytest.approx(1.0, abs=1e-12)
        assert _ref_aupro_grid(perfect, masks) == pytest.approx(1.0, abs=1e-3)
    assert aupro(_t(-(masks * 5.0)), _t(masks)).item() == pytest.approx(0.0, abs=1e-12)


def test_aupro_exact_limit_point() -> None:
    # 10 normal pixels: fpr_limit = 0.3 = 3/10 is exactly a curve point (no interpolation).
    maps = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 10.0, 5.5]]])
    masks = torch.zeros_like(maps, dtype=torch.bool)
    masks[0, 0, 10] = True  # score 10: found first
    masks[0, 0, 11] = True  # adjacent (score 5.5): one region of 2 pixels
    ref = _ref_aupro_grid(maps.numpy(), masks.numpy())
    assert aupro(maps, masks).item() == pytest.approx(ref, abs=1e-3)
    # Hand computation: PRO = 1/2 on fpr [0, 0.4), 1 beyond; area to 0.3 = 0.15 / 0.3 = 0.5.
    assert aupro(maps, masks).item() == pytest.approx(0.5, abs=1e-12)


# ------------------------------------------------------------------- edge cases


def test_single_class_returns_nan_with_warning() -> None:
    s = torch.rand(50)
    for y in (torch.zeros(50), torch.ones(50)):
        with pytest.warns(UndefinedMetricWarning):
            assert torch.isnan(auroc(s, y))
    for fn in (average_precision, f1_max):
        with pytest.warns(UndefinedMetricWarning):
            assert torch.isnan(fn(s, torch.zeros(50)))
    # With only positives AP and F1 are defined (= 1), as in scikit-learn.
    assert average_precision(s, torch.ones(50)).item() == pytest.approx(
        average_precision_score(np.ones(50), s.numpy())
    )
    assert f1_max(s, torch.ones(50)).item() == 1.0


def test_aupro_undefined_cases() -> None:
    maps = torch.rand(3, 8, 8)
    with pytest.warns(UndefinedMetricWarning, match="anomalous region"):
        assert torch.isnan(aupro(maps, torch.zeros(3, 8, 8)))
    with pytest.warns(UndefinedMetricWarning, match="normal pixel"):
        assert torch.isnan(aupro(maps, torch.ones(3, 8, 8)))
    with pytest.warns(UndefinedMetricWarning):
        fpr, pro = pro_curve(maps, torch.zeros(3, 8, 8))
    assert fpr.numel() == pro.numel() == 0


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="size"):
        auroc(torch.rand(4), torch.ones(5))
    with pytest.raises(ValueError, match="shape"):
        aupro(torch.rand(2, 8, 8), torch.ones(2, 8, 9))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(torch.rand(2, 8, 8), torch.ones(2, 8, 8), fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        AUPRO(fpr_limit=1.5)


# ------------------------------------------------------- the papers' PRO computations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_rd4ad_matches_official_definition(seed: int) -> None:
    masks = _random_masks(6, 24, 24, seed=seed)
    maps = _structured_maps(masks, seed=seed)
    ours = pro_rd4ad(_t(maps), _t(masks))
    assert ours.dtype == torch.float64 and ours.ndim == 0
    assert ours.item() == pytest.approx(_ref_pro_rd4ad(maps, masks), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_stfpm_matches_official_definition(seed: int) -> None:
    masks = _random_masks(5, 20, 20, seed=seed)
    maps = _structured_maps(masks, seed=seed)
    ours = pro_stfpm(_t(maps), _t(masks))
    assert ours.item() == pytest.approx(_ref_pro_stfpm(maps, masks), abs=1e-12)
    coarse = pro_stfpm(_t(maps), _t(masks), num_thresholds=300)
    assert coarse.item() == pytest.approx(_ref_pro_stfpm(maps, masks, 300), abs=1e-12)


def test_pro_definitions_differ_and_ties_are_exact() -> None:
    masks = _random_masks(8, 24, 24, seed=4)
    maps = _structured_maps(masks, seed=4, noise=0.6)
    values = [f(_t(maps), _t(masks)).item() for f in (aupro, pro_rd4ad, pro_stfpm)]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 1e-3
    # Heavily tied maps: thresholds falling on map values count ``map > t`` strictly.
    tied = np.round(maps * 4) / 4
    assert pro_rd4ad(_t(tied), _t(masks)).item() == pytest.approx(
        _ref_pro_rd4ad(tied, masks), abs=1e-12
    )
    assert pro_stfpm(_t(tied), _t(masks), 200).item() == pytest.approx(
        _ref_pro_stfpm(tied, masks, 200), abs=1e-12
    )


def test_pro_papers_undefined_cases() -> None:
    normal = np.zeros((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random((2, 8, 8))
    for fn in (pro_rd4ad, pro_stfpm):
        with pytest.warns(UndefinedMetricWarning):
            assert torch.isnan(fn(_t(maps), _t(normal)))


@pytest.mark.parametrize(("cls", "fn"), [(PRORD4AD, pro_rd4ad), (PROSTFPM, pro_stfpm)])
def test_pro_paper_metrics_batches_equal_one_shot(cls, fn) -> None:
    masks = _random_masks(10, 20, 20, seed=6)
    maps = _structured_maps(masks, seed=6)
    metric = cls()
    for sl in (slice(0, 3), slice(3, 9), slice(9, 10)):
        metric.update(_t(maps[sl], torch.float32)[:, None], _t(masks[sl])[:, None])
    expected = fn(_t(maps, torch.float32), _t(masks)).item()
    assert metric.compute().item() == pytest.approx(expected, abs=1e-12)


def test_states_on_cpu_same_values() -> None:
    masks = _random_masks(6, 16, 16, seed=3)
    maps = _t(_structured_maps(masks, seed=3), torch.float32)
    on_host, plain = build_metrics(), build_metrics(states_on_cpu=False)
    assert all(m.compute_on_cpu for m in on_host.values())
    for metrics in (on_host, plain):
        for name, metric in metrics.items():
            if METRIC_LEVEL[name] == "image":
                metric.update(maps.amax(dim=(1, 2)), _t(masks.any(axis=(1, 2))))
            else:
                metric.update(maps[:3], _t(masks[:3]))
                metric.update(maps[3:], _t(masks[3:]))
    for name in on_host:
        assert on_host[name].compute().item() == plain[name].compute().item(), name


# ---------------------------------------------------------------- Metric classes


@pytest.mark.parametrize(
    ("cls", "ref"),
    [
        (AUROC, roc_auc_score),
        (AveragePrecision, average_precision_score),
        (F1Max, lambda y, s: _ref_f1_max(s, y)),
    ],
)
def test_score_metrics_batches_equal_one_shot(cls, ref) -> None:
    masks = _random_masks(12, 16, 16, seed=3)
    maps = _structured_maps(masks, seed=3)
    metric = cls()
    for sl in (slice(0, 5), slice(5, 6), slice(6, 12)):  # uneven batches, (N,1,H,W) input
        metric.update(_t(maps[sl], torch.float32)[:, None], _t(masks[sl])[:, None])
    out = metric.compute()
    assert out.dtype == torch.float64 and out.ndim == 0
    fn = {AUROC: auroc, AveragePrecision: average_precision, F1Max: f1_max}[cls]
    one_shot = fn(_t(maps, torch.float32), _t(masks))
    assert out.item() == pytest.approx(one_shot.item(), abs=1e-12)
    s32 = _t(maps, torch.float32).double().numpy().ravel()  # the float32 values stored
    assert out.item() == pytest.approx(ref(masks.ravel(), s32), abs=1e-6)


def test_aupro_metric_batches_equal_one_shot() -> None:
    masks = _random_masks(12, 24, 24, seed=5)
    maps = _structured_maps(masks, seed=5)
    metric = AUPRO()
    for sl in (slice(0, 4), slice(4, 11), slice(11, 12)):
        metric.update(_t(maps[sl], torch.float32)[:, None], _t(masks[sl])[:, None])
    out = metric.compute()
    assert out.dtype == torch.float64 and out.ndim == 0
    assert out.item() == pytest.approx(aupro(_t(maps, torch.float32), _t(masks)).item(), abs=1e-12)
    assert out.item() == pytest.approx(_ref_aupro_grid(maps, masks), abs=1e-3)


def test_metric_no_sigmoid_image_level() -> None:
    s, y = _scores_targets("normal", 1000, seed=8)
    far = 40.0 + 300.0 * (s - s.min())  # all > 1: a sigmoid would tie them all at 1.0
    values = []
    for x in (far, -far, (far - far.min()) / (far.max() - far.min())):
        m = AUROC()
        m.update(_t(x, torch.float32)[:500], _t(y)[:500])
        m.update(_t(x, torch.float32)[500:], _t(y)[500:])
        values.append(m.compute().item())
    assert values[0] == pytest.approx(values[2], abs=1e-9)
    assert values[0] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert values[1] == pytest.approx(1.0 - values[0], abs=1e-9)  # order reversed


def test_metric_reset_and_detach() -> None:
    s_a, y_a = _scores_targets("normal", 300, seed=1)
    s_b, y_b = _scores_targets("ties10", 200, seed=2)
    m = AUROC()
    preds = _t(s_a, torch.float32).requires_grad_()
    m.update(preds * 2.0, _t(y_a))  # a non-leaf with a graph
    assert all(not p.requires_grad and p.grad_fn is None for p in m.preds)
    assert m.preds[0].dtype == torch.float32 and m.target[0].dtype == torch.uint8
    assert m.compute().item() == pytest.approx(roc_auc_score(y_a, s_a), abs=1e-6)
    m.reset()
    assert m.preds == [] and m.target == []
    m.update(_t(s_b), _t(y_b))
    assert m.compute().item() == pytest.approx(roc_auc_score(y_b, s_b), abs=1e-6)

    a = AUPRO()
    masks = _random_masks(4, 16, 16, seed=0)
    a.update(_t(_structured_maps(masks, 0)), _t(masks))
    a.reset()
    assert a.maps == [] and a.masks == []
    perfect = _t(masks * 1.0)
    a.update(perfect, _t(masks))
    assert a.compute().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("cls", [AUROC, AveragePrecision, F1Max, AUPRO, PRORD4AD, PROSTFPM])
def test_metric_compute_without_samples_is_nan(cls) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' own "compute before update" warning
        m = cls()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*called before the ``update``")
        with pytest.warns(UndefinedMetricWarning, match="without any samples"):
            assert torch.isnan(m.compute())


def test_build_metrics() -> None:
    a, b = build_metrics(), build_metrics()
    assert list(a) == [
        "image_auroc",
        "image_f1_max",
        "pixel_auroc",
        "pixel_aupro",
        "pixel_ap",
        "pixel_pro_rd4ad",
        "pixel_pro_stfpm",
    ]
    assert set(a) == set(METRIC_LEVEL)
    assert set(METRIC_LEVEL.values()) == {"image", "pixel"}
    assert all(METRIC_LEVEL[k].startswith(k.split("_")[0]) for k in a)
    assert all(isinstance(m, Metric) for m in a.values())
    assert all(a[k] is not b[k] for k in a)  # fresh instances
    assert isinstance(a["pixel_aupro"], AUPRO) and isinstance(a["image_f1_max"], F1Max)
    assert isinstance(a["pixel_ap"], AveragePrecision) and isinstance(a["image_auroc"], AUROC)
    assert isinstance(a["pixel_pro_rd4ad"], PRORD4AD)
    assert isinstance(a["pixel_pro_stfpm"], PROSTFPM)


# ---------------------------------------------------------------------------- DDP

_DDP_SPLIT = 5  # rank 0 gets images [0, 5), rank 1 gets [5, N): uneven on purpose


def _ddp_data() -> dict[str, np.ndarray]:
    masks = _random_masks(12, 20, 20, seed=11)
    maps = _structured_maps(masks, seed=11, noise=0.5)
    img_scores = maps.max(axis=(1, 2)) + 0.3 * np.random.default_rng(11).random(12)
    return {
        "maps": maps,
        "masks": masks,
        "img_scores": img_scores,
        "img_labels": masks.any(axis=(1, 2)),
    }


def _ddp_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        d = _ddp_data()
        sl = slice(0, _DDP_SPLIT) if rank == 0 else slice(_DDP_SPLIT, None)
        maps, masks = _t(d["maps"][sl], torch.float32), _t(d["masks"][sl])
        scores, labels = _t(d["img_scores"][sl]), _t(d["img_labels"][sl])
        metrics = build_metrics()
        for start in range(0, maps.shape[0], 3):  # several batches per rank
            b = slice(start, start + 3)
            for name, metric in metrics.items():
                if METRIC_LEVEL[name] == "image":
                    metric.update(scores[b], labels[b])
                else:
                    metric.update(maps[b], masks[b])
        results = {name: metric.compute().item() for name, metric in metrics.items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
def test_ddp_gather_equals_single_process(tmp_path: Path) -> None:
    try:
        port = _free_port()
    except OSError as exc:
        pytest.skip(f"cannot bind a local TCP port for the gloo rendezvous: {exc}")
    world_size, timeout_s = 2, 120.0
    ctx = mp.start_processes(
        _ddp_worker,
        args=(world_size, f"tcp://127.0.0.1:{port}", str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"DDP workers did not finish within {timeout_s:.0f} s")

    d = _ddp_data()
    maps32 = _t(d["maps"], torch.float32)
    s32 = maps32.double().numpy().ravel()  # values as stored by the metrics
    expected = {  # single process, all data, independent references
        "image_auroc": roc_auc_score(d["img_labels"], d["img_scores"]),
        "image_f1_max": _ref_f1_max(d["img_scores"], d["img_labels"]),
        "pixel_auroc": roc_auc_score(d["masks"].ravel(), s32),
        "pixel_ap": average_precision_score(d["masks"].ravel(), s32),
        "pixel_aupro": _ref_area(*_ref_pro_curve_exact(maps32.double().numpy(), d["masks"]), 0.3),
        "pixel_pro_rd4ad": _ref_pro_rd4ad(maps32.double().numpy(), d["masks"]),
        "pixel_pro_stfpm": _ref_pro_stfpm(maps32.double().numpy(), d["masks"]),
    }
    # The test is sensitive: each rank's local data alone gives a different AUPRO / AUROC.
    for sl in (slice(0, _DDP_SPLIT), slice(_DDP_SPLIT, None)):
        local = aupro(maps32[sl], _t(d["masks"][sl])).item()
        assert abs(local - expected["pixel_aupro"]) > 1e-3
        local = auroc(maps32[sl], _t(d["masks"][sl])).item()
        assert abs(local - expected["pixel_auroc"]) > 1e-4
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(results) == set(expected)
        for name, value in expected.items():
            assert results[name] == pytest.approx(value, abs=1e-6), (rank, name)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    masks = _random_masks(8, 24, 24, seed=9)
    maps = _t(_structured_maps(masks, seed=9), torch.float32)
    m = _t(masks)
    for fn in (auroc, average_precision, f1_max, aupro):
        out = fn(maps.cuda(), m.cuda())
        assert out.device.type == "cuda" and out.dtype == torch.float64
        assert out.item() == pytest.approx(fn(maps, m).item(), abs=1e-9)
    metric = AUPRO().cuda()
    metric.update(maps.cuda(), m.cuda())
    assert metric.compute().item() == pytest.approx(aupro(maps, m).item(), abs=1e-9)
