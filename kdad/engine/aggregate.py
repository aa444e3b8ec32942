"""``kdad-aggregate DIR``: the tables and figures of a paper from every run under DIR.

**Tables.** Rows are model x data x category. A cell is the mean over seeds ± the sample
standard deviation over seeds (n − 1 in the denominator); a cell of a single run shows its value
without ±. Each model gets a **mean** row per data set: the mean over its categories of the
per-category means, as papers report. Its ± is the std over seeds of the per-seed mean over the
categories (only seeds that ran every category count), or with ``mean_spread="categories"`` the
std over the categories' means; each table's caption says which, and so does the CSV's
``std_over`` column. Runs of the same model that differ in another config key (an ablation:
``model.projectors=true,false``) are kept apart: the keys that vary between a model's runs name
the variant, e.g. ``hkt[model.cbam=false]``.

``pivot=KEY`` adds one table per metric with one column per value of KEY: ``model`` (categories
x models), ``data``, ``category``, ``seed`` or any config key (``model.cbam``, ``optimizer.lr``);
the best mean of each row is in bold. Where a category's test set has several defect types, the
runs' ``scores.csv`` give per-defect rows: the image AUROC of that defect type's images against
the normal ("good") test images, mean ± std over seeds.

Every table is written into DIR, atomically, as Markdown, CSV (fractions at full precision; per
metric its mean, std and n; empty where undefined) and LaTeX (booktabs): ``aggregate.*``,
``aggregate_defects.*``, ``aggregate_by_<KEY>.*`` and ``aggregate_defects_by_<KEY>.*``. Failed or
unfinished runs (a FAILED file, or a Hydra job folder without metrics.json) are listed as
missing, never counted as zero.

**Figures** (PNG and PDF; ``figure_formats`` picks among png, pdf and svg): ``aggregate_bars``
(per-category bars of image/pixel AUROC and AUPRO per model, error bars the std over seeds),
``heatmaps_<data>_<category>`` (input, ground truth and each model's map for the same test
images, a colour bar per model) and ``curves_<data>_<category>`` (each model's image ROC, pixel
ROC and PRO curve, of its first seed, with the areas in the legend).

**W&B** (``wandb=True``): one summary run (job_type ``aggregate``) in the sweep's group with the
tables and figures and one summary column per table row and metric,
``<model>/<data>/<category>/<metric>_mean`` and ``..._std`` (``<category>`` ``mean`` for the
mean rows), so that the numbers can be sorted, filtered and charted in the W&B UI.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdad.config import current_model_name, current_target, flatten
from kdad.engine.wandb import offline_unless_configured
from kdad.errors import KDADError, one_line
from kdad.io.atomic import write_csv_atomic, write_text_atomic
from kdad.io.results import METRIC_KEYS
from kdad.io.run_folder import CONFIG, FAILED, INTERRUPTED, METRICS, SCORES, RunFolder, SweepFolder
from kdad.viz.plots import FIGURE_FORMATS, METRIC_LABELS, check_formats

log = logging.getLogger("kdad")

EXTRA_KEYS = (
    "train_images_per_second",
    "test_images_per_second",
    "train_seconds",
    "params_trainable",
)
ALL_KEYS = (*METRIC_KEYS, *EXTRA_KEYS)
# Keys that differ between runs of one study without making them different methods.
IGNORED_PREFIXES = (
    "seed",
    "data.split_seed",
    "data.category",
    "data.root",
    "data.num_workers",
    "paths.",
    "hydra",
    "callbacks.",
    "logger.",
    "trainer.default_root_dir",
    "trainer.devices",
    "trainer.accelerator",
    "task_name",
    "tags",
    "ckpt_path",
    "optimized_metric",
    "model.weights_path",
)
MEAN_SPREADS = ("seeds", "categories")
PRINT_FORMATS = ("md", "tex", "csv")
PIVOT_FIELDS = ("model", "data", "category", "seed")
IDENTITY = ("model", "data", "category", "defect_type")
HEADERS = {"model": "model", "data": "data", "category": "category", "defect_type": "defect type"}
# What a row's ± is the std over (the CSV's std_over column).
STD_OVER = {
    "cell": "seeds",
    "seeds": "seeds, of the mean over categories",
    "categories": "categories",
}
UNSET = "(unset)"


@dataclass
class Run:
    folder: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> RunFolder:
        return RunFolder(self.folder)

    @property
    def model(self) -> str:
        return str(self.metrics.get("model", "?"))

    @property
    def seed(self) -> str:
        return str(self.metrics.get("seed"))

    @property
    def cell(self) -> tuple[str, str]:
        return str(self.metrics.get("data")), str(self.metrics.get("category"))


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Finished runs (with metrics.json) and missing ones (folder, reason)."""
    try:
        os.listdir(root)
    except OSError as exc:
        raise KDADError(
            f"{root}: cannot read the folder ({exc.strerror or type(exc).__name__}); "
            "expected a readable folder of runs (a multirun folder or a run folder)"
        ) from exc
    runs: list[Run] = []
    missing: list[tuple[Path, str]] = []
    for path in sorted(root.rglob(METRICS)):
        problem = None
        try:
            metrics = json.loads(path.read_text())
            if not isinstance(metrics, dict) or not isinstance(metrics.get("model"), str):
                problem = f"{METRICS} is not a kdad metrics object (no model name)"
            config_path = RunFolder(path.parent).config
            config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
            if not isinstance(config or {}, dict):
                problem = f"{CONFIG} is not a mapping"
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            problem = (
                f"unreadable {METRICS} or {CONFIG} ({type(exc).__name__}: {one_line(exc)[:120]})"
            )
        if problem is not None:
            print(f"kdad-aggregate: warning: skipping {path.parent}: {problem}", file=sys.stderr)
            missing.append((path.parent, problem))
            continue
        runs.append(_current_names(Run(path.parent, metrics, flatten(config or {}))))
    done = {run.folder for run in runs} | {folder for folder, _ in missing}
    jobs = SweepFolder(root).jobs()  # the job folders below root
    itself = RunFolder(root)  # root is a run that stopped itself (a marked run folder)
    if itself.failed.exists() or itself.interrupted.exists():
        jobs.insert(0, itself)
    for job in jobs:
        if job.path not in done:
            missing.append((job.path, _unfinished(job)))
    return runs, missing


