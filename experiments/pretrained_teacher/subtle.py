"""Image AUROC per defect type (each defect's images against the normal test images).

Reads every ``scores.csv`` (path, defect_type, label, score) under the given folders, e.g. a
``kdad-train -m`` sweep, and prints one row per run plus, with ``--by``, the mean over the
runs that share the named config keys. The synthetic data's subtle defects are ``faint_spot``
and ``warp``; ``subtle`` is the AUROC of both together against the normal images.

    python experiments/pretrained_teacher/subtle.py logs/pretrained_teacher/multiruns/<date_time>
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SUBTLE = ("faint_spot", "warp")


def auroc(positives: list[float], negatives: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def per_defect(scores_csv: Path) -> dict[str, float]:
    by_type: dict[str, list[float]] = defaultdict(list)
    with open(scores_csv) as handle:
        for row in csv.DictReader(handle):
            by_type[row["defect_type"]].append(float(row["score"]))
    good = by_type.pop("good", [])
    result = {name: auroc(values, good) for name, values in sorted(by_type.items())}
    subtle = [v for name in SUBTLE for v in by_type.get(name, [])]
    if subtle and good:
        result["subtle"] = auroc(subtle, good)
    return result


def run_key(run_dir: Path, keys: list[str]) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    overrides = run_dir / ".hydra" / "overrides.yaml"
    given = {}
    if overrides.is_file():
        for line in overrides.read_text().splitlines():
            item = line.strip().lstrip("- ").strip()
            if "=" in item:
                key, value = item.split("=", 1)
                given[key] = value
    values = {**{k: str(v) for k, v in metrics.items()}, **given}
    return " ".join(f"{k}={values.get(k, '?')}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--by", nargs="*", default=["model"], help="config keys to group by")
    args = parser.parse_args(argv)
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for folder in args.folders:
        for scores in sorted(folder.rglob("scores.csv")):
            if (scores.parent / "metrics.json").is_file():
                groups[run_key(scores.parent, args.by)].append(per_defect(scores))
    if not groups:
        print(f"no scores.csv with metrics.json under {args.folders}", file=sys.stderr)
        return 1
    names = sorted({name for runs in groups.values() for run in runs for name in run})
    print("| " + " | ".join(["runs", "n", *names]) + " |")
    print("|" + " --- |" * (len(names) + 2))
    for key, runs in sorted(groups.items()):
        cells = []
        for name in names:
            values = [run[name] for run in runs if name in run]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}")
        print("| " + " | ".join([key, str(len(runs)), *cells]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
