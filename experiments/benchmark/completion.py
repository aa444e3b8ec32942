"""Shell completion latency: how long one TAB takes for each kdad command.

A TAB runs the command with Hydra's completion query (``-sc query=bash``) and the command line
typed so far; this times that (a new process each time, as the shell starts one), median of
``--repeats``.

    python experiments/benchmark/completion.py --out experiments/benchmark/results/completion_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "kdad-train": "kdad-train model=",
    "kdad-eval": "kdad-eval data.",
    "kdad-predict": "kdad-predict ",
    "kdad-export": "kdad-export format=",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    bin_dir = Path(sys.executable).parent
    rows = {}
    for command, typed in CASES.items():
        exe = shutil.which(command, path=str(bin_dir)) or command
        times, shown = [], ""
        for _ in range(args.repeats):
            env = {**os.environ, "COMP_LINE": typed, "COMP_POINT": str(len(typed))}
            start = time.perf_counter()
            proc = subprocess.run(
                [exe, "-sc", "query=bash"], env=env, capture_output=True, text=True, check=True
            )
            times.append(time.perf_counter() - start)
            shown = proc.stdout.split()[:4]
        rows[command] = {"typed": typed, "median_s": statistics.median(times), "first": shown}
    lines = [
        f"Shell completion, one TAB (median of {args.repeats}; {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()})",
        "",
        "| command | typed | seconds per TAB | first completions |",
        "|---|---|---|---|",
    ]
    for command, row in rows.items():
        lines.append(
            f"| {command} | `{row['typed']}` | {row['median_s']:.2f} | {' '.join(row['first'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
