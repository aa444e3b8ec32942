"""Running kdad's entry points as a user does (a subprocess), with tiny settings for tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DATA = [
    "data.image_size=64",
    "data.num_workers=0",
    "data.synthetic.resolution=64",
    "data.synthetic.num_train=16",
    "data.synthetic.num_test_good=6",
    "data.synthetic.num_test_per_defect=2",
]
TINY = ["model.backbone=resnet18", "model.pretrained=false", *DATA, "trainer.max_epochs=1"]


def run(
    module: str, args: list[str], env: dict[str, str], cwd: Path, expect: int = 0
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return _expected(proc, expect)


def _expected(
    proc: subprocess.CompletedProcess, expect: int, how: str = ""
) -> subprocess.CompletedProcess:
    if proc.returncode != expect:
        # kdad's own one-line errors first: a long log tail must not push them out of sight.
        errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad:")]
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}{how}, expected {expect}\n"
            + "\n".join(errors)
            + f"\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
        )
    return proc


def run_in_process(
    module: str, args: list[str], env: dict[str, str], cwd: Path, expect: int = 0
) -> subprocess.CompletedProcess:
    """``module``'s ``main()`` in this process with ``args`` as its command line, ``env`` as
    the environment and ``cwd`` as the working folder; stdout/stderr captured.

    The same code path as :func:`run` without the ~6 s of importing Lightning in a new
    process, for the many short runs that stop before training (user errors, ``--cfg``).
    """
    import contextlib
    import importlib
    import io
    import os
    import traceback

    from kdad.engine import hydra as kdad_hydra

    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    kdad_hydra.FAILED.clear()  # the exit status of this command only
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [module, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                returned = main()  # kdad-aggregate returns its status; the Hydra apps exit
                code = returned if isinstance(returned, int) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().cfg = None  # the command's Hydra state ends with it
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        kdad_hydra.FAILED.clear()
    proc = subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())
    return _expected(proc, expect, " (in process)")
