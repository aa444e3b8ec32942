"""Mutation check (``make mutate``): do the tests see the defects they guard against?

Each file in ``tests/_mutation/patches/`` is a small unified diff that plants one realistic
defect in kdad, headed by the defect in words and the tests that must catch it::

    # defect: the anomaly map's Gaussian blur switched off
    # test: tests/models/test_anomaly_map.py::test_generator_smooths_the_fused_map_as_scipy_does
    --- a/kdad/models/anomaly_map.py
    +++ b/kdad/models/anomaly_map.py
    ...

For each patch, ``kdad/``, ``conf/``, ``tests/`` and ``pyproject.toml`` are copied to a scratch
folder (the working tree is never touched), the patch is applied there, and pytest runs only
the patch's tests, in the copy, with ``PYTHONPATH`` set so that the copy's kdad (and its conf)
is imported, which is checked before any test runs. The mutant is *killed* when a test fails
and *survived* when they all pass; a patch that no longer applies, or tests that cannot run
(collection errors, no test selected), is an *error*. First the tests of all patches run once
on an unpatched copy (the baseline): a kill only means something if they pass there.

Prints a kill table; exits 0 only if the baseline passes and every mutant is killed.

    python tests/_mutation/run.py                  # all patches (make mutate)
    python tests/_mutation/run.py blur_off         # some, by file name (without .diff)
    python tests/_mutation/run.py --no-baseline    # skip the unpatched run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATCHES = Path(__file__).resolve().parent / "patches"
COPIED = ("kdad", "conf", "tests", "pyproject.toml")
TIMEOUT = 1800  # seconds per pytest run


@dataclass
class Mutant:
    name: str
    defect: str
    tests: list[str]
    patch: Path


@dataclass
class Outcome:
    name: str
    tests: list[str]
    result: str  # killed | survived | error | passed (baseline) | failed (baseline)
    seconds: float
    detail: str = ""


def read_mutant(patch: Path) -> Mutant:
    defect, tests = "", []
    for line in patch.read_text().splitlines():
        if line.startswith("# defect:"):
            defect = line.removeprefix("# defect:").strip()
        elif line.startswith("# test:"):
            tests.append(line.removeprefix("# test:").strip())
        elif not line.startswith("#"):
            break
    if not tests:
        raise SystemExit(f"{patch}: names no test (a '# test: tests/...::name' line)")
    return Mutant(patch.stem, defect, tests, patch)


def scratch_copy(parent: Path, name: str) -> Path:
    """kdad/, conf/, tests/ and pyproject.toml copied to ``parent/name``; ``kdad/conf`` links
    to the copy's conf/, as the wheel's kdad.conf, so that the copy composes its own configs."""
    folder = parent / name
    folder.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for item in COPIED:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, folder / item, ignore=ignore)
        else:
            shutil.copy2(source, folder / item)
    (folder / "kdad" / "conf").symlink_to(Path("..") / "conf", target_is_directory=True)
    return folder


def environment(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    env["GIT_CEILING_DIRECTORIES"] = str(folder.parent)  # git apply: no repository above
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports(folder: Path, env: dict[str, str]) -> str:
    """The copy's kdad and conf are the ones imported there (not the installed checkout's)."""
    code = "import kdad, kdad.config; print(kdad.__file__); print(kdad.config.CONFIG_DIR)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True
    )
    lines = proc.stdout.split()
    if proc.returncode != 0 or len(lines) != 2:
        raise SystemExit(f"cannot import kdad in the copy {folder}:\n{proc.stderr[-2000:]}")
    module, config = (Path(line).resolve() for line in lines)
    if not (module.is_relative_to(folder.resolve()) and config.is_relative_to(folder.resolve())):
        raise SystemExit(f"the copy imports kdad from {module} (conf {config}), not {folder}")
    return lines[0]


def apply(patch: Path, folder: Path, env: dict[str, str]) -> str:
    """'' if ``patch`` applied cleanly in ``folder``, else git's complaint."""
    proc = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", str(patch)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    return "" if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()


