"""``kdad-aggregate DIR``: one table from every run under DIR (a multirun folder, or several).

Rows are model x data x category, mean ± std over seeds, plus a mean row per model (the mean
over its categories of the per-category means, as papers report). Runs of the same model that
differ in another config key (an ablation: ``model.projectors=true,false``) are kept apart:
the keys that vary between a model's runs name the variant, e.g. ``hkt[model.cbam=false]``.

Failed or unfinished runs (a FAILED file, or a Hydra job folder without metrics.json) are
listed as missing, never counted as zero. Writes ``aggregate.csv`` and ``aggregate.md`` into
DIR (atomically) and prints the markdown table; also draws ``aggregate_bars.png`` (per-category
bars of image/pixel AUROC and AUPRO per model) and ``heatmaps_<data>_<category>.png`` (input,
ground truth and each model's map for the same test images). ``--wandb`` logs the table and
the plots as one W&B summary run in the sweep's group.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdad.results import METRIC_KEYS, write_csv_atomic, write_text_atomic

EXTRA_KEYS = (
    "train_images_per_second",
    "test_images_per_second",
    "train_seconds",
    "params_trainable",
)
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


@dataclass
class Run:
    folder: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.metrics.get("model", "?"))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: json.dumps(value) if isinstance(value, list) else value}


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Finished runs (with metrics.json) and missing ones (folder, reason)."""
    runs: list[Run] = []
    for path in sorted(root.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"kdad-aggregate: skipping unreadable {path}: {exc}", file=sys.stderr)
            continue
        config_path = path.parent / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        runs.append(Run(path.parent, metrics, _flatten(config or {})))
    done = {run.folder for run in runs}
    missing: list[tuple[Path, str]] = []
    job_folders = {p.parent for p in root.rglob(".hydra")} | {
        p.parent for p in root.rglob("FAILED")
    }
    for folder in sorted(job_folders - done):
        if folder == root and any(root.iterdir()) and not (folder / "FAILED").exists():
            continue  # the sweep folder itself (its own .hydra holds the sweep config)
        failed = folder / "FAILED"
        reason = (
            failed.read_text().strip()
            if failed.is_file()
            else "no metrics.json (unfinished or crashed)"
        )
        missing.append((folder, reason))
    return runs, missing


