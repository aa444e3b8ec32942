"""``kdad-aggregate DIR``: one table (and plots) from every run under DIR.

    kdad-aggregate logs/train/multiruns/<date_time>
    kdad-aggregate logs/train/multiruns/<date_time> --wandb --project kdad
    kdad-aggregate dir=logs/train/multiruns/<date_time> wandb=true plots=false   # Hydra-style

Both grammars are accepted: ``--flag`` options, or ``key=value`` pairs as every other kdad
command takes them (``dir``, ``plots``, ``wandb``, ``project``, ``entity``, ``group``). It is
not a Hydra app because it reads finished runs and composes no config. A multirun already
aggregates itself when it ends (``SweepSummary`` in conf/hydra/default.yaml); this command
re-does it, e.g. over several sweeps. See :mod:`kdad.engine.aggregate`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kdad.engine.aggregate import summarize
from kdad.errors import KDADError

_BOOLEAN = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _hydra_style(items: list[str]) -> list[str]:
    """``key=value`` pairs -> the equivalent ``--flag`` arguments."""
    argv: list[str] = []
    for item in items:
        if item.startswith("-") or "=" not in item:
            argv.append(item)
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if key == "dir":
            argv.append(value)
        elif key in ("plots", "wandb"):
            if value.lower() not in _BOOLEAN:
                raise KDADError(f"{key}={value!r}: expected true or false")
            on = _BOOLEAN[value.lower()]
            if key == "wandb" and on:
                argv.append("--wandb")
            if key == "plots" and not on:
                argv.append("--no-plots")
        elif key in ("project", "entity", "group"):
            argv += [f"--{key}", value]
        else:
            raise KDADError(
                f"{key}={value}: unknown key; valid: dir, plots, wandb, project, entity, group"
            )
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdad-aggregate", description=__doc__.split("\n\n")[0])
    from kdad import __version__

    parser.add_argument("--version", action="version", version=f"kdad {__version__}")
    parser.add_argument("dir", type=Path, help="a folder with runs (e.g. a multirun folder)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--wandb", action="store_true", help="log the table and plots as a W&B summary run"
    )
    parser.add_argument("--project", default="kdad", help="W&B project (default: kdad)")
    parser.add_argument("--entity", default=None, help="W&B entity (team or user)")
    parser.add_argument(
        "--group", default=None, help="W&B group (default: the runs' own group, else DIR's name)"
    )
    try:
        args = parser.parse_args(_hydra_style(list(sys.argv[1:] if argv is None else argv)))
        text = summarize(
            args.dir, not args.no_plots, args.wandb, args.project, args.entity, args.group
        )
    except KDADError as exc:
        print(f"kdad-aggregate: error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
