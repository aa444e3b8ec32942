"""The photos studies (README.md beside this file): every variant on ``data=photos`` with the
packaged ImageNet teachers, the ``model=knn`` line beside it, one committed results file per run.

    python experiments/photos/study.py convergence     # metrics against epochs, one category
    python experiments/photos/study.py headline        # every variant x category x 3 seeds, Lite0
    python experiments/photos/study.py switches        # HKT, HKT+ and NFERD switch studies
    python experiments/photos/study.py lite2           # the headline with Lite2 on 3 categories
    python experiments/photos/study.py layers          # deeper teacher layers where kNN leads
    python experiments/photos/study.py all             # convergence, then seed by seed, then Lite2
    python experiments/photos/study.py headline --list # the runs and whether each is done
    python experiments/photos/study.py headline --code /path/to/checkout  # run that code

``--code`` runs the study with the kdad of another checkout of this repository (a fixed
commit, e.g. ``git worktree add --detach ../kdad-study``) on ``PYTHONPATH``, so that editing
this checkout cannot change a study half-way; ``RUN.md`` records that checkout's commit.

Each run is one ``kdad-train`` command with its own run folder under ``logs/photos/`` (ignored
by git). When it has finished, its ``metrics.json``, ``config.yaml`` and ``scores.csv`` are
copied to ``results/<stage>/<run>/`` beside this script (committed), and a run whose results
are there is skipped: a study continues across sessions where it stopped. After each stage,
``kdad-aggregate`` writes the stage's tables (``aggregate.md``/``.csv``, mean ± std over seeds)
from the committed results only; ``RUN.md`` records each run's command, commit, wall time, CPU
and threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RESULTS = HERE / "results"
LOGS = ROOT / "logs" / "photos"
BIN = Path(os.environ.get("BIN", ROOT / ".venv" / "bin"))

CATEGORIES = ("moon", "retina", "coffee", "flower", "coins", "china")
SEEDS = (0, 1, 2)
# The five paper variants (their defaults), kdad's named variants, and the reference line.
VARIANTS = ("stfpm", "rd", "hkt", "hkt_plus", "nferd", "nferd_plus", "hkt_both")
REFERENCE = "knn"
# kdad's variants named after the pinned commit (03065bd) was set: spelled out as the options
# their config sets, so that every headline row runs the same code. conf/model/hkt_both.yaml
# is model=hkt with model.alignment=both (tests/models/test_hkt.py checks the two compose
# alike); its budget is HKT's (same network, more pairs; no convergence chain of its own).
SPELLED = {"hkt_both": ["model=hkt", "model.alignment=both", "model_name=hkt_both"]}
# Training epochs of each variant, chosen from the convergence stage (README.md): the first
# count in the chain after which doubling it changes image AUROC and AUPRO by less than about
# two points (STFPM, which takes 3 steps per epoch at batch 32, was still rising at 320; 320
# is its budget, the most the study affords: said so in README.md).
EPOCHS = {"rd": 80, "nferd": 160, "nferd_plus": 160, "hkt": 160, "hkt_plus": 160, "stfpm": 320}
EPOCHS["hkt_both"] = EPOCHS["hkt"]
# The convergence chain: each run resumes the previous one's last.ckpt (no learning-rate
# schedule, so a run of E epochs is the first E epochs of a longer one).
CHAIN = (5, 10, 20, 40, 80, 160, 320)
CONVERGENCE_CATEGORY = "coffee"
# The Lite2 replication: three categories (one texture, two objects).
LITE2_CATEGORIES = ("moon", "coffee", "coins")
# The switch studies: three categories, one switch each against its method's default.
SWITCH_CATEGORIES = ("retina", "coffee", "coins")
SWITCHES = {
    "hkt_plus_source": ("hkt_plus", ["model.extra_source=next_block", "model.extra_source=random"]),
    "hkt_cross_scale": ("hkt", ["model.cross_scale=level", "model.alignment=both"]),
    "hkt_cbam": ("hkt", ["model.cbam=false"]),
    "nferd_recall": ("nferd", ["model.nfb.recall=per_position"]),
    "nferd_weights": (
        "nferd",
        ["model.nfb.weighting=softmax model.nfb.temperature=0.05 model.nfb.learn_temperature=true"],
    ),
    "nferd_grad": ("nferd", ["model.nfb.similarity_grad=false"]),
    "nferd_exclude_self": ("nferd", ["model.nfb.exclude_self=true"]),
    "nferd_no_bank": ("nferd", ["model.nfb.enabled=false"]),
}
# The teacher-layers study: where a paper variant's image AUROC is short of the kNN line in the
# headline (RD4AD and NFERD on flower and coffee, NFERD on china), the same runs with the
# teacher's stages 2-4 (strides 8, 16, 32) instead of 1-3, and the kNN line on those stages:
# each against the headline run of the same model, category and seed.
LAYERS_CATEGORIES = ("flower", "coffee", "china")
LAYERS_MODELS = ("rd", "nferd", REFERENCE)
LAYERS_OPTION = "model.layers=[2,3,4]"

BASE = [
    "data=photos",
    "data.image_size=128",
    "data.num_workers=0",
    "model.pretrained=true",
    "logger=csv",
]


def teacher(name: str) -> list[str]:
    return [f"model.backbone={name}"]


def run_name(model: str, category: str, seed: int, extra: list[str]) -> str:
    """``<model>[_<key>-<value>...]_<category>_seed<seed>``: one tag per override, also where
    one option sets several keys (``"a.b=1 a.c=2"``), so the name has no spaces or ``=``."""
    parts = [part for option in extra for part in option.split()]
    tag = "".join(
        f"_{p.split('=', 1)[0].rsplit('.', 1)[-1]}-{_tag(p.split('=', 1)[1])}" for p in parts
    )
    return f"{model}{tag}_{category}_seed{seed}"


def _tag(value: str) -> str:
    """An override's value in a folder name: a list ``[2,3,4]`` as ``2-3-4``."""
    return value.strip("[]").replace(",", "-").replace(" ", "")


