"""The photos studies' tables, from the committed results only: ``results/summary.md``.

    python experiments/photos/summary.py

- convergence: each variant's metrics against the epoch count (one category, seed 0);
- each table of variants: metrics in %, mean ± std over the seeds (a seed's value: the mean
  over the table's categories), the kNN line's row beside them, and each row's gap to it;
  then image AUROC, pixel AUROC and AUPRO per category.

Every number the README of this study quotes is in ``results/summary.md`` (or in a stage's
``aggregate.md``, written by ``kdad-aggregate``).
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from kdad.config import current_model_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_ap")
NAMES = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pixel_aupro": "AUPRO",
    "pixel_ap": "pixel AP",
}
sys.path.insert(0, str(HERE))
from study import REFERENCE, SWITCHES  # noqa: E402

# kdad's named variant of a switched method: its headline runs of the same categories and
# seeds sit in the switch table, so that each switch reads beside the combination kdad ships.
# (HKT's, hkt_both, is the hkt_cross_scale study's alignment=both row itself.)
NAMED_VARIANT = {"nferd": "nferd_plus"}


def runs(stage: str) -> list[dict]:
    found = []
    for path in sorted((RESULTS / stage).glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        config_path = path.parent / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        # The study runs a pinned commit where RD4AD was still model=rd: its current name.
        metrics["model"] = current_model_name(metrics["model"])
        found.append({**metrics, "run": path.parent.name, "config": config})
    return found


def label(run: dict, keys: tuple[str, ...] = ()) -> str:
    parts = []
    for key in keys:
        node = run["config"]
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        parts.append(f"{key.rsplit('.', 1)[-1]}={node}")
    return run["model"] + (f" [{', '.join(parts)}]" if parts else "")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def full_grid(pairs: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """The largest categories x seeds grid inside ``pairs`` (ties: more seeds), so that every
    seed's mean is over the same categories: a seed that has only some categories so far
    would otherwise make the spread over seeds a spread over category sets."""
    seeds = sorted({s for _, s in pairs})
    best: set[tuple[str, int]] = set()
    for size in range(len(seeds), 0, -1):
        for chosen in itertools.combinations(seeds, size):
            shared = set.intersection(*({c for c, s in pairs if s == seed} for seed in chosen))
            grid = {(c, seed) for c in shared for seed in chosen}
            if len(grid) > len(best):
                best = grid
    return best


def variants_table(rows: list[dict], keys: tuple[str, ...] = ()) -> list[str]:
    """Mean ± std over seeds of the per-seed means over categories, the kNN row beside; only
    the (category, seed) pairs that every row has count, so that the rows compare like with
    like while a stage is unfinished (the per-category table shows everything)."""
    names = {label(run, keys if run["model"] != REFERENCE else ()) for run in rows}
    pairs: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for run in rows:
        name = label(run, keys if run["model"] != REFERENCE else ())
        pairs[name].add((run["category"], int(run["seed"])))
    common = full_grid(set.intersection(*(pairs[n] for n in names)) if names else set())
    if not common:
        return ["No category and seed has every row of this table yet (see per category)."]
    left_out = sorted({p for n in names for p in pairs[n]} - common)
    rows = [r for r in rows if (r["category"], int(r["seed"])) in common]
    caption = [
        f"Over the categories {', '.join(sorted({c for c, _ in common}))} and seeds "
        f"{', '.join(str(s) for s in sorted({s for _, s in common}))}: every row has each of "
        "these categories at each of these seeds.",
        "",
    ]
    if left_out:
        caption[0] += (
            f" Left out ({len(left_out)} category/seed pairs: some row lacks them, or some "
            "other seed lacks their category): "
            + ", ".join(f"{c} seed {s}" for c, s in left_out)
            + "."
        )
    by_variant: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    categories: dict[str, set[str]] = defaultdict(set)
    for run in rows:
        name = label(run, keys if run["model"] != REFERENCE else ())
        categories[name].add(run["category"])
        for metric in METRICS:
            by_variant[name][int(run["seed"])][metric].append(run[metric])
    reference = next((n for n in by_variant if n == REFERENCE), None)
    out = [
        *caption,
        "| variant | seeds | categories | "
        + " | ".join(NAMES[m] for m in METRICS)
        + " | image AUROC vs kNN |",
        "|---|---|---|" + "---|" * len(METRICS) + "---|",
    ]

    def per_seed(name: str, metric: str) -> list[float]:
        return [statistics.mean(v[metric]) for v in by_variant[name].values()]

    order = sorted(by_variant, key=lambda n: (n == REFERENCE, n))
    for name in order:
        cells = [mean_std(per_seed(name, metric)) for metric in METRICS]
        gap = ""
        if reference is not None and name != reference:
            delta = statistics.mean(per_seed(name, "image_auroc")) - statistics.mean(
                per_seed(reference, "image_auroc")
            )
            gap = f"{100 * delta:+.2f}"
        shown = f"**{name}** (reference)" if name == REFERENCE else name
        out.append(
            f"| {shown} | {len(by_variant[name])} | {len(categories[name])} | "
            + " | ".join(cells)
            + f" | {gap} |"
        )
    return out


def split_partial(rows: list[dict]) -> tuple[list[dict], str]:
    """The runs of the variants that have every (category, seed) pair of the kNN line, and a
    line naming the others (a variant added to a study later, still running): they are left
    out of the mean table, which would otherwise shrink to the pairs they have, and shown in
    the per-category tables."""
    pairs: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for run in rows:
        pairs[run["model"]].add((run["category"], int(run["seed"])))
    full = pairs.get(REFERENCE) or set.union(*pairs.values())
    short = sorted(m for m, got in pairs.items() if not full <= got)
    if not short:
        return rows, ""
    note = "Not yet in this table (runs still to do; per category below): " + ", ".join(
        f"{m} ({len(pairs[m] & full)} of {len(full)} category/seed pairs)" for m in short
    )
    return [r for r in rows if r["model"] not in short], note + "."


def per_category(
    rows: list[dict], keys: tuple[str, ...] = (), metric: str = "image_auroc"
) -> list[str]:
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in rows:
        name = label(run, keys if run["model"] != REFERENCE else ())
        values[name][run["category"]].append(run[metric])
    categories = sorted({c for v in values.values() for c in v})
    out = [
        "| variant | " + " | ".join(categories) + " |",
        "|---|" + "---|" * len(categories),
    ]
    for name in sorted(values, key=lambda n: (n == REFERENCE, n)):
        cells = [mean_std(values[name][c]) if values[name].get(c) else "–" for c in categories]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def convergence() -> list[str]:
    rows = [r for r in runs("convergence") if r["model"] != REFERENCE]
    if not rows:
        return []
    epochs = sorted({int(r["config"]["trainer"]["max_epochs"]) for r in rows})
    out = ["## Convergence (category coffee, seed 0, Lite0 teacher, 128 px)", ""]
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        out += [
            f"{NAMES[metric]} (%) against epochs:",
            "",
            "| variant | " + " | ".join(str(e) for e in epochs) + " |",
            "|---|" + "---|" * len(epochs),
        ]
        table: dict[str, dict[int, float]] = defaultdict(dict)
        for run in rows:
            table[run["model"]][int(run["config"]["trainer"]["max_epochs"])] = run[metric]
        for model in sorted(table):
            cells = [f"{100 * table[model][e]:.1f}" if e in table[model] else "–" for e in epochs]
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        knn = [r for r in runs("convergence") if r["model"] == REFERENCE]
        if knn:
            out.append(
                f"| **knn** (no training) | {100 * knn[0][metric]:.1f} |" + " |" * (len(epochs) - 1)
            )
        out.append("")
    return out


def layers(headline: list[dict]) -> list[str]:
    """The layers stage beside the headline runs of the same models, categories and seeds:
    one table per set of teacher stages, each with the kNN line on those stages, then image
    AUROC and AUPRO per category with every row named by its stages."""
    rows = runs("layers")
    if not rows:
        return []
    categories = {r["category"] for r in rows}
    # A headline run only where the stage has its model, category and seed: the two sets of
    # stages are compared over the same runs while the stage is unfinished.
    done = {(r["model"], r["category"], int(r["seed"])) for r in rows}
    rows += [r for r in headline if (r["model"], r["category"], int(r["seed"])) in done]
    stages = defaultdict(list)
    for run in rows:
        stages[tuple(run["config"]["model"]["layers"])].append(run)
    out = [f"## Teacher layers (Lite0; categories {', '.join(sorted(categories))})", ""]
    for chosen in sorted(stages):
        out += [f"Teacher stages {list(chosen)}:", "", *variants_table(stages[chosen]), ""]
    named = [{**r, "model": label(r, ("model.layers",))} for r in rows]
    for metric in ("image_auroc", "pixel_aupro"):
        out += [f"{NAMES[metric][0].upper()}{NAMES[metric][1:]} per category:", ""]
        out += [*per_category(named, metric=metric), ""]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    lines = [
        "# Photos studies: tables from the committed results",
        "",
        "Written by `python experiments/photos/summary.py` from `results/<stage>/<run>/metrics.json`.",
        "Metrics in %, mean ± std over seeds (a seed's value: the mean over the table's",
        "categories; a table holds the largest categories x seeds grid that all its rows",
        "have, so that every seed's mean is over the same categories);",
        "`image AUROC vs kNN`: the row's mean minus the kNN line's, in points.",
        "",
    ]
    lines += convergence()
    for stage, title in (("headline", "Headline: Lite0 teacher"), ("lite2", "Lite2 teacher")):
        rows = runs(stage)
        if rows:
            complete, partial = split_partial(rows)
            lines += [f"## {title}", "", *variants_table(complete), ""]
            if partial:
                lines += [partial, ""]
            for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
                lines += [f"{NAMES[metric][0].upper()}{NAMES[metric][1:]} per category:", ""]
                lines += [*per_category(rows, metric=metric), ""]
    headline = runs("headline")
    for stage, (model, options) in SWITCHES.items():
        rows = runs(stage)
        if not rows:
            continue
        keys = tuple(sorted({o.split("=", 1)[0] for option in options for o in option.split()}))
        categories = {r["category"] for r in rows}
        seeds = {int(r["seed"]) for r in rows}
        reference = [
            r
            for r in headline
            if r["model"] in (model, NAMED_VARIANT.get(model), REFERENCE)
            and r["category"] in categories
            and int(r["seed"]) in seeds
        ]
        lines += [
            f"## Switch: {stage} (`model={model}`, categories {', '.join(sorted(categories))})",
            "",
            *variants_table([*rows, *reference], keys),
            "",
        ]
    lines += layers(headline)
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
