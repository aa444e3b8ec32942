"""kdad-aggregate on fake run folders (metrics.json, config.yaml, scores.csv written here, no
training): what the ± is, the mean rows' spread, pivots, per-defect rows, the three table
formats, user errors and the W&B summary run's columns."""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from wandb_reader import read_run

from kdad.cli.aggregate import main
from kdad.engine.aggregate import summarize


def make_run(
    root: Path,
    name: str,
    model: str,
    category: str,
    seed: int,
    image_auroc: float,
    config: dict | None = None,
    scores: list[tuple[str, int, float]] | None = None,
    data: str = "synthetic",
) -> Path:
    """A finished run's folder: metrics.json (image AUROC given, other metrics derived from
    it), config.yaml and, where given, scores.csv rows (defect_type, label, score)."""
    folder = root / name
    folder.mkdir(parents=True)
    metrics = {"model": model, "data": data, "category": category, "seed": seed}
    metrics |= {"image_auroc": image_auroc, "pixel_auroc": image_auroc - 0.05}
    metrics |= {"pixel_aupro": image_auroc - 0.1, "train_images_per_second": 100.0 + seed}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {"model": {"backbone": "resnet18", **(config or {})}, "seed": seed}
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    if scores is not None:
        lines = ["path,defect_type,label,score"]
        lines += [f"{d}/{i}.png,{d},{label},{s!r}" for i, (d, label, s) in enumerate(scores)]
        (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_cell_is_mean_and_sample_std_over_seeds_and_a_single_run_has_no_spread(
    tmp_path: Path,
) -> None:
    for seed, value in enumerate((0.90, 0.92, 0.97)):
        make_run(tmp_path, f"rd4ad{seed}", "rd4ad", "stripes", seed, value)
    make_run(tmp_path, "stfpm0", "stfpm", "stripes", 0, 0.80)
    text, notes = summarize(tmp_path, plots=False, metrics="image_auroc")
    std = 100 * statistics.stdev([0.90, 0.92, 0.97])  # n - 1 in the denominator: 3.61
    assert f"| rd4ad | synthetic | stripes | 3 | 93.00 ± {std:.2f} |" in text
    assert "| stfpm | synthetic | stripes | 1 | 80.00 |" in text  # one run: no ±
    assert "± 0.00" not in text
    assert "mean ± sample std (n − 1) over seeds" in text
    assert "a cell from a single run has no ±" in text
    assert text == (tmp_path / "aggregate.md").read_text()
    assert any("aggregate.tex" in note for note in notes)
    rows = {(r["model"], r["category"]): r for r in read_csv(tmp_path / "aggregate.csv")}
    rd4ad, stfpm = rows[("rd4ad", "stripes")], rows[("stfpm", "stripes")]
    assert float(rd4ad["image_auroc_mean"]) == pytest.approx(0.93)
    assert float(rd4ad["image_auroc_std"]) == pytest.approx(std / 100)
    assert (
        rd4ad["image_auroc_n"] == "3" and rd4ad["std_over"] == "seeds" and rd4ad["seeds"] == "0 1 2"
    )
    assert stfpm["image_auroc_std"] == "" and stfpm["image_auroc_n"] == "1"  # undefined, not 0


def test_the_mean_rows_spread_is_over_seeds_of_the_category_mean_or_over_categories(
    tmp_path: Path,
) -> None:
    values = {"stripes": (0.90, 0.94, 0.80), "dots": (0.70, 0.78)}  # seed 2 ran stripes only
    for category, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            make_run(tmp_path, f"{category}{seed}", "rd4ad", category, seed, value)
    category_means = [np.mean(v) for v in values.values()]
    per_seed_means = [np.mean([values["stripes"][s], values["dots"][s]]) for s in (0, 1)]

    text, _ = summarize(tmp_path, plots=False, metrics=["image_auroc"])
    (mean,) = [r for r in read_csv(tmp_path / "aggregate.csv") if r["category"] == "mean"]
    assert float(mean["image_auroc_mean"]) == pytest.approx(np.mean(category_means))
    assert float(mean["image_auroc_std"]) == pytest.approx(np.std(per_seed_means, ddof=1))
    assert mean["image_auroc_n"] == "2"  # the seeds that ran every category
    assert mean["std_over"] == "seeds, of the mean over categories" and mean["categories"] == "2"
    assert "the std over seeds of the per-seed mean over categories" in text
    expected = f"{100 * np.mean(category_means):.2f} ± {100 * np.std(per_seed_means, ddof=1):.2f}"
    assert f"| rd4ad | synthetic | **mean** | 5 | {expected} |" in text

    text, _ = summarize(tmp_path, plots=False, metrics="image_auroc", mean_spread="categories")
    (mean,) = [r for r in read_csv(tmp_path / "aggregate.csv") if r["category"] == "mean"]
    assert float(mean["image_auroc_std"]) == pytest.approx(np.std(category_means, ddof=1))
    assert mean["std_over"] == "categories"
    assert "the std over the categories' means" in text


def _two_models(root: Path) -> None:
    for seed, value in enumerate((0.90, 0.92, 0.97)):
        make_run(root, f"rd_metal{seed}", "rd4ad", "metal_nut", seed, value)
        make_run(root, f"rd_dots{seed}", "rd4ad", "dots", seed, value - 0.1)
    make_run(root, "stfpm_metal", "stfpm", "metal_nut", 0, 0.95)
    make_run(root, "stfpm_dots", "stfpm", "dots", 0, 0.60)


def test_pivot_by_model_is_categories_by_models_in_markdown_csv_and_latex(
    tmp_path: Path,
) -> None:
    _two_models(tmp_path)
    text, _ = summarize(tmp_path, plots=False, pivot="model", metrics="image_auroc,pixel_aupro")
    assert text == (tmp_path / "aggregate_by_model.md").read_text()  # the pivot is printed
    std = 100 * statistics.stdev([0.90, 0.92, 0.97])
    assert "| category | rd4ad | stfpm |" in text  # data (one value) named in the caption
    assert "image AUROC in % by model (data: synthetic)" in text
    assert f"| metal_nut | 93.00 ± {std:.2f} | **95.00** |" in text  # best of the row in bold
    assert f"| dots | **83.00** ± {std:.2f} | 60.00 |" in text
    assert "| **mean** | **88.00**" in text and "pixel AUPRO in %" in text

    rows = read_csv(tmp_path / "aggregate_by_model.csv")
    assert list(rows[0]) == ["metric", "category"] + [
        f"{m}_{s}" for m in ("rd4ad", "stfpm") for s in ("mean", "std", "n")
    ]
    metal = next(r for r in rows if r["metric"] == "image_auroc" and r["category"] == "metal_nut")
    assert float(metal["rd4ad_mean"]) == pytest.approx(0.93) and metal["stfpm_std"] == ""

    tex = (tmp_path / "aggregate_by_model.tex").read_text()
    assert r"\usepackage{booktabs}" in tex and tex.count(r"\begin{tabular}{lrr}") == 2
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 2
    assert rf"metal\_nut & 93.00 $\pm$ {std:.2f} & \textbf{{95.00}} \\" in tex
    assert r"\midrule" + "\n" + r"\textbf{mean} & \textbf{88.00}" in tex  # a rule above mean
    assert r"\label{tab:aggregate_by_model:image_auroc}" in tex
    assert "±" not in tex and "−" not in tex  # pdflatex-safe


def test_pivot_on_a_config_key_and_on_category(tmp_path: Path) -> None:
    for seed in (0, 1):
        for cbam, value in ((True, 0.9), (False, 0.8)):
            make_run(
                tmp_path, f"{cbam}{seed}", "hkt", "dots", seed, value + seed / 100, {"cbam": cbam}
            )
    text, _ = summarize(tmp_path, plots=False, pivot="model.cbam", metrics="image_auroc")
    assert "| category | model.cbam=False | model.cbam=True |" in text
    assert "(model: hkt; data: synthetic)" in text  # the label without the pivoted key
    assert "| dots | 80.50 ± 0.71 | **90.50** ± 0.71 |" in text

    text, _ = summarize(tmp_path, plots=False, pivot="category", metrics="image_auroc")
    assert "| model | dots | mean |" in text
    assert "| hkt[model.cbam=False] | 80.50 ± 0.71 | 80.50 ± 0.71 |" in text  # nothing bold
    assert "in bold" not in text  # categories are not rivals


def _auroc_by_pairs(positive: list[float], negative: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half: the AUROC."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def test_per_defect_rows_hold_each_defect_types_auroc_against_the_normal_images(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    expected: dict[str, list[float]] = {"crack": [], "hole": []}
    for seed in (0, 1):
        good = [("good", 0, float(s)) for s in rng.normal(0, 1, 8)]
        crack = [("crack", 1, float(s)) for s in rng.normal(0.5, 1, 4)]
        hole = [("hole", 1, float(s)) for s in rng.normal(2, 1, 3)] + [("hole", 1, good[0][2])]
        make_run(tmp_path, f"s{seed}", "rd4ad", "bottle", seed, 0.9, scores=good + crack + hole)
        for name, rows in (("crack", crack), ("hole", hole)):
            expected[name].append(_auroc_by_pairs([s for *_, s in rows], [s for *_, s in good]))
        # A product with one defect type (BTAD's "ko"): its AUROC is the image AUROC, no rows.
        one = [("good", 0, 0.1), ("ko", 1, 0.9)]
        make_run(tmp_path, f"btad{seed}", "rd4ad", "01", seed, 1.0, scores=one, data="btad")
    text, _ = summarize(tmp_path, plots=False, defects=True, metrics="image_auroc")
    rows = read_csv(tmp_path / "aggregate_defects.csv")
    assert [(r["category"], r["defect_type"]) for r in rows] == [
        ("bottle", "crack"),
        ("bottle", "hole"),
    ]
    for row in rows:
        values = expected[row["defect_type"]]
        assert float(row["image_auroc_mean"]) == pytest.approx(np.mean(values))
        assert float(row["image_auroc_std"]) == pytest.approx(np.std(values, ddof=1))
        assert row["good_images"] == "8" and row["seeds"] == "0 1"
    assert rows[0]["images"] == "4" and rows[1]["images"] == "4"
    crack = (
        f"{100 * np.mean(expected['crack']):.2f} ± {100 * np.std(expected['crack'], ddof=1):.2f}"
    )
    assert f"| rd4ad | synthetic | bottle | crack | 2 | 4 | {crack} |" in text  # printed: --defects
    assert "each defect type's test images against the normal test images" in text

    summarize(tmp_path, plots=False, pivot="model", metrics="image_auroc")
    pivot = read_csv(tmp_path / "aggregate_defects_by_model.csv")
    assert [r["defect_type"] for r in pivot] == ["crack", "hole"]  # one category: in the caption
    assert float(pivot[1]["rd4ad_mean"]) == pytest.approx(np.mean(expected["hole"]))
    assert (
        "(data: synthetic; category: bottle)"
        in (tmp_path / "aggregate_defects_by_model.md").read_text()
    )


def test_both_grammars_print_tex_or_csv_to_stdout_and_notes_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _two_models(tmp_path)
    assert main([str(tmp_path), "--pivot", "model", "--print", "tex", "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert out == (tmp_path / "aggregate_by_model.tex").read_text()
    assert "wrote" in err and "wrote" not in out
    argv = [f"dir={tmp_path}", "pivot=model", "print=csv", "plots=false", "metrics=image_auroc"]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert out == (tmp_path / "aggregate_by_model.csv").read_text()
    assert list(csv.reader(io.StringIO(out)))[1][:2] == ["image_auroc", "dots"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--metrics", "image_auroc,auroc"], "unknown metric 'auroc'"),
        (["metrics=auroc"], "unknown metric 'auroc'"),
        (["--pivot", "modle"], "pivot=modle: unknown key; expected model, data, category"),
        (["pivot=model.cbm"], "pivot=model.cbm: unknown key"),
        (["--print", "html"], "invalid choice: 'html'"),
        (["--mean-spread", "runs"], "invalid choice: 'runs'"),
        (["figure_formats=png,jpg"], "unknown figure format 'jpg'; expected one or more of"),
        (["colour=red"], "colour=red: unknown key; valid: dir"),
        (["defects=maybe"], "defects='maybe': expected true or false"),
    ],
)
def test_a_user_mistake_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    make_run(tmp_path, "a", "rd4ad", "dots", 0, 0.9)
    assert main([str(tmp_path), "--no-plots", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("kdad-aggregate: error: ") and named in err
    assert not (tmp_path / "aggregate.md").exists()  # nothing written on a mistake


def test_a_path_that_is_not_a_folder_of_runs_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_folder = make_run(tmp_path, "a", "rd4ad", "dots", 0, 0.9) / "metrics.json"
    for given, named in (
        (not_a_folder, f"{not_a_folder} is not a folder; expected a folder of runs"),
        (tmp_path / "nowhere", "is not a folder"),
        (tmp_path / "a" / "empty", "no metrics.json under"),
    ):
        if given.name == "empty":
            given.mkdir()
        assert main([str(given)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("kdad-aggregate: error: ") and named in err


def test_figures_are_written_in_each_format_with_the_curves_of_every_model(
    tmp_path: Path,
) -> None:
    _two_models(tmp_path)
    fpr = np.linspace(0, 1, 11).tolist()
    curves = {
        "image_roc": {"fpr": fpr, "tpr": np.sqrt(fpr).tolist()},
        "pixel_roc": {"fpr": fpr, "tpr": np.sqrt(fpr).tolist()},
        "pixel_pro": {"fpr": fpr, "pro": fpr},
    }
    for folder in ("rd_dots0", "rd_dots1", "stfpm_dots"):
        (tmp_path / folder / "curves.json").write_text(json.dumps(curves))
    _, notes = summarize(tmp_path, figure_formats="png,pdf,svg")
    for stem in ("aggregate_bars", "curves_synthetic_dots"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        svg = (tmp_path / f"{stem}.svg").read_text()
        assert "<svg" in svg
    assert not (tmp_path / "curves_synthetic_metal_nut.png").exists()  # no curves.json there
    svg = (tmp_path / "curves_synthetic_dots.svg").read_text()
    # The first seed of each model, with its own AUROC from metrics.json in the legend.
    assert "rd4ad (seed 0): AUROC 80.00 %" in svg and "stfpm (seed 0): AUROC 60.00 %" in svg
    assert "rd4ad (seed 1)" not in svg
    assert any(str(tmp_path / "curves_synthetic_dots.pdf") in note for note in notes)


def _written_run(root: Path, key: str, timeout: float = 60) -> dict:
    """The offline run under ``root`` once its summary holds ``key``: wandb's service writes
    the run file after ``finish()`` returns, a moment later on a busy machine."""
    start = time.monotonic()
    while True:
        files = sorted(root.rglob("run-*.wandb"))
        try:
            run = read_run(files[0]) if len(files) == 1 else None
        except Exception:  # a record half-written yet
            run = None
        if run is not None and key in run["summary"]:
            return run
        assert time.monotonic() - start < timeout, f"no complete W&B run file under {root}"
        time.sleep(0.2)


def test_the_wandb_summary_run_has_a_mean_and_a_std_column_per_metric(tmp_path: Path) -> None:
    _two_models(tmp_path)
    _, notes = summarize(tmp_path, plots=False, wandb=True, pivot="model")
    assert "logged W&B summary run" in notes[-1]
    run = _written_run(tmp_path, "rd4ad/synthetic/mean/image_auroc_std")
    assert run["job_type"] == "aggregate"
    summary = run["summary"]
    std = statistics.stdev([0.90, 0.92, 0.97])
    assert summary["rd4ad/synthetic/metal_nut/image_auroc_mean"] == pytest.approx(0.93)
    assert summary["rd4ad/synthetic/metal_nut/image_auroc_std"] == pytest.approx(std)
    assert summary["rd4ad/synthetic/metal_nut/pixel_aupro_mean"] == pytest.approx(0.83)
    assert summary["stfpm/synthetic/dots/image_auroc_mean"] == pytest.approx(0.60)
    assert "stfpm/synthetic/dots/image_auroc_std" not in summary  # one seed: no std
    assert summary["rd4ad/synthetic/mean/image_auroc_mean"] == pytest.approx(0.88)
    assert summary["rd4ad/synthetic/mean/image_auroc_std"] == pytest.approx(std)  # same per seed
    assert run["history"]["aggregate/table/nrows"] == [6]  # 4 cells + 2 mean rows
    assert run["history"]["aggregate/by_model/nrows"] == [3 * 7]  # 3 rows x 7 metrics
