"""kdad as users install it: a wheel that carries its configs and trains outside the checkout,
and a user's own config folder composing with kdad's groups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from clirun import TINY, run_in_process

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def _sh(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


# What a source tree of kdad holds for building (setuptools writes build/ and *.egg-info
# beside it, so the tests build from a copy and leave the checkout untouched).
SOURCE = ("pyproject.toml", "README.md", "kdad", "conf")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("source")
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kdad's wheel, built from a copy of this checkout without network (the installed
    setuptools)."""
    dist = tmp_path_factory.mktemp("dist")
    _sh(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dist), str(source)],
        cwd=dist,
    )  # fmt: skip
    (built,) = dist.glob("kdad-*.whl")
    return built


def test_wheel_ships_every_config(wheel: Path) -> None:
    """Every YAML of conf/ is in the wheel as kdad/conf/..., byte for byte, and nothing else
    of the checkout (tests, experiments) comes along."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = {n.removeprefix("kdad/conf/") for n in names if n.startswith("kdad/conf/")}
        expected = {p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}
        assert expected, "conf/ has no YAML"
        assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
        for rel in expected:
            assert archive.read(f"kdad/conf/{rel}") == (CONF / rel).read_bytes(), rel
        assert not [n for n in names if n.startswith(("tests/", "experiments/", "conf/"))]
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        commands = archive.read(entry_points).decode()
    for command in ("train", "eval", "predict", "export", "download", "aggregate"):
        assert f"kdad-{command} = kdad.cli.{command}:main" in commands


def test_wheel_installed_outside_the_checkout_trains(
    wheel: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """A fresh virtual environment outside the checkout gets the wheel (no index, no deps: the
    dependencies come from this environment through a .pth line), and its kdad-train composes
    the shipped configs and trains one epoch in an empty folder."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(
        _sh(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
        ).strip()
    )
    # This environment's packages (torch, lightning, hydra, ...) without its editable kdad:
    # a plain path line does not run the .pth files (the editable finder) of that folder.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        cwd=tmp_path,
    )  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _sh(
        [
            str(python),
            "-c",
            "import kdad, kdad.config as c; print(kdad.__file__); print(c.CONFIG_DIR)",
        ],
        cwd=work,
        env=clean,
    ).split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    assert not any(Path(p).is_relative_to(ROOT) for p in where), where

    out = _sh(
        [str(target / "bin" / "kdad-train"), "model=rd4ad", "data.category=stripes", *TINY,
         "logger=csv", "hydra.run.dir=run"],
        cwd=work,
        env=clean,
    )  # fmt: skip
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["model"] == "rd4ad" and 0.0 <= metrics["image_auroc"] <= 1.0, out[-2000:]
    assert (work / "run" / "checkpoints" / "last.ckpt").is_file()
    # It composed kdad's shipped configs, not the checkout's: the run's config says where from.
    hydra_cfg = (work / "run" / ".hydra" / "hydra.yaml").read_text()
    assert str(site / "kdad" / "conf") in hydra_cfg and str(ROOT / "conf") not in hydra_cfg


USER_EXPERIMENT = """\
# @package _global_
# A user's production line, kept in the user's own repository.
defaults:
  - override /model: stfpm
  - override /data: folder

data:
  root: /lines/line7
task_name: line7
seed: 7
"""


@pytest.mark.parametrize("how", ["config-dir", "searchpath"])
def test_user_config_dir_composes_with_kdads_groups(
    how: str, tmp_path: Path, env: dict[str, str]
) -> None:
    user = tmp_path / "my_configs"
    (user / "experiment").mkdir(parents=True)
    (user / "experiment" / "my_line7.yaml").write_text(USER_EXPERIMENT)
    (user / "model").mkdir()
    # A user's own model preset beside kdad's (a group file kdad does not have).
    (user / "model" / "stfpm_r34.yaml").write_text(
        "# @package _global_\ndefaults:\n  - stfpm\n  - _self_\nmodel:\n  backbone: resnet34\n"
    )
    where = (
        ["--config-dir", str(user)]
        if how == "config-dir"
        else [f"hydra.searchpath=[file://{user}]"]
    )
    proc = run_in_process(
        "kdad.cli.train", [*where, "experiment=my_line7", "--cfg", "job"], env, tmp_path
    )
    assert "_target_: kdad.models.stfpm.STFPM" in proc.stdout
    assert "root: /lines/line7" in proc.stdout
    assert "task_name: line7" in proc.stdout
    assert "seed: 7" in proc.stdout
    proc = run_in_process(
        "kdad.cli.train",
        [*where, "experiment=my_line7", "model=stfpm_r34", "--cfg", "job"],
        env,
        tmp_path,
    )
    assert "backbone: resnet34" in proc.stdout


def test_sdist_carries_the_configs(source: Path, tmp_path: Path) -> None:
    """The source distribution (what `pip install kdad` builds from without a wheel) holds
    every YAML of conf/, so the wheel built from it ships them too."""
    import tarfile

    _sh(
        [sys.executable, "-c",
         f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"],
        cwd=source,
    )  # fmt: skip
    (sdist,) = tmp_path.glob("kdad-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    expected = {p.relative_to(ROOT).as_posix() for p in CONF.rglob("*.yaml")}
    assert expected <= names, sorted(expected - names)