def _current_names(run: Run) -> Run:
    """``run`` of a variant since renamed (:data:`kdad.config.MODEL_ALIASES`), under its
    current name and class: one row with the runs written since, not a variant of it."""
    run.metrics["model"] = current_model_name(run.metrics["model"])
    if "model_name" in run.config:
        run.config["model_name"] = current_model_name(str(run.config["model_name"]))
    target = run.config.get("model._target_")
    if isinstance(target, str):
        run.config["model._target_"] = current_target(target)
    return run


def _unfinished(job: RunFolder) -> str:
    """Why a job folder holds no results, from its status."""
    status = job.status
    if status == "failed":
        return job.reason(FAILED) or "failed"
    if status == "interrupted":
        return f"interrupted: {job.reason(INTERRUPTED)}"
    if status == "running":
        return "still running (another process holds its folder)"
    return f"no {METRICS} (unfinished or crashed)"


def _varying(runs: Sequence[Run], exclude: Iterable[str] = ()) -> list[str]:
    """The config keys whose value differs between ``runs`` (study bookkeeping left out). A
    key that some runs' configs do not have (written by an older kdad, before the key was
    shown) does not vary for that alone: only the values present are compared."""
    skip = set(exclude)
    return [
        k
        for k in sorted({k for run in runs for k in run.config})
        if k not in skip
        and not k.startswith(IGNORED_PREFIXES)
        and len({json.dumps(run.config[k], default=str) for run in runs if k in run.config}) > 1
    ]


def variant_labels(runs: Sequence[Run], exclude: Iterable[str] = ()) -> dict[Path, str]:
    """``model`` or ``model[key=value,...]`` from the config keys that vary within a model
    (those in ``exclude`` left out)."""
    labels: dict[Path, str] = {}
    by_model: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_model[run.model].append(run)
    for model, group in by_model.items():
        varying = _varying(group, exclude)
        for run in group:
            parts = [f"{k}={run.config.get(k)}" for k in varying]
            labels[run.folder] = f"{model}[{','.join(parts)}]" if parts else model
    return labels


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample std (n − 1; nan for fewer than 2 values) and n of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(finite) if len(finite) > 1 else float("nan")
    return statistics.fmean(finite), std, len(finite)


def _by_seed(group: Sequence[Run], key: str) -> dict[str, float]:
    """A cell's value of ``key`` per seed (runs repeated with one seed averaged)."""
    values: dict[str, list[float]] = defaultdict(list)
    for run in group:
        value = _number(run.metrics.get(key))
        if value is not None:
            values[run.seed].append(value)
    return {seed: statistics.fmean(v) for seed, v in values.items()}


