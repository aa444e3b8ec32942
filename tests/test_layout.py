"""The house rules of kdad's layout, checked on the source (kdad/README.md, "Layout")."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KDAD = ROOT / "kdad"
SOURCES = sorted(KDAD.rglob("*.py"))


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, prefix: str = "kdad") -> set[str]:
    """Every module (and ``from`` name) ``path`` imports, at the top or inside a function,
    under ``prefix`` ("" for all)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; kdad imports by absolute name")
    return {n for n in found if not prefix or n == prefix or n.startswith(prefix + ".")}


def _part(module: str) -> str:
    """The concern a module belongs to: kdad.<folder>, or a top-level module of kdad."""
    return ".".join(module.split(".")[:2])


def _calls(path: Path) -> set[str]:
    """Dotted names called in ``path`` (``os.replace``, ``tempfile.mkstemp``, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
        ):
            names.add(f"{node.func.value.id}.{node.func.attr}")
    return names


def test_packages_listed_in_pyproject_are_the_folders() -> None:
    """pyproject's explicit package list is every kdad folder with an __init__.py, plus the
    configs (conf/ shipped as kdad.conf and its groups): a new folder cannot be left out of
    the wheel, and no folder of modules is an accidental namespace package."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {p.parent for p in SOURCES}
    assert not [f for f in folders if not (f / "__init__.py").is_file()], (
        "folder without __init__.py"
    )
    code = {_module(f / "__init__.py") for f in folders}
    configs = {"kdad.conf"} | {
        f"kdad.conf.{p.name}"
        for p in (ROOT / "conf").iterdir()
        if p.is_dir() and any(p.glob("*.yaml"))
    }
    assert listed == code | configs, (
        f"missing: {sorted(code | configs - listed)}, extra: {sorted(listed - code - configs)}"
    )


def test_subpackages_import_each_other_without_cycles() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SOURCES:
        here = _part(_module(path))
        graph[here].update(_part(m) for m in _imports(path) if _part(m) not in (here, "kdad"))
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == "done":
            return
        if state.get(node) == "open":
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
    assert "kdad.cli" in graph and "kdad.models" in graph, sorted(graph)


@pytest.mark.parametrize(
    ("science", "forbidden"),
    [
        (
            "kdad.models",
            ("lightning", "hydra", "kdad.lightning", "kdad.engine", "kdad.cli", "wandb"),
        ),
        ("kdad.metrics", ("hydra", "kdad.lightning", "kdad.engine", "kdad.cli", "wandb")),
        ("kdad.data", ("kdad.lightning", "kdad.engine", "kdad.cli", "kdad.models", "wandb")),
        ("kdad.io", ("kdad.models", "kdad.lightning", "kdad.engine", "kdad.cli")),
    ],
)
def test_lower_layers_do_not_reach_up(science: str, forbidden: tuple[str, ...]) -> None:
    """The science stays plain PyTorch (no Lightning, Hydra or W&B in models/), and nothing
    below the engine imports it or an entry point."""
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in SOURCES
        if _module(path).startswith(science)
        for name in _imports(path, prefix="")
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not offenders, offenders


def test_entry_points_are_thin_and_import_no_other_entry_point() -> None:
    commands = sorted((KDAD / "cli").glob("*.py"))
    assert {p.stem for p in commands} >= {
        "train",
        "eval",
        "predict",
        "export",
        "download",
        "aggregate",
    }
    for path in commands:
        others = {m for m in _imports(path) if m.startswith("kdad.cli")}
        assert not others, f"{path.name} imports {others}"
        lines = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
        assert len(lines) < 100, (
            f"{path.name}: {len(lines)} lines; the work belongs in engine/ or inference/"
        )
    importers = [
        p
        for p in SOURCES
        if p.parent.name != "cli" and any(m.startswith("kdad.cli") for m in _imports(p))
    ]
    assert not importers, f"only the command line imports kdad.cli: {importers}"


# Where a file may be moved into place: the one writer (kdad.io.atomic), and the checkpoint
# save (Lightning writes the file on rank 0, kdad renames it there). Dataset trees (an extracted
# archive, generated data: kdad.data.generated) are built in a temporary folder and renamed
# into place whole.
MOVERS = {
    "kdad/io/atomic.py": {"os.replace", "tempfile.mkstemp"},
    "kdad/lightning/callbacks.py": {"os.replace"},
    "kdad/data/download.py": {"os.rename", "tempfile.mkdtemp"},
    "kdad/data/generated.py": {"os.rename", "tempfile.mkdtemp"},
}


def test_one_atomic_writer() -> None:
    moves = {
        "os.replace",
        "os.rename",
        "shutil.move",
        "tempfile.mkstemp",
        "tempfile.mkdtemp",
        "tempfile.NamedTemporaryFile",
    }
    found = {}
    for path in SOURCES:
        used = _calls(path) & moves
        if used:
            found[path.relative_to(ROOT).as_posix()] = used
    extra = {f: u - MOVERS.get(f, set()) for f, u in found.items() if u - MOVERS.get(f, set())}
    assert not extra, f"write through kdad.io.atomic instead: {extra}"
    assert found["kdad/io/atomic.py"] == MOVERS["kdad/io/atomic.py"]