def stage_runs(stage: str) -> list[tuple[str, list[str], str | None]]:
    """(run name, kdad-train overrides, the run it resumes or None) for one stage."""
    runs: list[tuple[str, list[str], str | None]] = []
    lite0 = teacher("tf_efficientnet_lite0")

    def trained(model, category, seed, extra, backbone=lite0):
        name = run_name(model, category, seed, extra)
        overrides = [
            *SPELLED.get(model, [f"model={model}"]),
            *backbone,
            f"data.category={category}",
            f"seed={seed}",
            *[part for option in extra for part in option.split()],
        ]
        if model != REFERENCE:
            overrides.append(f"trainer.max_epochs={EPOCHS[model]}")
        runs.append((name, overrides, None))

    if stage == "convergence":
        for model in (v for v in VARIANTS if v not in SPELLED):
            previous = None
            for epochs in CHAIN:
                name = f"{model}_{CONVERGENCE_CATEGORY}_seed0_epochs{epochs:03d}"
                overrides = [
                    f"model={model}",
                    *lite0,
                    f"data.category={CONVERGENCE_CATEGORY}",
                    "seed=0",
                    f"trainer.max_epochs={epochs}",
                    "test_ckpt=last",  # the curve follows the weights being trained
                ]
                runs.append((name, overrides, previous))
                previous = name
        trained(REFERENCE, CONVERGENCE_CATEGORY, 0, [])
    elif stage == "headline":  # seed by seed: a first complete table early
        for seed in SEEDS:
            for category in CATEGORIES:
                for model in (*VARIANTS, REFERENCE):
                    trained(model, category, seed, [])
    elif stage == "lite2":
        lite2 = teacher("tf_efficientnet_lite2")
        for seed in SEEDS:
            for category in LITE2_CATEGORIES:
                for model in (*VARIANTS, REFERENCE):
                    trained(model, category, seed, [], backbone=lite2)
    elif stage == "layers":
        for seed in SEEDS:
            for category in LAYERS_CATEGORIES:
                for model in LAYERS_MODELS:
                    trained(model, category, seed, [LAYERS_OPTION])
    elif stage in SWITCHES:
        model, options = SWITCHES[stage]
        for seed in SEEDS:
            for category in SWITCH_CATEGORIES:
                for option in options:
                    trained(model, category, seed, [option])
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    return runs


CODE = ROOT  # the checkout whose kdad the runs use (--code)
# -P: ``python -m`` must not put the working folder (this checkout) in front of --code's
# checkout on sys.path (Python >= 3.11).
PYTHON_FLAGS: list[str] = []


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=CODE,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s first ``model name``, else the platform's)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return cpu


def hardware() -> str:
    return f"{os.cpu_count()} CPU cores ({cpu_name()}), no GPU"