def _natural(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers by value, before other text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _seeds(group: Sequence[Run]) -> str:
    return " ".join(sorted({r.seed for r in group}, key=_natural))


def aggregate(
    runs: Sequence[Run],
    labels: Mapping[Path, str] | None = None,
    columns: Mapping[Path, str] | None = None,
    mean_spread: str = "seeds",
) -> list[dict[str, Any]]:
    """One row per variant x data x category (x column: a pivot key's value, where given),
    then one mean row per variant x data; each metric as ``<key>_mean``, ``_std``, ``_n``."""
    if mean_spread not in MEAN_SPREADS:
        raise KDADError(f"mean_spread={mean_spread!r}: expected one of {', '.join(MEAN_SPREADS)}")
    labels = variant_labels(runs) if labels is None else labels
    cells: dict[tuple[str, str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        column = columns[run.folder] if columns is not None else ""
        cells[(labels[run.folder], column, *run.cell)].append(run)
    rows: list[dict[str, Any]] = []
    members: dict[tuple[str, str, str], list[tuple[dict[str, Any], list[Run]]]] = defaultdict(list)
    for (model, column, data, category), group in sorted(
        cells.items(), key=lambda item: (item[0][0], _natural(item[0][1]), *item[0][2:])
    ):
        row = _identity(model, column if columns is not None else None, data, category)
        row |= {"runs": len(group), "seeds": _seeds(group), "std_over": STD_OVER["cell"]}
        for key in ALL_KEYS:
            row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"] = _mean_std(
                _by_seed(group, key).values()
            )
        rows.append(row)
        members[(model, column, data)].append((row, group))
    for (model, column, data), group_rows in members.items():
        mean_row = _identity(model, column if columns is not None else None, data, "mean")
        mean_row |= {
            "runs": sum(len(g) for _, g in group_rows),
            "seeds": "",
            "std_over": STD_OVER[mean_spread],
            "categories": len(group_rows),
        }
        for key in ALL_KEYS:
            means = [r[f"{key}_mean"] for r, _ in group_rows]
            mean, std, n = _mean_std(means)
            if mean_spread == "seeds":
                per_category = [_by_seed(g, key) for _, g in group_rows]
                complete = set.intersection(*(set(p) for p in per_category))
                _, std, n = _mean_std(
                    statistics.fmean(p[seed] for p in per_category) for seed in complete
                )
            mean_row[f"{key}_mean"], mean_row[f"{key}_std"], mean_row[f"{key}_n"] = mean, std, n
        rows.append(mean_row)
    return rows


def _identity(model: str, column: str | None, data: str, category: str) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model}
    if column is not None:
        row["column"] = column
    return row | {"data": data, "category": category}


# --- per defect type ------------------------------------------------------------------------
def _read_scores(path: Path) -> list[tuple[str, int, float]] | None:
    """(defect_type, label, score) of each test image in a run's scores.csv; None without one."""
    if not path.is_file():
        return None
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [
                (str(row["defect_type"]), int(row["label"]), float(row["score"]))
                for row in csv.DictReader(handle)
            ]
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        print(
            f"kdad-aggregate: warning: no per-defect rows from {path}: expected columns "
            f"path, defect_type, label, score ({type(exc).__name__}: {one_line(exc)[:120]})",
            file=sys.stderr,
        )
        return None


def _defect_aurocs(scores: Sequence[tuple[str, int, float]]) -> dict[str, tuple[float, int, int]]:
    """Per defect type: (image AUROC of its images against the normal ones, #defect, #normal)."""
    import torch

    from kdad.metrics.functional import auroc

    normal = [s for _, label, s in scores if label == 0]
    found: dict[str, tuple[float, int, int]] = {}
    for defect in sorted({d for d, label, _ in scores if label == 1}):
        positive = [s for d, label, s in scores if label == 1 and d == defect]
        value = float("nan")
        if normal and all(math.isfinite(s) for s in positive + normal):
            value = float(
                auroc(
                    torch.tensor(positive + normal, dtype=torch.float64),
                    torch.tensor([True] * len(positive) + [False] * len(normal)),
                )
            )
        found[defect] = (value, len(positive), len(normal))
    return found


def defect_rows(
    runs: Sequence[Run],
    labels: Mapping[Path, str] | None = None,
    columns: Mapping[Path, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per variant x data x category x defect type (x column) with the defect type's
    image AUROC (mean ± std over seeds), for the categories whose test sets hold at least two
    defect types (with one, its AUROC is the image AUROC)."""
    labels = variant_labels(runs) if labels is None else labels
    per_run = {}
    for run in runs:
        scores = _read_scores(run.files.scores)
        if scores:
            per_run[run.folder] = _defect_aurocs(scores)
    types: dict[tuple[str, str], set[str]] = defaultdict(set)
    cells: dict[tuple[str, str, str, str, str], list[tuple[Run, tuple[float, int, int]]]]
    cells = defaultdict(list)
    for run in runs:
        for defect, found in per_run.get(run.folder, {}).items():
            types[run.cell].add(defect)
            column = columns[run.folder] if columns is not None else ""
            cells[(labels[run.folder], column, *run.cell, defect)].append((run, found))
    rows = []
    for (model, column, data, category, defect), group in sorted(
        cells.items(), key=lambda item: (item[0][0], _natural(item[0][1]), *item[0][2:])
    ):
        if len(types[(data, category)]) < 2:
            continue
        per_seed: dict[str, list[float]] = defaultdict(list)
        for run, (value, _, _) in group:
            if math.isfinite(value):
                per_seed[run.seed].append(value)
        row = _identity(model, column if columns is not None else None, data, category)
        row |= {
            "defect_type": defect,
            "runs": len(group),
            "seeds": _seeds([run for run, _ in group]),
            "images": group[0][1][1],
            "good_images": group[0][1][2],
            "std_over": STD_OVER["cell"],
        }
        row["image_auroc_mean"], row["image_auroc_std"], row["image_auroc_n"] = _mean_std(
            statistics.fmean(v) for v in per_seed.values()
        )
        rows.append(row)
    return rows


# --- tables -------------------------------------------------------------------------------
class Strong(str):
    """A table cell in bold (the mean rows' label)."""


@dataclass
class Value:
    """One table cell: a metric's mean ± std over n seeds."""

    key: str
    mean: float
    std: float
    n: int
    bold: bool = False


@dataclass
class Table:
    caption: str
    header: list[str]
    body: list[list[Any]]  # str or Value cells
    label: str
    rules: set[int] = field(default_factory=set)  # body rows with a rule above them


@dataclass
class Output:
    """Tables written as ``<stem>.md``, ``<stem>.tex`` and ``<stem>.csv``."""

    stem: str
    tables: list[Table]
    csv_header: list[str]
    csv_rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)  # under the tables (missing runs)


def _number_text(key: str, value: float) -> str:
    if key in METRIC_KEYS:
        return f"{100 * value:.2f}"
    if key == "params_trainable":
        return f"{value:,.0f}"
    return f"{value:.1f}"


def _cell_text(cell: Any, latex: bool) -> str:
    if isinstance(cell, Strong):
        return rf"\textbf{{{_tex(cell)}}}" if latex else f"**{cell}**"
    if not isinstance(cell, Value):
        return _tex(str(cell)) if latex else str(cell)
    if not math.isfinite(cell.mean):
        return "--" if latex else "–"
    text = _number_text(cell.key, cell.mean)
    if cell.bold:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    if math.isfinite(cell.std):  # a single run has no spread, and shows none
        text += (r" $\pm$ " if latex else " ± ") + _number_text(cell.key, cell.std)
    return text


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "≤": r"$\leq$",
    "−": "-",
    "–": "--",
    "×": r"$\times$",
}


def _tex(text: str) -> str:
    return "".join(_TEX.get(char, char) for char in text)


def to_markdown(table: Table) -> str:
    lines = [table.caption, "", "| " + " | ".join(table.header) + " |"]
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(_cell_text(c, False) for c in row) + " |" for row in table.body]
    return "\n".join(lines) + "\n"


def to_latex(table: Table) -> str:
    values = [
        any(isinstance(row[i], Value) for row in table.body) for i in range(len(table.header))
    ]
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{_tex(table.caption)}}}",
        rf"\label{{tab:{table.label}}}",
        r"\begin{tabular}{" + "".join("r" if v else "l" for v in values) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in table.header) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(table.body):
        if i in table.rules:
            lines.append(r"\midrule")
        lines.append(" & ".join(_cell_text(c, True) for c in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render(output: Output, fmt: str) -> str:
    """``output`` as Markdown (``md``) or LaTeX (``tex``); ``csv`` is what write_output wrote."""
    if fmt == "tex":
        head = "% kdad-aggregate; needs \\usepackage{booktabs}\n"
        notes = "".join(f"% {line}\n" for line in output.notes)
        return head + "\n".join(to_latex(t) for t in output.tables) + notes
    notes = "\n" + "\n".join(output.notes) + "\n" if output.notes else ""
    return "\n".join(to_markdown(t) for t in output.tables) + notes


def write_output(root: Path, output: Output) -> list[Path]:
    def plain(value: Any) -> Any:
        return "" if isinstance(value, float) and not math.isfinite(value) else value

    written = [
        write_csv_atomic(
            root / f"{output.stem}.csv",
            output.csv_header,
            ([plain(v) for v in row] for row in output.csv_rows),
        )
    ]
    for fmt in ("md", "tex"):
        written.append(write_text_atomic(root / f"{output.stem}.{fmt}", render(output, fmt)))
    return written


def _spread_text(mean_spread: str) -> str:
    if mean_spread == "categories":
        return (
            "their ± is the std over the categories' means (a spread across categories, not seeds)"
        )
    return (
        "their ± is the std over seeds of the per-seed mean over categories "
        "(the seeds that ran every category)"
    )


UNITS = {
    "train_images_per_second": "images per second",
    "test_images_per_second": "images per second",
    "train_seconds": "seconds",
    "params_trainable": "parameters",
}


def _units(keys: Sequence[str]) -> str:
    extra = [f"{METRIC_LABELS.get(k, k)} in {UNITS[k]}" for k in keys if k in UNITS]
    return "Metrics in %" + (f" ({'; '.join(extra)})" if extra else "")


DEFECT_AUROC = "Image AUROC in % of each defect type's test images against the normal test images"
CELL_TEXT = "mean ± sample std (n − 1) over seeds; a cell from a single run has no ±"


def _coverage_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """A warning when mean rows of one data set average different numbers of categories."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        if row["category"] == "mean":
            name = row["model"] + (f" {row['column']}" if "column" in row else "")
            counts[row["data"]][name] = row["categories"]
    uneven = {d: c for d, c in counts.items() if len(set(c.values())) > 1}
    if not uneven:
        return ""
    parts = [
        f"{data}: " + ", ".join(f"{m} {n}" for m, n in sorted(c.items()))
        for data, c in uneven.items()
    ]
    return (
        " Mean rows average different numbers of categories ("
        + "; ".join(parts)
        + "): compare them with care."
    )


def long_output(
    rows: Sequence[dict[str, Any]],
    missing: Sequence[tuple[Path, str]],
    metrics: Sequence[str],
    mean_spread: str,
) -> Output:
    """``aggregate.*``: every row, the chosen metrics (the CSV holds every key)."""
    header = ["model", "data", "category", "runs", *(METRIC_LABELS.get(k, k) for k in metrics)]
    body, rules = [], set()
    for row in rows:
        if row["category"] == "mean" and not rules:
            rules.add(len(body))
        category = Strong("mean") if row["category"] == "mean" else row["category"]
        body.append(
            [row["model"], row["data"], category, str(row["runs"])]
            + [_value(row, k) for k in metrics]
        )
    caption = (
        f"{_units(metrics)}: {CELL_TEXT}. Mean rows: the mean over a model's categories of the "
        f"per-category means; {_spread_text(mean_spread)}.{_coverage_note(rows)}"
    )
    table = Table(caption, header, body, "aggregate", rules)
    columns = ["model", "data", "category", "runs", "seeds"]
    columns += [f"{k}_{s}" for k in ALL_KEYS for s in ("mean", "std")]
    columns += ["std_over", "categories", *(f"{k}_n" for k in ALL_KEYS)]
    return Output(
        "aggregate",
        [table],
        columns,
        [[row.get(c, "") for c in columns] for row in rows],
        _missing_notes(missing),
    )


def _missing_notes(missing: Sequence[tuple[Path, str]]) -> list[str]:
    if not missing:
        return []
    return [f"Missing runs ({len(missing)}): not counted above.", ""] + [
        f"- `{folder}`: {reason}" for folder, reason in missing
    ]


def _value(row: Mapping[str, Any], key: str) -> Value:
    return Value(key, row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"])


def defects_output(rows: Sequence[dict[str, Any]]) -> Output:
    """``aggregate_defects.*``: one row per defect type."""
    header = ["model", "data", "category", "defect type", "runs", "images", "image AUROC"]
    body = [
        [
            r["model"],
            r["data"],
            r["category"],
            r["defect_type"],
            str(r["runs"]),
            str(r["images"]),
            _value(r, "image_auroc"),
        ]
        for r in rows
    ]
    caption = (
        f"{DEFECT_AUROC} (images: how many of that type; normal images: {_good_counts(rows)}): "
        f"{CELL_TEXT}."
    )
    columns = [
        "model",
        "data",
        "category",
        "defect_type",
        "runs",
        "seeds",
        "images",
        "good_images",
        "image_auroc_mean",
        "image_auroc_std",
        "image_auroc_n",
    ]
    return Output(
        "aggregate_defects",
        [Table(caption, header, body, "aggregate_defects")],
        columns,
        [[r[c] for c in columns] for r in rows],
    )


def _good_counts(rows: Sequence[Mapping[str, Any]]) -> str:
    counts = {(r["data"], r["category"]): r["good_images"] for r in rows}
    return ", ".join(f"{c} {n}" for (_, c), n in sorted(counts.items()))


def pivot_output(
    rows: Sequence[dict[str, Any]],
    pivot_field: str,
    key: str,
    metrics: Sequence[str],
    stem: str,
    mean_spread: str,
    missing: Sequence[tuple[Path, str]] = (),
    what: str | None = None,
) -> Output:
    """One table per metric: a row per identity (model, data, category, defect type: those
    that are not the pivot and differ between rows), a column per value of ``key``. ``what``
    names the tables' numbers (default: the metric's name). Where the columns are rivals
    (models, or a config key's values), the best mean of each row is in bold."""
    rivals = pivot_field == "model" or (pivot_field == "column" and key != "seed")
    identity = [f for f in IDENTITY if f in rows[0] and f != pivot_field]
    constant = {f: rows[0][f] for f in identity if len({r[f] for r in rows}) == 1}
    shown = [f for f in identity if f not in constant] or identity[:1]
    columns = sorted({r[pivot_field] for r in rows} - {"mean", UNSET}, key=_natural)
    columns += [c for c in (UNSET, "mean") if any(r[pivot_field] == c for r in rows)]
    cells: dict[tuple[str, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        cells[tuple(str(row[f]) for f in shown)][str(row[pivot_field])] = row
    order = sorted(cells, key=lambda ident: (any(v == "mean" for v in ident), ident))
    rules = {
        i
        for i, ident in enumerate(order)
        if "mean" in ident and (i == 0 or "mean" not in order[i - 1])
    }
    fixed = "; ".join(f"{HEADERS[f]}: {v}" for f, v in constant.items() if f not in shown)
    tables, csv_rows = [], []
    for metric in metrics:
        body = []
        for ident in order:
            found = cells[ident]
            values = [
                _value(found[c], metric) if c in found else Value(metric, math.nan, math.nan, 0)
                for c in columns
            ]
            if rivals:
                _bold_best(values)
            body.append([(Strong(v) if v == "mean" else v) for v in ident] + values)
            csv_rows.append([metric, *ident] + [x for v in values for x in (v.mean, v.std, v.n)])
        name = what or METRIC_LABELS.get(metric, metric) + (
            " in %" if metric in METRIC_KEYS else ""
        )
        bold = "; the best mean of a row in bold" if rivals and metric in METRIC_KEYS else ""
        caption = f"{name} by {key}" + (f" ({fixed})" if fixed else "") + f": {CELL_TEXT}{bold}."
        if any(r["category"] == "mean" for r in rows):
            caption += f" Mean: the mean over categories; {_spread_text(mean_spread)}."
            caption += _coverage_note(rows)
        header = [HEADERS[f] for f in shown] + [
            f"{key}={c}" if pivot_field == "column" else c for c in columns
        ]
        tables.append(Table(caption, header, body, f"{stem}:{metric}", rules))
    csv_header = ["metric", *shown] + [f"{c}_{s}" for c in columns for s in ("mean", "std", "n")]
    return Output(stem, tables, csv_header, csv_rows, _missing_notes(missing))


def _bold_best(values: Sequence[Value]) -> None:
    """Bold the highest mean of a row (as displayed), where a row compares several."""
    if not values or values[0].key not in METRIC_KEYS:
        return
    shown = [float(_number_text(v.key, v.mean)) for v in values if math.isfinite(v.mean)]
    if len(shown) < 2:
        return
    best = max(shown)
    for v in values:
        v.bold = math.isfinite(v.mean) and float(_number_text(v.key, v.mean)) == best


def pivot_plan(
    runs: Sequence[Run], key: str
) -> tuple[str, dict[Path, str], dict[Path, str] | None]:
    """How to pivot on ``key``: the row field that becomes the columns, the row labels, and
    each run's column value (for ``seed`` and config keys)."""
    key = "category" if key == "data.category" else key
    if key in ("model", "data", "category"):
        return key, variant_labels(runs), None
    if key == "seed":
        return "column", variant_labels(runs), {run.folder: run.seed for run in runs}
    if not any(key in run.config for run in runs):
        varying = _varying(runs)
        hint = f"; config keys that vary here: {', '.join(varying[:12])}" if varying else ""
        raise KDADError(
            f"pivot={key}: unknown key; expected {', '.join(PIVOT_FIELDS)} "
            f"or a key of the runs' {CONFIG}{hint}"
        )
    columns = {run.folder: str(run.config.get(key, UNSET)) for run in runs}
    return "column", variant_labels(runs, exclude=(key,)), columns


# --- figures -------------------------------------------------------------------------------
def _aupro_fpr_limit() -> float:
    """The FPR limit of the runs' AUPRO: build_metrics' default (runs cannot change it)."""
    import inspect

    from kdad.metrics import build_metrics

    return float(inspect.signature(build_metrics).parameters["aupro_fpr_limit"].default)


def write_plots(
    root: Path,
    runs: Sequence[Run],
    rows: Sequence[dict[str, Any]],
    formats: Sequence[str] = FIGURE_FORMATS,
) -> list[Path]:
    """Per-category bars and, per data x category, a heatmap grid and a curve figure across
    variants (first seed of each)."""
    import numpy as np

    from kdad.viz.plots import category_bars, heatmap_grid, plot_curves

    written = category_bars(rows, root / "aggregate_bars", formats=formats)
    labels = variant_labels(runs)
    samples: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    curves: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    areas: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    with_curves: set[tuple[str, str, str]] = set()
    for run in sorted(runs, key=lambda r: _natural(r.seed)):  # the first seed of each
        label = labels[run.folder]
        npz = run.files.samples
        if npz.is_file() and label not in samples[run.cell]:
            with np.load(npz) as arrays:
                samples[run.cell][label] = {name: arrays[name] for name in arrays.files}
        curve_file = run.files.curves
        if curve_file.is_file() and (*run.cell, label) not in with_curves:
            try:
                found = json.loads(curve_file.read_text())
            except (OSError, ValueError) as exc:
                print(
                    f"kdad-aggregate: warning: skipping {curve_file}: {one_line(exc)}",
                    file=sys.stderr,
                )
                continue
            with_curves.add((*run.cell, label))
            named = f"{label} (seed {run.seed})"
            curves[run.cell][named] = found
            areas[run.cell][named] = {k: run.metrics.get(k) for k in METRIC_KEYS}
    for (data, category), found in sorted(samples.items()):
        found = dict(sorted(found.items()))  # the tables' order
        written += heatmap_grid(found, root / f"heatmaps_{data}_{category}", formats=formats)
    limit = _aupro_fpr_limit() if curves else None
    for (data, category), found in sorted(curves.items()):
        written += plot_curves(
            dict(sorted(found.items())),
            root / f"curves_{data}_{category}",
            title=f"{data} / {category}",
            areas=areas[(data, category)],
            fpr_limit=limit,
            formats=formats,
        )
    return written


# --- W&B -----------------------------------------------------------------------------------
def summary_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One W&B summary column per row and metric: ``<model>/<data>/<category>/<key>_mean``
    and ``_std`` (the std only where it is defined: two seeds or more)."""
    columns: dict[str, float] = {}
    for row in rows:
        prefix = "/".join(str(row[f]) for f in ("model", "column", "data", "category") if f in row)
        for key in ALL_KEYS:
            for stat in ("mean", "std"):
                value = row.get(f"{key}_{stat}")
                if isinstance(value, int | float) and math.isfinite(value):
                    columns[f"{prefix}/{key}_{stat}"] = float(value)
    return columns


def log_to_wandb(
    root: Path,
    rows: Sequence[dict[str, Any]],
    outputs: Sequence[Output],
    plots: Sequence[Path],
    project: str,
    entity: str | None,
    group: str,
    quiet: bool = True,
) -> str:
    """One W&B run (job_type ``aggregate``) in the sweep's group: the tables, the PNG figures
    and one summary column per row and metric (:func:`summary_columns`). With ``quiet`` (the
    sweep's ``logger.wandb.quiet``), none of W&B's console output."""
    import wandb

    from kdad.engine.wandb import init_settings

    if wandb.run is not None:  # every job closes its own; a leftover one ends here
        wandb.finish()

    columns = [
        "model",
        "data",
        "category",
        "runs",
        *(f"{k}_{s}" for k in ALL_KEYS for s in ("mean", "std")),
    ]
    run = wandb.init(
        project=project,
        entity=entity,
        group=group,
        job_type="aggregate",
        name=f"summary {root.name}",
        dir=str(root),
        config={"sweep_dir": str(root)},
        settings=init_settings(quiet),
    )
    try:
        tables = {
            "aggregate/table": wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in rows]
            )
        }
        for output in outputs:
            if output.stem != "aggregate":
                tables[f"aggregate/{output.stem.removeprefix('aggregate_')}"] = wandb.Table(
                    columns=output.csv_header, data=[list(r) for r in output.csv_rows]
                )
        run.log(tables)
        run.log({f"aggregate/{p.stem}": wandb.Image(str(p)) for p in plots if p.suffix == ".png"})
        run.summary.update(summary_columns(rows))
    finally:
        run.finish()
    return run.id


# --- the command ---------------------------------------------------------------------------
def _names(value: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if value is None:
        return list(default)
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item.strip()]


def summarize(
    root: Path,
    plots: bool = True,
    wandb: bool = False,
    project: str = "kdad",
    entity: str | None = None,
    group: str | None = None,
    *,
    pivot: str | None = None,
    metrics: str | Sequence[str] | None = None,
    mean_spread: str = "seeds",
    print_format: str = "md",
    defects: bool = False,
    figure_formats: str | Sequence[str] | None = None,
    quiet: bool = True,
) -> tuple[str, list[str]]:
    """Tables (and figures, and with ``wandb`` a W&B summary run) for every run under ``root``.

    Returns what to print (the pivot tables where ``pivot`` is given, else the long table; with
    ``defects`` the per-defect table too; in ``print_format``: md, tex or csv) and notes for
    the user (files written, missing runs). A user's mistake is a :class:`KDADError`.
    """
    root = Path(root)
    chosen = _names(metrics, ALL_KEYS)
    unknown = [m for m in chosen if m not in ALL_KEYS]
    if unknown or not chosen:
        raise KDADError(
            f"metrics: unknown metric {unknown[0] if unknown else '(none)'!r}; "
            f"expected a comma-separated list of {', '.join(ALL_KEYS)}"
        )
    if print_format not in PRINT_FORMATS:
        raise KDADError(f"print={print_format!r}: expected one of {', '.join(PRINT_FORMATS)}")
    if mean_spread not in MEAN_SPREADS:
        raise KDADError(f"mean_spread={mean_spread!r}: expected one of {', '.join(MEAN_SPREADS)}")
    try:
        formats = check_formats(_names(figure_formats, FIGURE_FORMATS))
    except ValueError as exc:
        raise KDADError(f"figure_formats: {exc}") from exc
    if not root.is_dir():
        raise KDADError(
            f"{root} is not a folder; expected a folder of runs (a multirun folder or a run folder)"
        )
    runs, missing = find_runs(root)
    if not runs:
        reasons = "; ".join(f"{folder}: {reason}" for folder, reason in missing[:5])
        raise KDADError(
            f"no {METRICS} under {root}" + (f" (missing: {reasons})" if reasons else "")
        )
    plan = pivot_plan(runs, pivot) if pivot else None  # an unknown key fails before writing
    rows = aggregate(runs, mean_spread=mean_spread)
    long_metrics = chosen if metrics is not None else [*METRIC_KEYS, "train_images_per_second"]
    table_metrics = chosen if metrics is not None else list(METRIC_KEYS)
    outputs = [long_output(rows, missing, long_metrics, mean_spread)]
    printed = [outputs[0]]
    per_defect = defect_rows(runs)
    if per_defect:
        outputs.append(defects_output(per_defect))
    if defects:
        printed.append(outputs[-1] if per_defect else None)
    if plan is not None:
        pivot_field, labels, columns = plan
        name = re.sub(r"[^\w.=-]+", "_", pivot)
        pivoted = aggregate(runs, labels, columns, mean_spread)
        stem = f"aggregate_by_{name}"
        outputs.append(
            pivot_output(pivoted, pivot_field, pivot, table_metrics, stem, mean_spread, missing)
        )
        printed = [outputs[-1]]
        by_defect = defect_rows(runs, labels, columns)
        if by_defect:
            outputs.append(
                pivot_output(
                    by_defect,
                    pivot_field,
                    pivot,
                    ["image_auroc"],
                    f"aggregate_defects_by_{name}",
                    mean_spread,
                    what=DEFECT_AUROC,
                )
            )
        if defects:
            printed.append(outputs[-1] if by_defect else None)
    notes: list[str] = []
    for output in outputs:
        notes.append("wrote " + ", ".join(str(p) for p in write_output(root, output)))
    if defects and printed[-1] is None:
        notes.append(f"no per-defect rows: no category's {SCORES} holds two defect types")
    elif per_defect and not defects:
        notes.append("per defect type: see aggregate_defects.md (--defects prints it)")
    if missing and print_format != "md":
        notes += [f"missing: {folder}: {reason}" for folder, reason in missing]
    written = write_plots(root, runs, rows, formats) if plots else []
    notes += [f"wrote {plot}" for plot in written]
    if wandb:
        offline_unless_configured(root)
        group = group or _sweep_group(runs) or root.name
        run_id = log_to_wandb(root, rows, outputs, written, project, entity, group, quiet)
        notes.append(
            f"logged W&B summary run {run_id} (group {group}, mode {os.environ.get('WANDB_MODE', 'online')})"
        )
    texts = []
    for output in printed:
        if output is None:
            continue
        texts.append(
            (root / f"{output.stem}.csv").read_text()
            if print_format == "csv"
            else render(output, print_format)
        )
    return "\n".join(texts), notes


def _sweep_group(runs: Sequence[Run]) -> str | None:
    """The W&B group the runs were logged in (their logger.wandb.group), if they share one."""
    groups = {run.config.get("logger.wandb.group") for run in runs} - {None}
    return str(groups.pop()) if len(groups) == 1 else None


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, aggregate its runs (``kdad-aggregate``) and,
    when the sweep logs to W&B, add the summary run to the sweep's group. Failures here are
    warnings: they never change the sweep's outcome."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        logger_cfg = config.get("logger") or {}
        wandb_cfg = logger_cfg.get("wandb") if "wandb" in logger_cfg else None
        try:
            text, notes = summarize(
                root,
                plots=True,
                wandb=wandb_cfg is not None,
                project=str(wandb_cfg.get("project", "kdad")) if wandb_cfg is not None else "kdad",
                entity=wandb_cfg.get("entity") if wandb_cfg is not None else None,
                quiet=bool(wandb_cfg.get("quiet", True)) if wandb_cfg is not None else True,
            )
        except Exception as exc:
            log.warning("sweep summary of %s skipped: %s", root, one_line(exc))
            return
        log.info("sweep summary (kdad-aggregate %s):\n%s\n%s", root, text, "\n".join(notes))
