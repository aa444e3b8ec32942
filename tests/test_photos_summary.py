"""experiments/photos/summary.py: every seed of a variants table is averaged over the same
categories, so the spread over seeds is not a spread over category sets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _summary():
    path = ROOT / "experiments" / "photos" / "summary.py"
    spec = importlib.util.spec_from_file_location("photos_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_grid_keeps_only_categories_every_kept_seed_has() -> None:
    full_grid = _summary().full_grid
    seed0 = {(c, 0) for c in ("a", "b", "c", "d")}
    partial_seed1 = {("a", 1), ("b", 1)}
    # 4 categories x 1 seed (4 pairs) against 2 x 2 (4 pairs): a tie goes to more seeds.
    assert full_grid(seed0 | partial_seed1) == {("a", 0), ("b", 0), ("a", 1), ("b", 1)}
    # 3 of 4 categories on seed 1: 3 x 2 = 6 pairs beat 4 x 1.
    three = partial_seed1 | {("c", 1)}
    assert full_grid(seed0 | three) == {(c, s) for c in "abc" for s in (0, 1)}
    assert full_grid(seed0) == seed0
    assert full_grid(set()) == set()


def test_a_variant_with_runs_still_to_do_leaves_the_mean_table_whole() -> None:
    summary = _summary()

    def run(model: str, category: str, seed: int) -> dict:
        return {"model": model, "category": category, "seed": seed}

    knn = [run("knn", c, s) for c in "ab" for s in (0, 1)]
    hkt = [run("hkt", c, s) for c in "ab" for s in (0, 1)]
    late = [run("hkt_both", "a", 0)]
    kept, note = summary.split_partial(knn + hkt + late)
    assert kept == knn + hkt
    assert "hkt_both (1 of 4 category/seed pairs)" in note
    assert summary.split_partial(knn + hkt) == (knn + hkt, "")


def test_the_layers_tables_put_each_run_beside_the_knn_line_on_its_own_stages(
    tmp_path, monkeypatch
) -> None:
    summary = _summary()
    monkeypatch.setattr(summary, "RESULTS", tmp_path)

    def write(stage: str, model: str, layers: list[int], seed: int, auroc: float) -> None:
        folder = tmp_path / stage / f"{model}_{layers[0]}_flower_seed{seed}"
        folder.mkdir(parents=True)
        metrics = {"model": model, "category": "flower", "seed": seed, "image_auroc": auroc}
        metrics |= {m: 0.5 for m in ("pixel_auroc", "pixel_aupro", "pixel_ap")}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "config.yaml").write_text(f"model:\n  layers: {layers}\n")

    for seed in (0, 1):
        write("headline", "rd", [1, 2, 3], seed, 0.70)
        write("headline", "knn", [1, 2, 3], seed, 0.80)
        write("headline", "stfpm", [1, 2, 3], seed, 0.99)  # not a model of the stage
        write("layers", "rd", [2, 3, 4], seed, 0.90)
        write("layers", "knn", [2, 3, 4], seed, 0.85)
    write("headline", "rd", [1, 2, 3], 2, 0.10)  # a seed the stage has not run yet
    text = "\n".join(summary.layers(summary.runs("headline")))
    low, high = text.split("Teacher stages [2, 3, 4]:")
    assert "| rd4ad | 2 | 1 | 70.00 ± 0.00 |" in low and "| -10.00 |" in low
    assert "| rd4ad | 2 | 1 | 90.00 ± 0.00 |" in high and "| +5.00 |" in high
    assert "stfpm" not in text
    assert "| knn [layers=[2, 3, 4]] | 85.00 ± 0.00 |" in high  # per category, named by stages
