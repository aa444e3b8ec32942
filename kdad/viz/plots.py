"""Figures ready for a paper: ROC and PRO curves, per-category bars, heatmap grids.

- Curves (:func:`plot_curves`): image ROC, pixel ROC and PRO side by side, one line per run,
  each legend entry with the area under its curve (AUROC; AUPRO up to the FPR limit, which a
  dashed line marks), so a figure is readable without the table beside it.
- Bars (:func:`category_bars`): one group per category, one bar per model, the error bar the
  std over seeds (none where a cell has a single run).
- Heatmap grids (:func:`heatmap_grid`): input, ground truth, then each model's map on the same
  test images; a model's maps share one colour scale, shown by a colour bar under its column.

Every figure uses matplotlib's constrained layout (titles, tick labels, legends and colour
bars do not overlap; long model labels are wrapped) and is written atomically once per format
of ``formats``: PNG for a quick look and W&B, PDF or SVG (vector, with fixed metadata so the
same figure gives the same file) for a paper. Figures are built on a plain
``matplotlib.figure.Figure``: no pyplot state, no display, no backend switch.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdad.io.atomic import atomic_path

# PNG for a quick look and W&B, PDF for LaTeX; "svg" is the other vector format on offer.
FIGURE_FORMATS = ("png", "pdf")
KNOWN_FORMATS = ("png", "pdf", "svg")
DPI = 150

# How tables and figures name metrics.json's keys.
METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pixel_aupro": "pixel AUPRO",
    "image_f1_max": "image F1-max",
    "pixel_ap": "pixel AP",
    "pixel_pro_rd4ad": "PRO (RD4AD code)",
    "pixel_pro_stfpm": "PRO (STFPM code)",
    "train_images_per_second": "train img/s",
    "test_images_per_second": "test img/s",
    "train_seconds": "train time (s)",
    "params_trainable": "trainable params",
}
BAR_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
# The three panels of a curve figure: curves.json key, x, y, title, the metric of its area.
CURVE_PANELS = (
    ("image_roc", "fpr", "tpr", "image ROC", "image_auroc"),
    ("pixel_roc", "fpr", "tpr", "pixel ROC", "pixel_auroc"),
    ("pixel_pro", "fpr", "pro", "PRO", "pixel_aupro"),
)


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """``formats`` as a tuple, or ValueError naming the unknown one and the known ones."""
    unknown = [f for f in formats if f not in KNOWN_FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"unknown figure format {unknown[0] if unknown else '(none)'!r}; "
            f"expected one or more of {', '.join(KNOWN_FORMATS)}"
        )
    return tuple(dict.fromkeys(formats))


def save_figure(fig: Any, stem: str | Path, formats: Sequence[str] = FIGURE_FORMATS) -> list[Path]:
    """``fig`` written atomically as ``<stem>.<format>`` for each format, in the order png,
    pdf, svg (so a PNG, where asked for, comes first)."""
    import matplotlib

    stem = Path(stem)
    # No date and a fixed SVG id salt: the same figure gives the same file (diffable results).
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}
    written = []
    chosen = check_formats(formats)
    for fmt in (f for f in KNOWN_FORMATS if f in chosen):
        target = stem.with_name(f"{stem.name}.{fmt}")
        with (
            matplotlib.rc_context({"svg.hashsalt": "kdad"}),
            atomic_path(target, suffix=f".{fmt}") as tmp,
        ):
            fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata.get(fmt))
        written.append(target)
    return written


def wrap_label(label: str, width: int = 24) -> str:
    """A long model label on several lines, broken after commas and brackets where possible
    (``hkt[model.cbam=False,model.alignment=cross]``)."""
    if len(label) <= width:
        return label
    pieces = label.replace(",", ",\0").replace("[", "[\0").split("\0")
    lines, line = [], ""
    for piece in pieces:
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    return "\n".join(part for line in lines for part in textwrap.wrap(line, width) or [""])


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def curves_figure(
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    areas: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
    fpr_limit: float | None = None,
) -> Any:
    """The figure of :func:`plot_curves` (not saved)."""
    areas = areas or {}
    fig = _figure(12, 4.2)
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (key, x_key, y_key, name, metric) in zip(axes, CURVE_PANELS, strict=True):
        area_name = "AUPRO" if metric == "pixel_aupro" else "AUROC"
        if metric == "pixel_aupro" and fpr_limit is not None:
            ax.axvline(fpr_limit, color="grey", ls="--", lw=1)  # AUPRO integrates up to here
            name = f"{name} (AUPRO: FPR ≤ {fpr_limit:g})"
        elif metric != "pixel_aupro":
            ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)  # chance
        for label, run_curves in curves.items():
            if key not in run_curves:
                continue
            area = areas.get(label, {}).get(metric)
            text = f"{area_name} {100 * area:.2f} %" if _finite(area) else f"{area_name} –"
            ax.plot(
                run_curves[key][x_key],
                run_curves[key][y_key],
                lw=1.6,
                label=f"{wrap_label(label, 28)}: {text}" if label else text,
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("per-region overlap" if y_key == "pro" else "true positive rate")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return fig


def plot_curves(
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    stem: str | Path,
    title: str = "",
    areas: Mapping[str, Mapping[str, float]] | None = None,
    fpr_limit: float | None = None,
    formats: Sequence[str] = FIGURE_FORMATS,
) -> list[Path]:
    """Image ROC, pixel ROC and PRO curves, one line per labelled run, side by side.

    ``curves`` maps a label (a model, or ``""``) to what a run's ``curves.json`` holds
    (``image_roc``/``pixel_roc``: ``fpr``, ``tpr``; ``pixel_pro``: ``fpr``, ``pro``);
    ``areas`` maps the same label to its ``image_auroc``, ``pixel_auroc`` and
    ``pixel_aupro`` (fractions), shown in the legend; ``fpr_limit`` is the AUPRO's FPR limit.
    Returns the files written (``<stem>.png`` first).
    """
    return save_figure(curves_figure(curves, areas, title, fpr_limit), stem, formats)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def bars_figure(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = BAR_METRICS) -> Any:
    """The figure of :func:`category_bars` (not saved)."""
    cells = [r for r in rows if r["category"] != "mean"]
    categories = sorted({f"{r['data']}/{r['category']}" for r in cells})
    models = sorted({r["model"] for r in cells})
    width = 0.8 / max(len(models), 1)
    fig = _figure(max(6, 0.9 * len(categories) * max(1, len(models) / 2) + 3), 3.2 * len(metrics))
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True))
    index = {(r["model"], f"{r['data']}/{r['category']}"): r for r in cells}
    for ax, metric in zip(axes, metrics, strict=True):
        for i, model in enumerate(models):
            found = [index.get((model, cat)) for cat in categories]
            means = [100 * r[f"{metric}_mean"] if r else np.nan for r in found]
            stds = [100 * r[f"{metric}_std"] if r else np.nan for r in found]
            x = np.arange(len(categories)) + (i - (len(models) - 1) / 2) * width
            ax.bar(x, means, width, label=wrap_label(model, 32))
            spread = np.array([_finite(s) for s in stds])  # no error bar for a single run
            if spread.any():
                ax.errorbar(
                    x[spread],
                    np.asarray(means)[spread],
                    yerr=np.asarray(stds)[spread],
                    fmt="none",
                    ecolor="black",
                    elinewidth=0.8,
                    capsize=2,
                )
        ax.set_xticks(np.arange(len(categories)), categories, rotation=30, ha="right")
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
        finite = [100 * r[f"{metric}_mean"] for r in cells if _finite(r[f"{metric}_mean"])]
        ax.set_ylim(max(0.0, min(finite, default=0) - 5), 100.5)
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside lower center",
        fontsize=8,
        ncols=min(len(models), 3),
    )
    fig.suptitle("mean over seeds; error bars: std over seeds", fontsize=9)
    return fig


def category_bars(
    rows: Sequence[Mapping[str, Any]],
    stem: str | Path,
    metrics: Sequence[str] = BAR_METRICS,
    formats: Sequence[str] = FIGURE_FORMATS,
) -> list[Path]:
    """Grouped bars: one group per category, one bar per model, one panel per metric (in %).

    ``rows`` are kdad-aggregate's rows (``model``, ``data``, ``category``, ``<metric>_mean``,
    ``<metric>_std``); mean rows are left out. Returns the files written.
    """
    return save_figure(bars_figure(rows, metrics), stem, formats)


def heatmap_grid_figure(samples: Mapping[str, Mapping[str, Any]], max_rows: int = 6) -> Any | None:
    """The figure of :func:`heatmap_grid` (not saved), or None without a common image."""
    models = list(samples)
    if not models:
        return None
    first = samples[models[0]]
    paths = {m: [str(p) for p in samples[m]["path"]] for m in models}
    common = [p for p in paths[models[0]] if all(p in paths[m] for m in models)]
    anomalous = [p for p in common if first["mask"][paths[models[0]].index(p)].any()]
    shown = (anomalous + [p for p in common if p not in anomalous])[:max_rows]
    if not shown:
        return None
    cols = 2 + len(models)
    fig = _figure(2.1 * cols, 2.1 * len(shown) + 0.9)
    axes = fig.subplots(len(shown), cols, squeeze=False)
    # One colour scale per model (its units are its own): min and max over the shown maps.
    rows_of = {m: [paths[m].index(p) for p in shown] for m in models}
    scales = {
        m: (
            float(np.min(samples[m]["map"][rows_of[m]])),
            float(np.max(samples[m]["map"][rows_of[m]])),
        )
        for m in models
    }
    images: dict[str, Any] = {}
    for r, sample_path in enumerate(shown):
        i = paths[models[0]].index(sample_path)
        axes[r, 0].imshow(first["image"][i])
        axes[r, 1].imshow(first["mask"][i], cmap="gray", vmin=0, vmax=1)
        for c, model in enumerate(models, start=2):
            j = paths[model].index(sample_path)
            images[model] = axes[r, c].imshow(
                samples[model]["map"][j], cmap="jet", vmin=scales[model][0], vmax=scales[model][1]
            )
        axes[r, 0].set_ylabel(
            f"{Path(sample_path).parent.name}/{Path(sample_path).name}", fontsize=7
        )
    for c, name in enumerate(["input", "ground truth", *models]):
        axes[0, c].set_title(wrap_label(name, 24), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for c, model in enumerate(models, start=2):
        bar = fig.colorbar(
            images[model], ax=axes[:, c], location="bottom", shrink=0.9, pad=0.01, aspect=12
        )
        bar.set_label("anomaly score", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def heatmap_grid(
    samples: Mapping[str, Mapping[str, Any]],
    stem: str | Path,
    max_rows: int = 6,
    formats: Sequence[str] = FIGURE_FORMATS,
) -> list[Path]:
    """Rows of test images: input, ground truth, then each model's map, a colour bar per model.

    ``samples`` maps a model label to the arrays a run's HeatmapWriter saved
    (``images/samples.npz``: image, mask, map, path). Only images every model saw are shown,
    anomalous ones first. Returns the files written (none without a common image).
    """
    fig = heatmap_grid_figure(samples, max_rows)
    return [] if fig is None else save_figure(fig, stem, formats)
