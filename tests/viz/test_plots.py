"""The figures: areas in the curve legends, colour bars on the heatmaps, titles that do not
overlap, every requested file format, and the colour bar of a run's heatmap panels."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer

from kdad.viz.overlay import colorize, heatmap_panel
from kdad.viz.plots import (
    bars_figure,
    check_formats,
    curves_figure,
    heatmap_grid,
    heatmap_grid_figure,
    plot_curves,
)

LONG = "hkt[model.cbam=False,model.alignment=cross,model.projectors=true]"


def _curves(power: float) -> dict:
    fpr = np.linspace(0, 1, 21)
    return {
        "image_roc": {"fpr": fpr.tolist(), "tpr": (fpr**power).tolist()},
        "pixel_roc": {"fpr": fpr.tolist(), "tpr": (fpr**power).tolist()},
        "pixel_pro": {"fpr": fpr.tolist(), "pro": (fpr**power).tolist()},
    }


def _samples(seed: int, paths: list[str]) -> dict:
    rng = np.random.default_rng(seed)
    n = len(paths)
    mask = np.zeros((n, 16, 16), dtype=bool)
    mask[0, 4:8, 4:8] = True  # the first image is anomalous
    return {
        "image": rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
        "mask": mask,
        "map": (rng.random((n, 16, 16)) * (seed + 1)).astype(np.float32),
        "path": np.array(paths),
    }


def _draw(fig) -> None:
    """Lay the figure out and draw it as saving does (on an Agg canvas)."""
    FigureCanvasAgg(fig).draw()


def _text_boxes(fig, texts) -> list:
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_text() and t.get_visible()]


def _overlapping(boxes) -> list:
    return [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]


def test_curve_legends_show_each_runs_area_and_the_aupro_limit() -> None:
    areas = {
        "rd4ad": {"image_auroc": 0.97123, "pixel_auroc": 0.9, "pixel_aupro": 0.9312},
        "stfpm": {"image_auroc": 0.8, "pixel_auroc": float("nan"), "pixel_aupro": 0.7},
    }
    fig = curves_figure(
        {"rd4ad": _curves(0.3), "stfpm": _curves(0.6)}, areas, "mvtec / bottle", 0.3
    )
    image_roc, pixel_roc, pro = fig.axes[:3]
    legend = [t.get_text() for t in image_roc.get_legend().get_texts()]
    assert legend == ["rd4ad: AUROC 97.12 %", "stfpm: AUROC 80.00 %"]
    assert [t.get_text() for t in pixel_roc.get_legend().get_texts()][1] == "stfpm: AUROC –"
    assert pro.get_legend().get_texts()[0].get_text() == "rd4ad: AUPRO 93.12 %"
    assert pro.get_title() == "PRO (AUPRO: FPR ≤ 0.3)"
    assert any(list(line.get_xdata()) == [0.3, 0.3] for line in pro.get_lines())  # the limit
    _draw(fig)
    titles = [fig._suptitle, *(ax.title for ax in fig.axes)]  # no public suptitle artist
    assert not _overlapping(_text_boxes(fig, titles))


def test_heatmap_grid_has_a_colour_bar_per_model_on_that_models_scale() -> None:
    paths = ["bottle/test/good/0.png", "bottle/test/crack/1.png", "bottle/test/good/2.png"]
    paths_b = [paths[1], paths[0], "bottle/test/good/9.png"]  # another order, one not shared
    samples = {"rd4ad": _samples(0, paths), LONG: _samples(4, paths_b)}
    samples["rd4ad"]["mask"] = np.roll(
        samples["rd4ad"]["mask"], 1, axis=0
    )  # the crack is anomalous
    fig = heatmap_grid_figure(samples)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2
    shown = {"rd4ad": [1, 0], LONG: [0, 1]}  # the rows of the two shared images, anomalous first
    for bar, model in zip(bars, samples, strict=True):
        maps = samples[model]["map"][shown[model]]
        assert bar.get_xlim() == pytest.approx((maps.min(), maps.max()))  # horizontal bar
    grid = np.array([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]).reshape(2, 4)
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["crack/1.png", "good/0.png"]
    _draw(fig)
    titles = [ax.title for ax in grid[0]]
    assert "\n" in titles[3].get_text()  # the long label is wrapped ...
    assert not _overlapping(_text_boxes(fig, titles))  # ... and the titles stay apart


def test_bar_titles_legend_and_ticks_do_not_overlap() -> None:
    rows = [
        {
            "model": model,
            "data": "mvtec",
            "category": category,
            "image_auroc_mean": 0.9,
            "image_auroc_std": float("nan") if model == "rd4ad" else 0.01,
            "pixel_auroc_mean": 0.8,
            "pixel_auroc_std": 0.02,
            "pixel_aupro_mean": 0.7,
            "pixel_aupro_std": 0.03,
        }
        for model in ("rd4ad", LONG)
        for category in ("metal_nut", "toothbrush", "transistor")
    ]
    fig = bars_figure(rows)
    _draw(fig)
    texts = [fig._suptitle, *fig.legends[0].get_texts()]
    texts += [label for ax in fig.axes for label in [*ax.get_xticklabels(), ax.yaxis.label]]
    assert not _overlapping(_text_boxes(fig, texts))
    image = fig.axes[0]
    errorbars = [c for c in image.containers if isinstance(c, ErrorbarContainer)]
    assert len(errorbars) == 1  # the single-run model has no error bars, the other one has


def test_every_format_is_written_the_same_way_twice(tmp_path: Path) -> None:
    curves = {"rd4ad": _curves(0.5)}
    first = plot_curves(curves, tmp_path / "a" / "curves", formats=("svg", "pdf", "png"))
    assert [p.name for p in first] == ["curves.png", "curves.pdf", "curves.svg"]  # PNG first
    assert first[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first[1].read_bytes()[:5] == b"%PDF-" and b"<svg" in first[2].read_bytes()
    again = plot_curves(curves, tmp_path / "b" / "curves", formats=("pdf", "svg"))
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in first[1:]]
    assert not list(tmp_path.rglob(".curves*"))  # no temporary files left
    paths = ["x/good/0.png", "x/crack/1.png"]
    assert heatmap_grid({"rd4ad": _samples(0, paths)}, tmp_path / "h", formats=("pdf",)) == [
        tmp_path / "h.pdf"
    ]
    with pytest.raises(ValueError, match="unknown figure format 'jpg'"):
        check_formats(["png", "jpg"])


def test_a_runs_heatmap_panel_ends_with_a_colour_bar_of_its_scale() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    panel = heatmap_panel(image, np.zeros((64, 64)), rng.random((64, 64)), 0.25, 0.75)
    assert panel.shape[0] == 64 and panel.shape[1] > 3 * 64
    assert (panel[:, :64] == image).all()  # input | ground truth | overlay | bar
    bar = panel[:, 3 * 64 + 2]  # the gradient's first column: vmax on top, vmin at the bottom
    assert (bar[0] == colorize(np.array([[0.75]]), 0.25, 0.75)[0, 0]).all()
    assert (bar[-1] == colorize(np.array([[0.25]]), 0.25, 0.75)[0, 0]).all()
    assert panel[:, 3 * 64 + 14 :].any()  # the two ends are written beside it
