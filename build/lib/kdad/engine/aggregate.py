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

import json
import logging
import math
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdad.config import flatten
from kdad.engine.wandb import offline_unless_configured
from kdad.errors import KDADError, one_line
from kdad.io.atomic import write_csv_atomic, write_text_atomic
from kdad.io.results import METRIC_KEYS

log = logging.getLogger("kdad")

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


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Finished runs (with metrics.json) and missing ones (folder, reason)."""
    runs: list[Run] = []
    missing: list[tuple[Path, str]] = []
    for path in sorted(root.rglob("metrics.json")):
        problem = None
        try:
            metrics = json.loads(path.read_text())
            if not isinstance(metrics, dict) or not isinstance(metrics.get("model"), str):
                problem = "metrics.json is not a kdad metrics object (no model name)"
            config_path = path.parent / "config.yaml"
            config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
            if not isinstance(config or {}, dict):
                problem = "config.yaml is not a mapping"
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            problem = f"unreadable metrics.json or config.yaml ({type(exc).__name__}: {one_line(exc)[:120]})"
        if problem is not None:
            print(f"kdad-aggregate: warning: skipping {path.parent}: {problem}", file=sys.stderr)
            missing.append((path.parent, problem))
            continue
        runs.append(Run(path.parent, metrics, flatten(config or {})))
    done = {run.folder for run in runs} | {folder for folder, _ in missing}
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

    from kdad.viz.plots import category_bars, heatmap_grid

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
    group: str,
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
        group=group,
        job_type="aggregate",
        name=f"summary {root.name}",
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


def summarize(
    root: Path,
    plots: bool = True,
    wandb: bool = False,
    project: str = "kdad",
    entity: str | None = None,
    group: str | None = None,
) -> str:
    """Tables (and plots, and with ``wandb`` a W&B summary run) for every run under ``root``;
    returns what to print. A folder without any finished run is a one-line error."""
    if not root.is_dir():
        raise KDADError(f"kdad-aggregate: {root} is not a folder")
    runs, missing = find_runs(root)
    if not runs:
        reasons = "; ".join(f"{folder}: {reason}" for folder, reason in missing[:5])
        raise KDADError(
            f"no metrics.json under {root}" + (f" (missing: {reasons})" if reasons else "")
        )
    rows = aggregate(runs)
    lines = [
        write_tables(root, rows, missing),
        f"\nwrote {root / 'aggregate.csv'} and {root / 'aggregate.md'}",
    ]
    written = write_plots(root, runs, rows) if plots else []
    lines += [f"wrote {plot}" for plot in written]
    if wandb:
        offline_unless_configured(root)
        group = group or _sweep_group(runs) or root.name
        run_id = log_to_wandb(root, rows, written, project, entity, group)
        lines.append(
            f"logged W&B summary run {run_id} (group {group}, mode {os.environ.get('WANDB_MODE', 'online')})"
        )
    return "\n".join(line.rstrip("\n") for line in lines) + "\n"


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
            text = summarize(
                root,
                plots=True,
                wandb=wandb_cfg is not None,
                project=str(wandb_cfg.get("project", "kdad")) if wandb_cfg is not None else "kdad",
                entity=wandb_cfg.get("entity") if wandb_cfg is not None else None,
            )
        except Exception as exc:
            log.warning("sweep summary of %s skipped: %s", root, one_line(exc))
            return
        log.info("sweep summary (kdad-aggregate %s):\n%s", root, text)