def threads() -> str:
    """What each run's ``OMP_NUM_THREADS`` is (unset: torch's default, one per core)."""
    return _environment().get("OMP_NUM_THREADS") or f"unset ({os.cpu_count()} cores)"


THREADS: str | None = None  # OMP_NUM_THREADS of each run (--jobs > 1: one thread each)


def execute(stage: str, name: str, overrides: list[str], resumes: str | None) -> bool:
    dest = RESULTS / stage / name
    if (dest / "metrics.json").is_file():
        return False
    folder = LOGS / stage / name
    command = [str(BIN / "python"), *PYTHON_FLAGS, "-m", "kdad.cli.train", *BASE, *overrides]
    command.append(f"hydra.run.dir={folder}")
    if resumes is not None:
        previous = LOGS / stage / resumes
        if not (previous / "checkpoints" / "last.ckpt").is_file():
            raise SystemExit(f"{name} resumes {previous}, which has no checkpoint: run it first")
        command.append(f"ckpt_path={previous}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # What kdad-train's resume=auto will do with the folder (kdad/engine/run.py, _previous): a
    # finished run (metrics.json) is kept, an interrupted one (last.ckpt) resumed; the wall time
    # below is then not the whole run's, and the record says so.
    note = ""
    if (folder / "metrics.json").is_file():
        note = " (finished before, only copied now)"
    elif resumes is None and (folder / "checkpoints" / "last.ckpt").is_file():
        note = " after resuming an interrupted run"
    started = time.time()
    with open(LOGS / stage / f"{name}.log", "w") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_environment()
        ).returncode
    took = time.time() - started
    if code != 0 or not (folder / "metrics.json").is_file():
        print(f"  {name}: FAILED (exit {code}; see {LOGS / stage / name}.log)", flush=True)
        return True
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in ("metrics.json", "config.yaml", "scores.csv"):
        if (folder / file).is_file():
            (tmp / file).write_text(portable((folder / file).read_text()))
    tmp.rename(dest)  # the results of a run appear whole or not at all
    shown = portable(
        " ".join(o for o in command[3 + len(PYTHON_FLAGS) :] if not o.startswith("hydra.run.dir"))
    )
    with open(RESULTS / stage / "RUN.md", "a") as record:
        # The machine and threads of each run: a study continues across sessions on whatever
        # machine each is given, and float rounding (so a run's exact figures) differs with them.
        record.write(
            f"- `{name}`: {took:.0f} s{note}, "
            f"commit {commit()}, {cpu_name()}, "
            f"OMP_NUM_THREADS={threads()}: `kdad-train {shown}`\n"
        )
    print(f"  {name}: {took:.0f} s", flush=True)
    return True


def portable(text: str) -> str:
    """``text`` with this checkout's absolute path made relative to it (committed results
    name ``logs/...`` and ``.cache/...``, not one machine's folders)."""
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    if THREADS is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = THREADS
    if CODE != ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE), env.get("PYTHONPATH")]))
    return env


