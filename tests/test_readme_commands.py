"""Every shell command in the documentation runs as a user types it.

The commands come from the ```bash blocks of README.md, experiments/*/README.md and
kdad/**/README.md, in their order, and run in one empty folder outside the checkout (so
``<run>`` and ``<date>_<time>`` are the run and sweep folders that earlier commands made
there). A command may only get budget-shrinking overrides appended (:data:`SHRINK`: a tiny
random backbone, small images and data, one epoch, no logger); ``hydra.sweep.dir`` and
``hydra.run.dir`` are never added. What CI cannot run is composed only (``--cfg job
--resolve``: the config must build), each case with its reason (:func:`plan`); scripts of the
studies and benchmarks are checked to parse their command line (``--help``). A new command in
a README is tested without anyone remembering to.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from clirun import run_in_process

# One worker runs this file's commands, in order (make test: pytest-xdist --dist loadgroup).
pytestmark = pytest.mark.xdist_group("readme_commands")

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("experiments/*/README.md"))]
DOCS += sorted(ROOT.glob("kdad/**/README.md"))

# Appended to the commands that run for real: a small budget, nothing else.
SHRINK = [
    "model.backbone=resnet18",
    "model.pretrained=false",
    "data.image_size=64",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "logger=none",
]
SHRINK_DATA = {
    "synthetic": [
        "data.synthetic.resolution=64",
        "data.synthetic.num_train=16",
        "data.synthetic.num_test_good=4",
        "data.synthetic.num_test_per_defect=1",
    ],
    "photos": [
        "data.photos.resolution=64",
        "data.photos.num_train=16",
        "data.photos.num_test_good=4",
        "data.photos.num_test_per_defect=1",
    ],
}
COMMANDS = {
    "kdad-train": "kdad.cli.train",
    "kdad-eval": "kdad.cli.eval",
    "kdad-predict": "kdad.cli.predict",
    "kdad-export": "kdad.cli.export",
    "kdad-download": "kdad.cli.download",
    "kdad-aggregate": "kdad.cli.aggregate",
}
# Why a command is composed only: the first matching pattern names what CI lacks.
NEEDS = [
    (re.compile(r"--config-dir"), "the user's own configs and data"),
    (re.compile(r"\bdata=(mvtec|btad)\b|experiment=(paper_|seed_variance)"), "MVTec AD / BTAD"),
    (re.compile(r"/data/|/line7|/lines/|~/Downloads"), "the user's own data"),
    (re.compile(r"launcher=slurm"), "a Slurm cluster"),
    (re.compile(r"device=cuda|trainer=(gpu|ddp)\b|launcher=local_gpus"), "a GPU"),
    (re.compile(r"^kdad-download"), "the network (the official archives)"),
]
MAX_JOBS = 4  # a bigger sweep is composed only; the multirun path runs in test_sweeps.py


@dataclass
class Command:
    doc: str
    line: str

    @property
    def id(self) -> str:
        return f"{self.doc}: {self.line[:90]}"


def commands() -> list[Command]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    found.append(Command(str(doc.relative_to(ROOT)), " ".join(line.split())))
    return found


def jobs(args: list[str]) -> int:
    count = 1
    for arg in args:
        _, _, value = arg.partition("=")
        if "," in value and not value.startswith(("[", "{", "'", '"')):
            count *= len(value.split(","))
        if arg.startswith("experiment=") and arg.split("=")[1] in (
            "hkt_ablation",
            "nferd_ablation",
            "smoke_cpu",
            "pretrained_teacher",
        ):
            count = max(count, 10)
    return count


def plan(command: Command) -> tuple[str, str]:
    """(how, why): ``run``, ``compose``, ``help`` (a script: its command line parses) or
    ``skip`` (not kdad's: set-up commands that CI runs itself)."""
    line = command.line
    first = line.split()[0]
    if line == "make train":
        return "compose", "sets up .venv as CI's make test does; composes the demo it runs"
    if first in ("make", "pip"):
        return "skip", "set-up: make test (CI's command) runs it"
    if first in ("python", "bash") or first.endswith(".sh"):
        return "help", "a study or benchmark script (hours of CPU): its command line must parse"
    if first not in COMMANDS:
        return "skip", f"not a kdad command ({first})"
    placeholders = set(re.findall(r"<[^>]*>", line)) - {"<run>", "<date>", "<time>"}
    if placeholders or re.search(r"\[[^\]]*\|", line) or line.endswith("..."):
        return "skip", "a template: its placeholders stand for the user's own overrides"
    if "/tmp/" in line:
        return "skip", "reads the runs of a template command above it"
    for pattern, what in NEEDS:
        if pattern.search(line):
            return "compose", f"needs {what}"
    args = shlex.split(line)[1:]
    if "-m" in args and jobs(args) > MAX_JOBS:
        return "compose", f"a sweep of {jobs(args)} jobs (test_sweeps.py runs the multirun path)"
    return "run", ""


def first_job(args: list[str]) -> list[str]:
    """A multirun's first job, for composing: -m dropped, each swept list's first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in args if a != "-m"]
    plain = [a for a in args if "=" in a and not a.startswith("-")]
    parser = OverridesParser.create()
    out = [a for a in args if a not in plain]
    for text, override in zip(plain, parser.parse_overrides(plain), strict=True):
        if override.is_sweep_override():
            out.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
        else:
            out.append(text)
    return out


def substitute(args: list[str], folder: Path) -> list[str] | None:
    """``<run>``, ``<date>_<time>`` and ``<date>``: the latest folder that earlier commands
    made where the path points (``logs/train/runs/<run>``: the latest run of kdad-train);
    None if there is none (the command reads what a composed-only command would make). ``$X``
    and ``~`` expand as a shell expands them."""
    out = []
    for arg in args:
        arg = os.path.expanduser(os.path.expandvars(arg))
        match = re.search(r"(\S*?)(<run>|<date>_<time>|<date>)", arg)
        if match:
            parent = folder / match.group(1).split("=", 1)[-1]
            found = (
                sorted(parent.glob("*"), key=lambda p: p.stat().st_mtime) if parent.is_dir() else []
            )
            if not found:
                return None
            arg = arg.replace(match.group(2), found[-1].name)
        out.append(arg)
    return out


def shrink(args: list[str]) -> list[str]:
    given = {a.split("=", 1)[0] for a in args}
    data = next((a.split("=", 1)[1] for a in args if a.startswith("data=")), "synthetic")
    extra = [*SHRINK, *SHRINK_DATA.get(data, [])]
    return [*args, *[e for e in extra if e.split("=", 1)[0] not in given]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's empty folder, outside the checkout, shared by the commands in order; the
    README's own config example is written where its command expects it."""
    folder = tmp_path_factory.mktemp("user")
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```yaml\n# (my_configs/\S+)\n(.*?)```", readme, flags=re.S)
    if match:
        path = folder / match.group(1)
        path.parent.mkdir(parents=True)
        path.write_text(match.group(2))
    return folder


ALL = commands()


def test_the_documentation_has_commands_of_every_kind() -> None:
    kinds = {plan(c)[0] for c in ALL}
    assert {"run", "compose", "help", "skip"} <= kinds, kinds
    assert sum(plan(c)[0] == "run" for c in ALL) >= 4


@pytest.mark.parametrize("command", ALL, ids=[c.id for c in ALL])
def test_command_runs_as_typed(command: Command, folder: Path, env: dict[str, str]) -> None:
    how, why = plan(command)
    if how == "skip":
        pytest.skip(why)
    env = {k: v for k, v in env.items() if not k.startswith("KDAD_")}  # a user's environment
    words = shlex.split(command.line)
    if how == "help":
        script = next(w for w in words if w.endswith((".py", ".sh")))
        if script.endswith(".sh"):
            assert (ROOT / script).is_file(), script
            return
        import subprocess
        import sys

        proc = subprocess.run(
            [sys.executable, str(ROOT / script), "--help"],
            capture_output=True,
            text=True,
            cwd=folder,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    if command.line == "make train":
        words = ["kdad-train", "experiment=demo"]
    module, args = COMMANDS[words[0]], substitute(words[1:], folder)
    if args is None:
        pytest.skip("reads the folder of a command above that is composed only")
    if how == "compose":
        if module == "kdad.cli.aggregate":
            pytest.skip(f"{why}: reads the folder of a sweep that needs it")
        run_in_process(module, [*first_job(args), "--cfg", "job", "--resolve"], env, folder)
        return
    if module == "kdad.cli.aggregate":
        run_in_process(module, [*args, "--no-plots"], env, folder)
        return
    if module in ("kdad.cli.train",):
        args = shrink(args)
    elif module == "kdad.cli.eval":
        args = [*args, "logger=none"]
    run_in_process(module, args, env, folder)
