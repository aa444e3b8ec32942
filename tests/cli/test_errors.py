"""Every mistake a user can fix is one line ``kdad: error: ...``, exit status 2, no traceback.

One row per case: the command's module, its arguments, the exit status and the words its one
line must hold. The commands run in this process (tests/clirun.py's ``run_in_process``): each
stops before any training, in well under a second. Placeholders in the arguments: ``{ckpt}``
a tiny kdad-train checkpoint (rd4ad, resnet18, trained once for the module), ``{conf}`` a user
config folder whose model/mine.yaml has a YAML syntax error on line 4, ``{file}`` an existing
file.
"""

from __future__ import annotations

import errno
import pathlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from clirun import DATA, TINY, run_in_process

from kdad.io import atomic

TRAIN = "kdad.cli.train"
EVAL = "kdad.cli.eval"
FOLDER = [a for a in TINY if not a.startswith("data.synthetic")]  # data= other than synthetic

CASES = [
    # Hydra's composition: unknown options and keys, malformed overrides, user config files.
    (TRAIN, [*TINY, "model=nosuch"], 2, ["model=nosuch: no such option; available:", "stfpm"]),
    (TRAIN, [*TINY, "data.nosuchkey=1"], 2, ["data has no key 'nosuchkey'", "+data.nosuchkey="]),
    (TRAIN, [*TINY, "data.image_sise=64"], 2, ["data.image_sise", "did you mean data.image_size?"]),
    (TRAIN, [*TINY, "~model.nokey"], 2, ["'model.nokey' does not exist"]),
    (TRAIN, [*TINY, "model.layers=[1,2"], 2, ["model.layers=[1,2: not a valid override"]),
    (TRAIN, [*TINY, ""], 2, ["an empty argument: not a valid override"]),
    (TRAIN, ["-m", *TINY, "model=rd4ad,nosuch"], 2, ["model=nosuch: no such option"]),
    (TRAIN, ["--config-dir", "{conf}", *TINY, "model=mine"], 2, ["mine.yaml, line 4", "YAML"]),
    (TRAIN, ["--config-dir", "{file}.missing", *TINY], 2, ["config directory", "not found"]),
    (TRAIN, [*TINY, "hydra.run.dir={file}"], 2, ["{file}: File exists", "hydra.run.dir"]),
    (
        TRAIN,
        ["-m", "--cfg", "job", *TINY],
        2,
        ["Only one of --run, --multirun, --cfg", "without -m"],
    ),
    # Settings a model cannot take.
    (TRAIN, [*TINY, "+model.x=1", "model.x=2"], 2, ["model.x is not one of its settings"]),
    (TRAIN, [*TINY, "model=stfpm", "model.layers=[5]"], 2, ["model.layers=[5]", "0..4"]),
    (TRAIN, [*TINY, "model.layers=[5]"], 2, ["model.layers=[5]: 5 not a feature stage"]),
    # Numbers.
    (TRAIN, [*TINY, "optimizer.lr=fast"], 2, ["optimizer.lr='fast': expected a number > 0"]),
    (TRAIN, [*TINY, "optimizer.lr=-1"], 2, ["optimizer.lr=-1: expected a number > 0"]),
    (TRAIN, [*TINY, "optimizer.lr=0"], 2, ["optimizer.lr=0: expected a number > 0"]),
    (TRAIN, [*TINY, "trainer.max_epochs=0"], 2, ["trainer.max_epochs=0: expected an integer >= 1"]),
    (TRAIN, [*TINY, "trainer.max_epochs=abc"], 2, ["trainer.max_epochs='abc'"]),
    (TRAIN, [*TINY, "data.image_size=${nosuch}"], 2, ["data.image_size", "'nosuch' not found"]),
    # Required values, checkpoints.
    (TRAIN, [*FOLDER, "data=folder"], 2, ["data.root is required but not set"]),
    (EVAL, DATA, 2, ["kdad-eval needs ckpt_path=PATH"]),
    (
        TRAIN,
        [*TINY, "ckpt_path={ckpt}", "model.backbone=resnet50"],
        2,
        ["trained with model.backbone=resnet18", "this run has model.backbone=resnet50"],
    ),
    (
        EVAL,
        [*DATA, "ckpt_path={ckpt}", "data.image_size=16"],
        2,
        ["data.image_size/crop_size=16 does not fit", "the smallest that works is 32 px"],
    ),
]