def aggregate(stage: str) -> None:
    """The stage's tables (``aggregate.md``/``.csv``) by kdad-aggregate from the committed
    results. A switch stage's table also holds its method's default and the kNN line on the
    same categories and seeds, the layers stage's the headline runs of the models, categories
    and seeds it has run (their runs are the headline's: copied for the table only)."""
    folder = RESULTS / stage
    if not any(folder.glob("*/metrics.json")):
        return
    source = folder
    scratch = None
    if stage in SWITCHES or stage == "layers":
        if stage == "layers":
            references, categories = LAYERS_MODELS, LAYERS_CATEGORIES
        else:
            references, categories = (SWITCHES[stage][0], REFERENCE), SWITCH_CATEGORIES
        scratch = Path(tempfile.mkdtemp(prefix=f"{stage}-", dir=LOGS))
        for run in folder.glob("*/metrics.json"):
            shutil.copytree(run.parent, scratch / run.parent.name)
        for reference in references:
            for category in categories:
                for seed in SEEDS:
                    name = run_name(reference, category, seed, [])
                    # layers: only beside the stage's own run (an unfinished stage compares
                    # the two sets of stages over the same runs)
                    if stage == "layers":
                        own = run_name(reference, category, seed, [LAYERS_OPTION])
                        if not (folder / own / "metrics.json").is_file():
                            continue
                    if (RESULTS / "headline" / name / "metrics.json").is_file():
                        shutil.copytree(RESULTS / "headline" / name, scratch / name)
        source = scratch
    try:
        subprocess.run(
            [
                str(BIN / "python"),
                *PYTHON_FLAGS,
                "-m",
                "kdad.cli.aggregate",
                str(source),
                "--no-plots",
            ],
            cwd=ROOT,
            env=_environment(),
            check=False,
            stdout=subprocess.DEVNULL,
        )
        if scratch is not None:
            for table in ("aggregate.md", "aggregate.csv"):
                if (scratch / table).is_file():
                    shutil.copy2(scratch / table, folder / table)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_all(stage: str, runs: list[tuple[str, list[str], str | None]], jobs: int) -> None:
    """Every run of the stage, ``jobs`` at a time; a run that resumes another starts after it."""
    pending = list(runs)
    active: dict[str, threading.Thread] = {}
    done = {n for n, _, _ in runs if (RESULTS / stage / n / "metrics.json").is_file()}
    while pending or active:
        for name, thread in list(active.items()):
            if not thread.is_alive():
                del active[name]
                done.add(name)
        ready = [r for r in pending if r[2] is None or r[2] in done]
        while ready and len(active) < jobs:
            name, overrides, resumes = ready.pop(0)
            pending.remove((name, overrides, resumes))
            thread = threading.Thread(target=execute, args=(stage, name, overrides, resumes))
            thread.start()
            active[name] = thread
        if not ready and not active and pending:
            raise SystemExit(f"{stage}: runs wait for runs that are not in the stage: {pending}")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "stage", help="convergence | headline | switches | lite2 | layers | all | a switch"
    )
    parser.add_argument("--list", action="store_true", help="list the runs, do nothing")
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose kdad to run")
    parser.add_argument(
        "--seeds", default=None, help="only these seeds, e.g. 0 or 0,1 (default: all of SEEDS)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, one thread each (small networks use 2 cores better this way)",
    )
    args = parser.parse_args(argv)
    global CODE, THREADS
    if args.jobs > 1:
        THREADS = "1"
    if args.code is not None:
        CODE = args.code.resolve()
        if not (CODE / "kdad" / "cli" / "train.py").is_file():
            raise SystemExit(f"--code {CODE}: not a kdad checkout")
        # kdad.conf is found beside kdad/ in that checkout (a link, as an installed package has it)
        link = CODE / "kdad" / "conf"
        if not link.exists():
            link.symlink_to(Path("..") / "conf")
        PYTHON_FLAGS.append("-P")
        where = subprocess.run(
            [str(BIN / "python"), "-P", "-c", "import kdad; print(kdad.__file__)"],
            env=_environment(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(where).resolve().is_relative_to(CODE):
            raise SystemExit(f"--code {CODE}: the runs would import kdad from {where}")
        print(f"kdad from {where}", flush=True)
    # (stage, seeds or None): "all" goes seed by seed through the headline and the switch
    # studies, so that every table has its first seeds early, then Lite2.
    if args.stage == "all":
        stages = [("convergence", None)]
        for seed in SEEDS:
            stages += [("headline", str(seed)), *[(s, str(seed)) for s in SWITCHES]]
        stages.append(("lite2", None))
    elif args.stage == "switches":
        stages = [(s, args.seeds) for s in SWITCHES]
    else:
        stages = [(args.stage, args.seeds)]
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for stage, seeds in stages:
        runs = stage_runs(stage)
        if seeds is not None:
            wanted = {f"_seed{s}" for s in seeds.split(",")}
            runs = [r for r in runs if any(r[0].endswith(w) or f"{w}_" in r[0] for w in wanted)]
        if args.list:
            for name, overrides, _ in runs:
                done = (RESULTS / stage / name / "metrics.json").is_file()
                print(f"{stage} {name} {'done' if done else 'todo'}: {' '.join(overrides)}")
            continue
        (RESULTS / stage).mkdir(parents=True, exist_ok=True)
        record = RESULTS / stage / "RUN.md"
        if not record.is_file():  # the hardware of the session that started the stage
            record.write_text(
                f"# {stage}\n\nhardware: {hardware()}; python {platform.python_version()}\n"
                f"common overrides: `{' '.join(BASE)}`\n\n"
            )
        todo = sum(not (RESULTS / stage / n / "metrics.json").is_file() for n, _, _ in runs)
        print(f"{stage}: {len(runs)} runs, {todo} to do", flush=True)
        run_all(stage, runs, args.jobs)
        aggregate(stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