def run_tests(folder: Path, env: dict[str, str], tests: list[str]) -> tuple[int, str, float]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",  # the first failure kills the mutant
        "-p",
        "no:cacheprovider",
        "-m",
        "slow or not slow",  # a named test runs even if it is marked slow
        f"--basetemp={folder / '.pytest_tmp'}",
        *tests,
    ]
    env = {**env, "COLUMNS": "400"}  # pytest's summary lines keep the failure's message
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT} s", time.perf_counter() - start
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def baseline(scratch: Path, mutants: list[Mutant]) -> Outcome:
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    folder = scratch_copy(scratch, "baseline")
    env = environment(folder)
    print(f"imports kdad from {check_imports(folder, env)}", flush=True)
    code, output, seconds = run_tests(folder, env, tests)
    return Outcome(
        "(baseline: no patch)", tests, "passed" if code == 0 else "failed", seconds, output
    )


def mutate(scratch: Path, mutant: Mutant) -> Outcome:
    folder = scratch_copy(scratch, mutant.name)
    env = environment(folder)
    imported = check_imports(folder, env)
    problem = apply(mutant.patch, folder, env)
    if problem:
        return Outcome(mutant.name, mutant.tests, "error", 0.0, f"patch does not apply: {problem}")
    print(f"{mutant.name}: {mutant.defect} (kdad from {imported})", flush=True)
    code, output, seconds = run_tests(folder, env, mutant.tests)
    # pytest: 0 all passed, 1 some failed; anything else (2 collection error or interrupted,
    # 4 usage, 5 nothing collected, -1 timeout) says nothing about the defect.
    result = {0: "survived", 1: "killed"}.get(code, "error")
    return Outcome(mutant.name, mutant.tests, result, seconds, output)


def short(test: str) -> str:
    """tests/models/test_hkt.py::test_cbam_switch -> test_hkt.py::test_cbam_switch."""
    path, _, name = test.partition("::")
    return f"{Path(path).name}::{name}" if name else path


def first_failure(output: str) -> str:
    """pytest's first ``FAILED``/``ERROR`` summary line: what killed the mutant."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line if len(line) <= 240 else line[:237] + "..."
    return ""


def table(outcomes: list[Outcome]) -> str:
    rows = [("patch", "result", "seconds", "tests run")]
    rows += [
        (o.name, o.result, f"{o.seconds:.1f}", ", ".join(map(short, o.tests))) for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2])])
            + "  "
            + row[3]
        )
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="patch names (default: every patch)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unpatched run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = parser.parse_args(argv)

    mutants = [read_mutant(p) for p in sorted(PATCHES.glob("*.diff"))]
    if args.names:
        unknown = set(args.names) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"no such patch: {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.name in args.names]

    scratch = Path(tempfile.mkdtemp(prefix="kdad-mutate-"))
    outcomes: list[Outcome] = []
    try:
        if not args.no_baseline:
            outcomes.append(baseline(scratch, mutants))
            if outcomes[-1].result != "passed":
                print(
                    f"baseline failed: the unpatched tests do not pass\n{tail(outcomes[-1].detail)}"
                )
        for mutant in mutants:
            outcomes.append(mutate(scratch, mutant))
            if outcomes[-1].result != "killed":
                print(f"{mutant.name}: {outcomes[-1].result}\n{tail(outcomes[-1].detail)}")
            if not args.keep:  # a full copy per mutant: free it at once
                shutil.rmtree(scratch / mutant.name, ignore_errors=True)
    finally:
        if args.keep:
            print(f"scratch copies kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(table(outcomes))
    print("\nWhat killed each mutant (pytest's first failure):")
    for outcome in outcomes:
        if outcome.result == "killed":
            print(f"  {outcome.name}: {first_failure(outcome.detail)}")
    mutant_outcomes = [o for o in outcomes if o.result in ("killed", "survived", "error")]
    killed = sum(o.result == "killed" for o in mutant_outcomes)
    print(f"\n{killed} of {len(mutant_outcomes)} mutants killed")
    good = all(o.result in ("killed", "passed") for o in outcomes)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
