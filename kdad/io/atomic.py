"""The one way kdad writes files: atomically, readable like any other file.

A reader (``kdad-aggregate``, a dashboard, a person, a resumed run) never sees a half-written
file: each is written to a temporary file in the same folder and moved into place with
``os.replace``, with the permissions the umask gives a new file (never ``mkstemp``'s 0600).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdad.errors import DISK_FULL

if TYPE_CHECKING:  # numpy is imported where an array is written: commands start without it
    import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", fixed: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path``, moved onto it when the block ends without error.

    Readers see the old file or the new one, never a part; on error the temporary file is
    removed and ``path`` is untouched. ``fixed=True`` names it ``.<name><suffix>`` (replacing
    one a killed process left) instead of a unique name: for large files (downloads, exports),
    so that a kill -9 leaves at most one stale part, which the next attempt overwrites.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fixed:
            stale = str(path.with_name(f".{path.name}{suffix}"))
            Path(stale).unlink(missing_ok=True)
            tmp = stale
        else:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
            os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = _disk_full(exc, path) if isinstance(exc, Exception) else None
        if full is not None:
            raise full from exc
        raise


def _disk_full(exc: Exception, path: Path) -> OSError | None:
    """If writing ``path`` failed because the disk (or the quota) is full, an OSError with
    that errno naming ``path`` (the file the user knows, not the temporary one); else None.

    torch's own file writer (``torch.save`` to a path) reports a full disk as a RuntimeError
    without an errno: a failure that leaves less than 1 MiB free on the device counts too."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in DISK_FULL:
        if isinstance(exc, OSError) or not _nearly_full(path.parent):
            return None
        code = errno.ENOSPC
    return OSError(code, os.strerror(code), str(path))


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


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


def write_png_atomic(path: str | Path, image: np.ndarray, compress_level: int = 1) -> Path:
    """An (H, W[, 3]) uint8 array as a PNG (fast compression: encoding at the default level
    costs more than the model's forward pass when predicting)."""
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=compress_level)
    return Path(path)


def write_figure_atomic(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG; the figure is closed either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def write_npz_atomic(target: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Named arrays as a compressed ``.npz``."""
    import numpy as np

    with atomic_path(target, suffix=".npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(target)
