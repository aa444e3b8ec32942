"""``kdad-aggregate DIR``: the tables and figures of a paper from every run under DIR.

    kdad-aggregate logs/train/multiruns/<date_time>
    kdad-aggregate logs/train/multiruns/<date_time> --pivot model --metrics image_auroc,pixel_aupro
    kdad-aggregate logs/train/multiruns/<date_time> --pivot model.cbam --print tex > table.tex
    kdad-aggregate dir=logs/train/multiruns/<date_time> wandb=true plots=false   # Hydra-style

Options (``--flag value`` or ``key=value``, as every other kdad command takes them):
  --pivot KEY            one table per metric, a column per value of KEY: model (categories x
                         models), data, category, seed or a config key (model.cbam)
  --metrics A,B          metrics.json keys in the tables (default: every metric, and train
                         img/s in the long table; the CSV holds every key)
  --mean-spread S        the mean rows' ±: seeds (std over seeds of the mean over categories,
                         the default) or categories (std over the categories' means)
  --print FMT            what to print: md (default), tex (booktabs) or csv
  --defects              also print the per-defect-type image AUROC table
  --figure-formats F,G   figure files: png, pdf, svg (default: png,pdf)
  --no-plots             no figures;  --wandb [--project --entity --group]: a W&B summary run

Tables go to stdout, notes (files written, missing runs) to stderr. It is not a Hydra app
because it reads finished runs and composes no config. A multirun already aggregates itself
when it ends (``SweepSummary`` in conf/hydra/default.yaml); this command re-does it, e.g. over
several sweeps. What each table and figure holds: :mod:`kdad.engine.aggregate`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kdad.engine.aggregate import MEAN_SPREADS, PRINT_FORMATS, summarize
from kdad.errors import KDADError
from kdad.io.run_folder import METRICS

_BOOLEAN = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
# key=value keys: those with a value, and the switches (the flag a true or false value gives).
_WANDB_KEYS = ("project", "entity", "group")
_VALUED = (*_WANDB_KEYS, "pivot", "metrics", "mean_spread", "print", "figure_formats")
_SWITCHES = {
    "wandb": ("--wandb", None),
    "defects": ("--defects", None),
    "plots": (None, "--no-plots"),
}


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
        elif key in _SWITCHES:
            if value.lower() not in _BOOLEAN:
                raise KDADError(f"{key}={value!r}: expected true or false")
            flag = _SWITCHES[key][0 if _BOOLEAN[value.lower()] else 1]
            argv += [flag] if flag else []
        elif key in _VALUED:
            argv += [f"--{key.replace('_', '-')}", value]
        else:
            valid = ", ".join(["dir", *_SWITCHES, *_VALUED])
            raise KDADError(f"{key}={value}: unknown key; valid: {valid}")
    return argv


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as every kdad user error
        raise KDADError(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="kdad-aggregate", description=__doc__.split("\n\n")[0])
    from kdad import __version__

    add = parser.add_argument
    add("--version", action="version", version=f"kdad {__version__}")
    add("dir", type=Path, help="a folder with runs (e.g. a multirun folder)")
    add("--no-plots", dest="plots", action="store_false", help="no figures")
    add("--wandb", action="store_true", help="log tables and figures as a W&B summary run")
    add("--project", default="kdad", help="W&B project (default: kdad)")
    add("--entity", default=None, help="W&B entity (team or user)")
    add("--group", default=None, help="W&B group (default: the runs' group, else DIR's name)")
    add("--pivot", help="model, data, category, seed or a config key: a column per value")
    add("--metrics", help=f"comma-separated {METRICS} keys (default: every metric)")
    add("--mean-spread", choices=MEAN_SPREADS, default=argparse.SUPPRESS, help="mean rows' ±")
    add("--print", dest="print_format", choices=PRINT_FORMATS, default=argparse.SUPPRESS)
    add("--defects", action="store_true", help="also print the per-defect-type table")
    add("--figure-formats", help="comma-separated: png, pdf, svg (default: png,pdf)")
    try:
        args = vars(parser.parse_args(_hydra_style(list(sys.argv[1:] if argv is None else argv))))
        text, notes = summarize(args.pop("dir"), **args)
    except KDADError as exc:
        print(f"kdad-aggregate: error: {exc}", file=sys.stderr)
        return 2
    print(text, end="" if text.endswith("\n") else "\n")
    print("\n".join(notes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
