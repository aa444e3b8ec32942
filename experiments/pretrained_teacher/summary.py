"""The study's one table: every variant and switch, mean ± std over seeds.

For each run folder (metrics.json, scores.csv, .hydra/overrides.yaml) under the sweep folders
given, the variant is the model plus its overrides other than data.category, seed and the
experiment; a seed's value is the mean over the categories it ran on, and the table gives the
mean ± std of those per-seed values (so the spread is the seeds', not the categories').
``subtle`` is the image AUROC of the subtle defects (faint_spot, warp) against the normal test
images (subtle.py). Parameter counts and training throughput are means over the runs.

    python experiments/pretrained_teacher/summary.py logs/pretrained_teacher/* > results/summary.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from subtle import per_defect

COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro", "subtle")
NOISE = ("data.category", "seed", "experiment", "hydra.")


def variant(run: Path, metrics: dict) -> str:
    overrides = run / ".hydra" / "overrides.yaml"
    parts = []
    for line in overrides.read_text().splitlines() if overrides.is_file() else []:
        item = line.strip().lstrip("- ").strip()
        key = item.split("=", 1)[0]
        if "=" in item and not key.startswith(NOISE) and key != "model":
            parts.append(item.removeprefix("model."))
    return metrics["model"] + (f" [{', '.join(parts)}]" if parts else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    # variant -> seed -> column -> [values over categories]
    table: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    extra: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for folder in args.folders:
        for path in sorted(folder.rglob("metrics.json")):
            run, metrics = path.parent, json.loads(path.read_text())
            name = variant(run, metrics)
            cells = table[name][int(metrics["seed"])]
            for key in COLUMNS[:3]:
                cells[key].append(float(metrics[key]))
            if (run / "scores.csv").is_file():
                cells["subtle"].append(per_defect(run / "scores.csv")["subtle"])
            extra[name]["params"].append(float(metrics["params_trainable"]))
            extra[name]["ips"].append(float(metrics["train_images_per_second"]))
    if not table:
        print(f"no metrics.json under {args.folders}", file=sys.stderr)
        return 1
    print("| variant | seeds | " + " | ".join(COLUMNS) + " | trainable params | train img/s |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 2))
    for name in sorted(table):
        seeds = table[name]
        cells = []
        for key in COLUMNS:
            per_seed = [statistics.fmean(v[key]) for v in seeds.values() if v[key]]
            mean = statistics.fmean(per_seed)
            std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
            cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}")
        params = statistics.fmean(extra[name]["params"])
        ips = statistics.fmean(extra[name]["ips"])
        print(
            f"| {name} | {len(seeds)} | "
            + " | ".join(cells)
            + f" | {params / 1e6:.2f} M | {ips:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
