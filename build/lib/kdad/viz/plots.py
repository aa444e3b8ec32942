"""Plots a person would rather look at than read: curves, per-category bars, heatmap grids.

All figures are written atomically as PNG (matplotlib's Agg backend, no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from kdad.io.atomic import write_figure_atomic

METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pixel_aupro": "pixel AUPRO (FPR ≤ 0.3)",
}


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = ""
) -> Path:
    """Image ROC, pixel ROC and PRO curve of one run, side by side."""
    panels = [
        ("image_roc", "fpr", "tpr", "image ROC"),
        ("pixel_roc", "fpr", "tpr", "pixel ROC"),
        ("pixel_pro", "fpr", "pro", "PRO"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, xk, yk, name) in zip(axes, panels, strict=True):
        ax.set_title(name)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("PRO" if yk == "pro" else "true positive rate")
        if key in curves:
            ax.plot(curves[key][xk], curves[key][yk], lw=1.6)
        if key == "pixel_pro":
            ax.axvline(0.3, color="grey", ls="--", lw=1)  # AUPRO integrates up to FPR 0.3
        else:
            ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)
    fig.suptitle(title)
    return write_figure_atomic(fig, path)


def category_bars(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    metrics: Sequence[str] = tuple(METRIC_LABELS),
) -> Path:
    """Grouped bars: one group per category, one bar per model, one panel per metric (in %)."""
    cells = [r for r in rows if r["category"] != "mean"]
    categories = sorted({f"{r['data']}/{r['category']}" for r in cells})
    models = sorted({r["model"] for r in cells})
    width = 0.8 / max(len(models), 1)
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(max(6, 0.9 * len(categories) * max(1, len(models) / 2) + 2), 3 * len(metrics)),
    )
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics, strict=True):
        for i, model in enumerate(models):
            means, stds = [], []
            for cat in categories:
                row = next(
                    (
                        r
                        for r in cells
                        if r["model"] == model and f"{r['data']}/{r['category']}" == cat
                    ),
                    None,
                )
                means.append(100 * row[f"{metric}_mean"] if row else np.nan)
                stds.append(100 * row[f"{metric}_std"] if row else 0.0)
            x = np.arange(len(categories)) + (i - (len(models) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, label=model, capsize=2)
        ax.set_xticks(np.arange(len(categories)), categories, rotation=30, ha="right")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
        finite = [100 * r[f"{metric}_mean"] for r in cells if np.isfinite(r[f"{metric}_mean"])]
        ax.set_ylim(max(0.0, min(finite, default=0) - 5), 100.5)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return write_figure_atomic(fig, path)


def heatmap_grid(
    samples: Mapping[str, Mapping[str, Any]], path: str | Path, max_rows: int = 6
) -> Path | None:
    """Rows of test images: input, ground truth, then each model's map (own colour scale).

    ``samples`` maps a model label to the arrays a run's HeatmapWriter saved
    (``images/samples.npz``: image, mask, map, path). Only images every model saw are shown.
    """
    models = list(samples)
    if not models:
        return None
    common = [
        p for p in samples[models[0]]["path"] if all(p in list(samples[m]["path"]) for m in models)
    ]
    anomalous = [
        p
        for p in common
        if samples[models[0]]["mask"][list(samples[models[0]]["path"]).index(p)].any()
    ]
    shown = (anomalous + [p for p in common if p not in anomalous])[:max_rows]
    if not shown:
        return None
    cols = 2 + len(models)
    fig, axes = plt.subplots(
        len(shown), cols, figsize=(2.1 * cols, 2.1 * len(shown)), squeeze=False
    )
    scales = {
        m: (float(np.min(samples[m]["map"])), float(np.max(samples[m]["map"]))) for m in models
    }
    for r, sample_path in enumerate(shown):
        first = samples[models[0]]
        i = list(first["path"]).index(sample_path)
        axes[r, 0].imshow(first["image"][i])
        axes[r, 1].imshow(first["mask"][i], cmap="gray", vmin=0, vmax=1)
        for c, model in enumerate(models, start=2):
            j = list(samples[model]["path"]).index(sample_path)
            axes[r, c].imshow(
                samples[model]["map"][j], cmap="jet", vmin=scales[model][0], vmax=scales[model][1]
            )
        axes[r, 0].set_ylabel(
            Path(sample_path).parent.name + "/" + Path(sample_path).name, fontsize=7
        )
    for c, name in enumerate(["input", "ground truth", *models]):
        axes[0, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return write_figure_atomic(fig, path)