@pytest.fixture(scope="module")
def checkpoint(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kdad-train checkpoint of rd4ad with resnet18, from one batch of training."""
    out = tmp_path_factory.mktemp("trained")
    args = [*TINY, "data.synthetic.num_train=4", "+trainer.limit_train_batches=1"]
    args += ["+trainer.limit_val_batches=1", "test=false", "logger=none", "callbacks=none"]
    run_in_process(TRAIN, [*args, f"hydra.run.dir={out}"], env, out)
    return out / "checkpoints" / "last.ckpt"


def _placeholders(args: list[str], tmp_path: Path, request: pytest.FixtureRequest) -> dict:
    values = {"file": str(tmp_path / "a_file")}
    (tmp_path / "a_file").write_text("not a folder\n")
    if any("{conf}" in a for a in args):
        (tmp_path / "conf" / "model").mkdir(parents=True)
        (tmp_path / "conf" / "model" / "mine.yaml").write_text(
            "model_name: rd4ad\nmodel:\n  backbone: [resnet18\n  layers: 1\n"
        )
        values["conf"] = str(tmp_path / "conf")
    if any("{ckpt}" in a for a in args):
        values["ckpt"] = str(request.getfixturevalue("checkpoint"))
    return values


@pytest.mark.parametrize(
    ("module", "args", "status", "words"),
    CASES,
    ids=[
        f"{module.rsplit('.', 1)[1]}:" + " ".join(a or "''" for a in args if a not in TINY + DATA)
        for module, args, *_ in CASES
    ],
)
def test_a_user_error_is_one_line(
    module: str,
    args: list[str],
    status: int,
    words: list[str],
    env: dict[str, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    values = _placeholders(args, tmp_path, request)
    argv = [a.format(**values) if "{" in a and "${" not in a else a for a in args]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        argv.append(f"hydra.run.dir={tmp_path / 'run'}")
    argv.append(f"hydra.sweep.dir={tmp_path / 'sweep'}")
    proc = run_in_process(module, argv, env, tmp_path, expect=status)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word.format(**values) in errors[0], errors[0]


def test_hydra_full_error_keeps_the_traceback(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_in_process(
        TRAIN, [*TINY, "model=nosuch"], {**env, "HYDRA_FULL_ERROR": "1"}, tmp_path, expect=1
    )
    assert "Traceback" in proc.stderr and "kdad: error:" not in proc.stderr


def test_a_bug_in_a_job_keeps_its_traceback(
    env: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    """An OmegaConf error raised by the job's own code is a bug, not a composition mistake."""
    from omegaconf import OmegaConf

    from kdad.engine import run

    def buggy(cfg) -> None:
        return OmegaConf.create({"a": 1}, flags={"struct": True}).b

    monkeypatch.setattr(run, "train", buggy)
    proc = run_in_process(TRAIN, [*TINY, f"hydra.run.dir={tmp_path}"], env, tmp_path, expect=1)
    assert "Traceback" in proc.stderr and "in buggy" in proc.stderr
    assert "kdad: error:" not in proc.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("everywhere", [False, True], ids=["config.yaml", "every-write"])
def test_a_full_disk_is_one_line_naming_the_file(
    code: int, everywhere: bool, env: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    """A write that finds the disk (or quota) full: one line naming the file, no partial
    file, and the run marked FAILED where that small file can still be written."""
    write_text = pathlib.Path.write_text

    def full(self: Path, text: str, *args, **kwargs) -> int:
        if everywhere or self.name.startswith(".config.yaml."):
            write_text(self, text[: len(text) // 2], *args, **kwargs)  # part of it, then full
            raise OSError(code, "simulated")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    run = tmp_path / "run"
    proc = run_in_process(TRAIN, [*TINY, f"hydra.run.dir={run}"], env, tmp_path, expect=2)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error: ")]
    reason = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
    assert len(errors) == 1 and errors[0].startswith(
        f"kdad: error: {reason} while writing {run / 'config.yaml'}: free some space"
    ), proc.stderr
    assert not (run / "config.yaml").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".config.yaml")]  # no part
    if everywhere:
        assert not (run / "FAILED").exists()
    else:
        assert (run / "FAILED").read_text() == errors[0].removeprefix("kdad: error: ") + "\n"


def test_a_torch_save_on_a_full_disk_names_the_file(tmp_path: Path, monkeypatch) -> None:
    """torch.save to a path reports a full disk as a RuntimeError without an errno: a failed
    write on a device left (almost) without space counts as ENOSPC; elsewhere it stays as is."""
    target = tmp_path / "last.ckpt"

    def failing_save() -> None:
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(RuntimeError, match="unexpected pos"):
        failing_save()
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
    with pytest.raises(OSError) as raised:
        failing_save()
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []
