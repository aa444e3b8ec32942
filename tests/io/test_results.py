"""metrics.json is written atomically: a reader sees the previous file or the new one, never part.

The run writes it through kdad.io.atomic (a temporary file beside it, moved onto it with
``os.replace``). Checked on the function both kdad-train and kdad-eval call, with a process
that dies just before the move, and statically: kdad/engine/run.py and kdad/io/results.py
open no file for writing themselves.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdad.io.results import METRIC_KEYS, RESULT_KEYS

ROOT = Path(__file__).parents[2]
# The modules that build and write metrics.json.
WRITERS = ("kdad/engine/run.py", "kdad/io/results.py")


class _Killed(BaseException):
    """The process dies here (kill -9, power loss): no ``except Exception`` may catch it."""


def _finished_run() -> tuple[SimpleNamespace, ...]:
    """(trainer, module, datamodule, speed) of a run that has been tested, as rank 0 sees it."""
    net = SimpleNamespace(num_parameters=lambda trainable=None: 7 if trainable else 10)
    module = SimpleNamespace(
        hparams=SimpleNamespace(model_name="rd4ad"),
        test_results={key: 0.5 + i / 100 for i, key in enumerate(METRIC_KEYS)},
        train_stats={"train_seconds": 12.5, "train_images_per_second": 3.0},
        net=net,
    )
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    datamodule = SimpleNamespace(dataset_name="synthetic", category_name="stripes")
    return trainer, module, datamodule, SimpleNamespace(test_images_per_second=4.0)


def test_a_run_killed_while_writing_metrics_json_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdad.engine.run import write_run_results

    monkeypatch.chdir(tmp_path)  # without Hydra, the run folder is the working directory
    metrics = tmp_path / "metrics.json"
    previous = '{"model": "the previous run"}\n'
    metrics.write_text(previous)
    moves: list[tuple[Path, Path]] = []
    replace = os.replace

    def killed_before_the_move(src, dst, *args, **kwargs):
        moves.append((Path(src), Path(dst)))
        raise _Killed

    monkeypatch.setattr(os, "replace", killed_before_the_move)
    with pytest.raises(_Killed):
        write_run_results(0, *_finished_run())
    # A plain write would have replaced the contents before this point (and never moved a file).
    assert metrics.read_text() == previous
    assert [dst.resolve() for _, dst in moves] == [metrics.resolve()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no stale part

    # Not killed: the new results, moved into place from a temporary file beside metrics.json.
    moves.clear()

    def recorded(src, dst, *args, **kwargs):
        moves.append((Path(src), Path(dst)))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recorded)
    results = write_run_results(0, *_finished_run())
    written = json.loads(metrics.read_text())
    assert tuple(written) == RESULT_KEYS and written == results
    ((src, dst),) = moves
    assert dst.resolve() == metrics.resolve() and src.parent.resolve() == tmp_path.resolve()
    assert src.name != metrics.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def _plain_writes(path: Path) -> list[str]:
    """Calls in ``path`` that write a file without kdad.io.atomic: ``x.write_text(...)``,
    ``x.write_bytes(...)``, ``json.dump(...)`` and ``open(...)`` with a mode other than read."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("write_text", "write_bytes", "dump"):
            found.append(f"{path.name}:{node.lineno} {name}")
        elif name == "open":
            # open(file, mode) or Path.open(mode): a mode that is not a constant read mode.
            given = node.args[1:2] if isinstance(func, ast.Name) else node.args[:1]
            modes = [*given, *(k.value for k in node.keywords if k.arg == "mode")]
            if any(
                not (isinstance(m, ast.Constant) and set(str(m.value)) <= set("rbt")) for m in modes
            ):
                found.append(f"{path.name}:{node.lineno} open")
    return found


@pytest.mark.parametrize("module", WRITERS)
def test_the_metrics_writers_write_files_only_through_kdad_io_atomic(module: str) -> None:
    assert _plain_writes(ROOT / module) == []