def test_one_flattener() -> None:
    defining = [
        p.relative_to(ROOT).as_posix()
        for p in SOURCES
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and "flatten" in node.name
    ]
    assert defining == ["kdad/config.py"], defining


def test_tests_mirror_the_package() -> None:
    """tests/<folder>/ holds the tests of kdad/<folder>/ (and nothing else is a folder there)."""
    folders = {
        p.name
        for p in (ROOT / "tests").iterdir()
        if p.is_dir() and not p.name.startswith((".", "_"))
    }
    package = {p.name for p in KDAD.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= package, f"test folders without a kdad folder: {sorted(folders - package)}"


def test_commands_start_without_importing_lightning_or_torch() -> None:
    """--help, --cfg, --version and a shell completion's TAB compose configs only: the
    commands import their work (Lightning, torch, numpy) when a job runs (entry_point's deferred
    task), so a TAB does not wait for them (measured: experiments/benchmark/completion.py)."""
    import subprocess
    import sys

    code = (
        "import sys, kdad.cli.train, kdad.cli.eval, kdad.cli.predict, kdad.cli.export, "
        "kdad.cli.download; print(sorted(m for m in ('lightning', 'torch', 'timm', 'numpy') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- one owner of the run folder's file names -----------------------------------------------
RUN_FOLDER = KDAD / "io" / "run_folder.py"
# Calls that take a path (or a name in a folder): a bare word there is a file's name.
PATH_CALLS = {"Path", "PurePath", "joinpath", "with_name", "glob", "rglob", "join", "open"}


def _run_folder_names() -> set[str]:
    """Every name kdad.io.run_folder owns: its upper-case string constants, read from its
    source (a name added there is covered here without a change)."""
    names = set()
    for node in ast.parse(RUN_FOLDER.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper()
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            names.add(node.value.value)
    return names


def _spelled(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) for each string literal in ``source`` that spells one of ``names``.

    A name with a dot or in capitals (``metrics.json``, ``.hydra``, ``FAILED``) counts wherever
    it stands in a literal (a path, an f-string's text, a message: messages take the constant);
    a plain word (``checkpoints``, ``images``) only where it is used as a path: divided onto a
    path, given to a path call, compared (``folder.name == ...``) or assigned to a constant,
    since the same words are table columns and config keys elsewhere. Docstrings are prose."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    words = {n for n in names if re.fullmatch(r"[a-z_]+", n)}
    anywhere = re.compile(
        r"(?<![\w.])("
        + "|".join(re.escape(n) for n in sorted(names - words, key=len, reverse=True))
        + r")(?!\w)"
    )

    def as_path(node: ast.AST) -> bool:
        parent = parents.get(node)
        if isinstance(parent, ast.BinOp):
            return isinstance(parent.op, ast.Div)
        if isinstance(parent, ast.Call) and node in parent.args:
            func = parent.func
            return (func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")) in (
                PATH_CALLS
            )
        return isinstance(parent, ast.Compare | ast.Assign | ast.AnnAssign)

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if id(node) in docstrings:
            continue
        if anywhere.search(node.value) or (node.value in words and as_path(node)):
            found.append((node.lineno, node.value))
    return found


def test_the_rule_sees_a_spelled_name() -> None:
    """The check below is not blind: each way of spelling a name is found, prose is not."""
    names = {"metrics.json", "FAILED", ".hydra", "checkpoints", "images"}
    source = '''
"""The run writes metrics.json (a docstring is prose)."""
a = out / "metrics.json"
b = f"{out}/metrics.json"
c = "see FAILED files"
d = sorted(root.rglob(".hydra"))
e = out / "checkpoints"
f = folder.name == "checkpoints"
IMAGES_DIR = "images"
row = {"images": 3}  # a table column
g = "kdad.engine.hydra and hydra.run.dir and my_metrics.jsonl"
'''
    lines = sorted(line for line, _ in _spelled(source, names))
    assert lines == [3, 4, 5, 6, 7, 8, 9], _spelled(source, names)


def test_only_the_run_folder_module_spells_run_folder_file_names() -> None:
    """kdad.io.run_folder owns the names of a run's (and a sweep's) files: everything else
    asks a RunFolder / SweepFolder or uses its constants."""
    names = _run_folder_names()
    assert {"metrics.json", "last.ckpt", "FAILED", "sweep_status.json", "images"} <= names
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in SOURCES
        if path != RUN_FOLDER
        for line, text in _spelled(path.read_text(encoding="utf-8"), names)
    ]
    assert not offenders, "use kdad.io.run_folder instead of spelling:\n" + "\n".join(offenders)
