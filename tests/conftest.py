"""Shared test set-up: never touch the network or a W&B account."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for the subprocesses: a shared synthetic-data cache, no network, no account."""
    cache = tmp_path_factory.mktemp("kdad_cache")
    return {
        **os.environ,
        "KDAD_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "PYTHONUNBUFFERED": "1",
    }


# Module- or session-scoped fixtures that train a run: a fixture runs once per worker process,
# so every test that uses one goes to the same worker (make test's --dist loadgroup) and the
# run is trained once instead of once on each worker.
SHARED_RUNS = frozenset({"trained", "trained_run", "uninterrupted", "cli_run"})


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests of a shared run, and send every group to one worker.

    pytest-xdist 3.8 puts a test's group in its node id (``<id>@<group>``, which its loadgroup
    scheduler reads) by setting ``item._nodeid``, which pytest 9 no longer reads (its node id is
    ``item._id``), so every ``xdist_group`` was ignored; it is done here where xdist did not.
    """
    for item in items:
        shared = SHARED_RUNS.intersection(getattr(item, "fixturenames", ()))
        if shared and item.get_closest_marker("xdist_group") is None:
            name = f"{item.nodeid.split('::')[0]}:{min(shared)}"
            item.add_marker(pytest.mark.xdist_group(name))
        if not getattr(config.option, "loadgroup", False) or "@" in item.nodeid:
            continue
        groups = sorted({str(m.args[0]) for m in item.iter_markers("xdist_group") if m.args})
        if groups:
            suffixed = f"{item.nodeid}@{'_'.join(groups)}"
            if hasattr(item, "_id"):  # pytest 9 keeps the node id here
                from _pytest.nodeid import coerce_node_id

                item._id = coerce_node_id(suffixed)
            else:
                item._nodeid = suffixed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(autouse=True)
def _free_disk_after_passing_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Delete a passed test's tmp_path at once: its checkpoints are ~200 MB each.

    Failed tests keep theirs for inspection; session-scoped run folders live until the end.
    """
    yield
    report = getattr(request.node, "report_call", None)
    folder = getattr(request.node, "funcargs", {}).get("tmp_path")
    if report is not None and report.passed and folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def inprocess_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private synthetic-data cache for one module's in-process runs (tests/inprocess.py)."""
    previous = os.environ.get("KDAD_CACHE_DIR")
    os.environ["KDAD_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdad_cache"))
    yield
    if previous is None:
        del os.environ["KDAD_CACHE_DIR"]
    else:
        os.environ["KDAD_CACHE_DIR"] = previous
