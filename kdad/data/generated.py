"""Datasets generated on first use into a cache folder (``data=synthetic``, ``data=photos``).

One category is written into a temporary folder beside its target and renamed into place, so
a crash never leaves a half-written category and two processes generating at once cannot
corrupt it (the loser keeps the winner's tree). A marker file records the generator version
and parameters; a tree whose marker differs is generated again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from kdad.errors import KDADError

MARKER = ".kdad_generated.json"


def stable_rng(seed: int, *key: object) -> np.random.Generator:
    """A generator seeded stably (crc32, not Python's salted hash) from ``seed`` and ``key``."""
    return np.random.default_rng([seed, zlib.crc32("/".join(map(str, key)).encode())])


def write_png(path: Path, array: np.ndarray) -> None:
    """One PNG, fast and deterministic (the same array gives the same bytes)."""
    Image.fromarray(array).save(path, compress_level=1)


def write_mvtec_tree(
    folder: Path,
    params: dict,
    defect_types: tuple[str, ...],
    render: Callable[[str, int, str | None], tuple[np.ndarray, np.ndarray]],
    write: Callable[[Path, np.ndarray], None] = write_png,
) -> None:
    """Write one category's MVTec-layout tree into ``folder``: ``num_train`` normal training
    images, ``num_test_good`` normal and ``num_test_per_defect`` images of each defect type
    for testing, each defect with its ``<stem>_mask.png``. ``render(split_name, index,
    defect)`` returns (uint8 image, bool mask); ``write`` writes one PNG."""
    jobs = [("train", "good", None, params["num_train"])]
    jobs.append(("test", "good", None, params["num_test_good"]))
    jobs += [("test", d, d, params["num_test_per_defect"]) for d in defect_types]
    for split, name, defect, count in jobs:
        out = folder / split / name
        out.mkdir(parents=True)
        if defect is not None:
            (folder / "ground_truth" / name).mkdir(parents=True)
        for i in range(count):
            image, mask = render(f"{split}_{name}", i, defect)
            write(out / f"{i:03d}.png", image)
            if defect is not None:
                write(
                    folder / "ground_truth" / name / f"{i:03d}_mask.png",
                    mask.astype(np.uint8) * 255,
                )


def check_params(what: str, params: dict, defaults: dict, min_resolution: int) -> dict:
    """``params`` over ``defaults`` (a generator's integer parameters: resolution, num_train,
    num_test_good, num_test_per_defect, seed, ...); unknown keys, non-integers, values below
    their minimum (``min_resolution`` pixels, one training image, 0 otherwise) and a test set of
    no images are errors."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise KDADError(
            f"unknown {what} parameter(s) {', '.join(unknown)}; valid: {', '.join(defaults)}"
        )
    merged = {**defaults, **params}
    minimum = {"resolution": min_resolution, "num_train": 1}
    for key, value in merged.items():
        least = minimum.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise KDADError(f"{what} parameter {key} must be an integer >= {least}, got {value!r}")
    if merged["num_test_good"] + merged["num_test_per_defect"] == 0:
        raise KDADError(
            f"{what} parameters num_test_good and num_test_per_defect are both 0; no test set"
        )
    return merged


def ensure_generated(
    what: str,
    root: str | Path,
    category: str,
    categories: Sequence[str],
    params: dict,
    defaults: dict,
    min_resolution: int,
    version: int,
    generate: Callable[[Path, str, dict], None],
    marker_name: str,
) -> Path:
    """A generator's ``category`` under ``root`` (``generate(folder, category, params)`` unless a
    tree made with the same parameters is there); each parameter set has its own sub-folder of
    ``root``, so changing one never reuses (or destroys) another set's images."""
    if category not in categories:
        raise KDADError(f"unknown {what} category '{category}'; valid: {', '.join(categories)}")
    params = check_params(what, params, defaults, min_resolution)
    base = Path(root).expanduser() / (
        f"v{version}-res{params['resolution']}-train{params['num_train']}"
        f"-good{params['num_test_good']}-defect{params['num_test_per_defect']}-seed{params['seed']}"
    )
    marker = {"generator_version": version, "category": category, **params}
    return ensure_tree(
        base, category, marker, lambda folder: generate(folder, category, params), marker_name
    )


def marker_ok(folder: Path, marker: dict, name: str = MARKER) -> bool:
    try:
        return json.loads((folder / name).read_text()) == marker
    except (OSError, ValueError):
        return False


def ensure_tree(
    base: Path,
    category: str,
    marker: dict,
    generate: Callable[[Path], None],
    marker_name: str = MARKER,
) -> Path:
    """``base/category`` generated by ``generate(folder)`` unless a tree with ``marker`` is
    already there; returns ``base``."""
    target = base / category
    if marker_ok(target, marker, marker_name):
        return base
    try:
        base.mkdir(parents=True, exist_ok=True)
        remove_stale(base, category)
        tmp = Path(tempfile.mkdtemp(prefix=f".{category}.tmp-", dir=base))
    except OSError as exc:
        raise KDADError(f"cannot create the data folder {base}: {exc}") from exc
    try:
        generate(tmp)
        (tmp / marker_name).write_text(json.dumps(marker, sort_keys=True))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        publish(tmp, target, marker, marker_name)
    except OSError as exc:  # disk full, permissions: the user can fix these
        raise KDADError(f"cannot write generated data to {base}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return base


def remove_stale(base: Path, category: str, age_s: float = 6 * 3600.0) -> None:
    """Delete temporary trees that killed processes left behind (no live one is that old)."""
    now = time.time()
    for pattern in (f".{category}.tmp-*", f".{category}.old-*"):
        for path in base.glob(pattern):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > age_s:
                    shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, target: Path, marker: dict, marker_name: str = MARKER) -> None:
    """Rename the finished ``tmp`` tree to ``target`` atomically."""
    try:
        os.rename(tmp, target)  # fails if another process already put a tree there
        return
    except OSError:
        if marker_ok(target, marker, marker_name):
            return  # lost the race: the winner's tree is identical, use it
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.rename(target, trash / "old")
        os.rename(tmp, target)
    except OSError:
        if not marker_ok(target, marker, marker_name):
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


__all__ = [
    "MARKER",
    "check_params",
    "ensure_generated",
    "ensure_tree",
    "stable_rng",
    "write_mvtec_tree",
    "write_png",
]
