"""Files a run leaves behind, written atomically: metrics.json, scores.csv, resolved config.

A reader (``kdad-aggregate``, a dashboard, a person) never sees a half-written file: each is
written to a temporary file in the same folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The contract of DESIGN.md: exactly these keys, metrics as fractions in [0, 1]; after the
# MVTec AD AUPRO, the PRO as the official RD4AD and STFPM code compute it (README, Metrics).
METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "image_f1_max",
    "pixel_ap",
    "pixel_pro_rd4ad",
    "pixel_pro_stfpm",
)
RESULT_KEYS = (
    "model",
    "data",
    "category",
    "seed",
    *METRIC_KEYS,
    "train_seconds",
    "train_images_per_second",
    "test_images_per_second",
    "params_trainable",
    "params_total",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto it when the block ends without error.

    Readers see the old file or the new one, never a part; on error the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing value reads as null.
    return value


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> Path:
    return write_text_atomic(
        path, json.dumps({k: _json_safe(v) for k, v in data.items()}, indent=2) + "\n"
    )


def write_csv_atomic(
    path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def build_results(
    *,
    model: str,
    data: str,
    category: str,
    seed: int,
    metrics: Mapping[str, float],
    train_stats: Mapping[str, float],
    test_images_per_second: float,
    params_trainable: int,
    params_total: int,
) -> dict[str, Any]:
    """The flat metrics.json object, exactly the contract's keys in the contract's order."""
    results = {
        "model": model,
        "data": data,
        "category": category,
        "seed": int(seed),
        **{key: float(metrics[key]) if key in metrics else float("nan") for key in METRIC_KEYS},
        "train_seconds": float(train_stats.get("train_seconds", float("nan"))),
        "train_images_per_second": float(train_stats.get("train_images_per_second", float("nan"))),
        "test_images_per_second": float(test_images_per_second),
        "params_trainable": int(params_trainable),
        "params_total": int(params_total),
    }
    assert tuple(results) == RESULT_KEYS
    return results