def variant_labels(runs: Sequence[Run]) -> dict[Path, str]:
    """``model`` or ``model[key=value,...]`` from the config keys that vary within a model."""
    labels: dict[Path, str] = {}
    by_model: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_model[run.model].append(run)
    for model, group in by_model.items():
        keys = sorted({k for run in group for k in run.config})
        varying = [
            k
            for k in keys
            if not k.startswith(IGNORED_PREFIXES)
            and len({json.dumps(run.config.get(k), default=str) for run in group}) > 1
        ]
        for run in group:
            parts = [f"{k}={run.config.get(k)}" for k in varying]
            labels[run.folder] = f"{model}[{','.join(parts)}]" if parts else model
    return labels


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def aggregate(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per variant x data x category, then one mean row per variant."""
    labels = variant_labels(runs)
    cells: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        cells[
            (labels[run.folder], str(run.metrics.get("data")), str(run.metrics.get("category")))
        ].append(run)
    rows: list[dict[str, Any]] = []
    for (model, data, category), group in sorted(cells.items()):
        row: dict[str, Any] = {
            "model": model,
            "data": data,
            "category": category,
            "runs": len(group),
        }
        row["seeds"] = " ".join(
            str(r.metrics.get("seed"))
            for r in sorted(group, key=lambda r: str(r.metrics.get("seed")))
        )
        for key in (*METRIC_KEYS, *EXTRA_KEYS):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(r.metrics.get(key) for r in group)
        rows.append(row)
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    for model, group in sorted(by_model.items()):
        mean_row: dict[str, Any] = {
            "model": model,
            "data": "/".join(sorted({r["data"] for r in group})),
            "category": "mean",
            "runs": sum(r["runs"] for r in group),
            "seeds": "",
        }
        for key in (*METRIC_KEYS, *EXTRA_KEYS):
            mean_row[f"{key}_mean"], mean_row[f"{key}_std"] = _mean_std(
                r[f"{key}_mean"] for r in group
            )
        rows.append(mean_row)
    return rows


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def to_markdown(rows: Sequence[dict[str, Any]], missing: Sequence[tuple[Path, str]]) -> str:
    header = ["model", "data", "category", "runs", *METRIC_KEYS, "train img/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["model"],
            row["data"],
            f"**{row['category']}**" if row["category"] == "mean" else row["category"],
            str(row["runs"]),
        ]
        cells += [_pct(row[f"{k}_mean"], row[f"{k}_std"]) for k in METRIC_KEYS]
        ips = row["train_images_per_second_mean"]
        cells.append("–" if math.isnan(ips) else f"{ips:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = (
        "Metrics in %, mean ± std over seeds (mean rows: mean over categories).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    if missing:
        text += f"\nMissing runs ({len(missing)}): not counted above.\n\n"
        text += "\n".join(f"- `{folder}`: {reason}" for folder, reason in missing) + "\n"
    return text


def write_tables(
    root: Path, rows: Sequence[dict[str, Any]], missing: Sequence[tuple[Path, str]]
) -> str:
    columns = ["model", "data", "category", "runs", "seeds"]
    columns += [f"{k}_{s}" for k in (*METRIC_KEYS, *EXTRA_KEYS) for s in ("mean", "std")]
    write_csv_atomic(
        root / "aggregate.csv", columns, ([row.get(c) for c in columns] for row in rows)
    )
    markdown = to_markdown(rows, missing)
    write_text_atomic(root / "aggregate.md", markdown)
    return markdown


def write_plots(root: Path, runs: Sequence[Run], rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Per-category bars and, per data x category, a heatmap grid across variants (first seed)."""
    import numpy as np

    from kdad.plots import category_bars, heatmap_grid

    written = [category_bars(rows, root / "aggregate_bars.png")]
    labels = variant_labels(runs)
    by_cell: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    for run in sorted(runs, key=lambda r: str(r.metrics.get("seed"))):
        npz = run.folder / "images" / "samples.npz"
        key = (str(run.metrics.get("data")), str(run.metrics.get("category")))
        if npz.is_file() and labels[run.folder] not in by_cell[key]:
            with np.load(npz) as arrays:
                by_cell[key][labels[run.folder]] = {name: arrays[name] for name in arrays.files}
    for (data, category), samples in sorted(by_cell.items()):
        grid = heatmap_grid(samples, root / f"heatmaps_{data}_{category}.png")
        if grid is not None:
            written.append(grid)
    return written


def log_to_wandb(
    root: Path,
    rows: Sequence[dict[str, Any]],
    plots: Sequence[Path],
    project: str,
    entity: str | None,
) -> str:
    """One W&B run (job_type ``aggregate``) in the sweep's group with the table and plots."""
    import wandb

    columns = [
        "model",
        "data",
        "category",
        "runs",
        *(f"{k}_{s}" for k in (*METRIC_KEYS, *EXTRA_KEYS) for s in ("mean", "std")),
    ]
    run = wandb.init(
        project=project,
        entity=entity,
        group=root.name,
        job_type="aggregate",
        name=f"aggregate-{root.name}",
        dir=str(root),
        config={"sweep_dir": str(root)},
        reinit=True,
    )
    try:
        run.log(
            {
                "aggregate/table": wandb.Table(
                    columns=columns, data=[[row.get(c) for c in columns] for row in rows]
                )
            }
        )
        run.log({f"aggregate/{p.stem}": wandb.Image(str(p)) for p in plots})
        for row in rows:
            if row["category"] == "mean":
                run.summary.update({f"{row['model']}/{k}": row[f"{k}_mean"] for k in METRIC_KEYS})
    finally:
        run.finish()
    return run.id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdad-aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a folder with runs (e.g. a multirun folder)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--wandb", action="store_true", help="log the table and plots as a W&B summary run"
    )
    parser.add_argument("--project", default="kdad", help="W&B project (default: kdad)")
    parser.add_argument("--entity", default=None, help="W&B entity (team or user)")
    args = parser.parse_args(argv)
    root: Path = args.dir
    if not root.is_dir():
        print(f"kdad-aggregate: error: {root} is not a folder", file=sys.stderr)
        return 2
    runs, missing = find_runs(root)
    if not runs:
        print(f"kdad-aggregate: error: no metrics.json under {root}", file=sys.stderr)
        for folder, reason in missing:
            print(f"  missing: {folder}: {reason}", file=sys.stderr)
        return 2
    rows = aggregate(runs)
    markdown = write_tables(root, rows, missing)
    print(markdown, end="")
    print(f"\nwrote {root / 'aggregate.csv'} and {root / 'aggregate.md'}")
    plots = [] if args.no_plots else write_plots(root, runs, rows)
    for plot in plots:
        print(f"wrote {plot}")
    if args.wandb:
        import os

        from kdad.cli import wandb_offline_unless_configured

        wandb_offline_unless_configured(root)
        run_id = log_to_wandb(root, rows, plots, args.project, args.entity)
        print(
            f"logged W&B summary run {run_id} (group {root.name}, mode {os.environ.get('WANDB_MODE', 'online')})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
