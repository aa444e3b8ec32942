"""``kdad-download data=mvtec|btad [data.root=PATH]``: fetch, verify and extract a dataset.

    kdad-download data=mvtec data.root=/data/mvtec_ad
    kdad-download data=btad archive=$HOME/Downloads/btad.zip # a copy you already have
    kdad-train data=mvtec data.category=bottle data.download=true   # the same, before training

The official archives, their SHA-256 checksums and their layouts are in conf/download.yaml
(``datasets.<layout>``). What it guarantees:

- verified: the archive's SHA-256 (and size, where known) must match, or nothing is kept;
- atomic: the archive is extracted into a temporary folder *beside* ``data.root`` and moved
  into place with one rename once its layout checks out, so ``data.root`` is either absent or
  complete, never half-extracted;
- idempotent: a finished tree carries a ``.kdad-download.json`` marker and a second call does
  nothing (no network); a complete tree put there by hand is recognised and left alone;
- nothing half-written is ever resumed: a download goes to ``.<name>.part`` and only a whole,
  verified file is renamed to the archive name; leftovers of an interrupted run are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdad.config import CONFIG_DIR
from kdad.errors import KDADError
from kdad.io.atomic import atomic_path

log = logging.getLogger("kdad")

MARKER = ".kdad-download.json"
CHUNK = 1 << 20
_IGNORED_TOP_LEVEL = ("__MACOSX",)


def registry() -> dict[str, Any]:
    """``datasets`` of conf/download.yaml: the official archives per data layout."""
    path = Path(CONFIG_DIR) / "download.yaml"
    return OmegaConf.to_container(OmegaConf.load(path).datasets, resolve=True)


def dataset_spec(layout: str, datasets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    datasets = registry() if datasets is None else dict(datasets)
    if layout not in datasets:
        raise KDADError(
            f"data={layout}: kdad can download {', '.join(sorted(datasets))} only; "
            "put other data in place yourself (data.root=...)"
        )
    spec = dict(datasets[layout])
    if not spec.get("url"):
        raise KDADError(f"datasets.{layout}.url is not set in conf/download.yaml")
    return spec


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


def fetch(
    url: str,
    target: Path,
    sha256: str | None,
    size: int | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``target`` (via ``.<name>.part``); verify size and checksum.

    A verified ``target`` already there is reused. A partial file is never resumed: it is
    deleted and the download starts over.
    """
    if target.is_file() and sha256:
        if sha256_of(target) == sha256.lower():
            log.info("using the verified archive already at %s", target)
            return target
        log.warning("%s does not match the expected checksum; downloading it again", target)
    request = urllib.request.Request(url, headers={"User-Agent": "kdad-download"})
    digest, received = hashlib.sha256(), 0
    try:
        # .<name>.part, never resumed: a stale one is replaced; moved onto target only once
        # verified, removed on any error.
        with atomic_path(target, suffix=".part", fixed=True) as part:
            with (
                urllib.request.urlopen(request, timeout=timeout) as response,
                open(part, "wb") as out,
            ):
                announced = response.length  # Content-Length, if the server sends one
                total = announced or size
                with _progress(total, target.name, progress) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if announced is not None and received < announced:  # the connection dropped early
                raise KDADError(
                    f"download of {url} was interrupted after {received} of {announced} bytes; "
                    "nothing was kept, run the command again"
                )
            if size and received != int(size):
                raise KDADError(
                    f"download of {url}: got {received} bytes, expected {int(size)}; nothing was kept "
                    f"(if the official file changed, set datasets.<name>.size)"
                )
            actual = digest.hexdigest()
            if sha256 and actual != sha256.lower():
                raise KDADError(
                    f"download of {url}: SHA-256 {actual} does not match the expected {sha256.lower()}; "
                    "nothing was kept (a corrupted or changed file; if the official archive changed, "
                    "set datasets.<name>.sha256)"
                )
            if not sha256:
                log.warning(
                    "no checksum configured for %s: not verified (its SHA-256 is %s; put it in datasets.<name>.sha256)",
                    url,
                    actual,
                )
    except urllib.error.HTTPError as exc:
        raise KDADError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, EOFError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise KDADError(
            f"download of {url} failed or was interrupted ({type(exc).__name__}: {reason}); "
            "nothing was kept, run the command again"
        ) from None
    return target


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return (
        not path.is_absolute()
        and ".." not in path.parts
        and not (path.parts and ":" in path.parts[0])
    )


# Bounds on what an archive may unpack to (the official MVTec AD archive holds ~5,400 files,
# ~5 GB): a crafted archive ("zip bomb") is refused before anything is written.
MAX_MEMBERS = 200_000
MAX_BYTES = 64 * 2**30


def unpack(
    archive: Path, dest: Path, max_members: int = MAX_MEMBERS, max_bytes: int = MAX_BYTES
) -> None:
    """Extract a .zip or tar (.tar, .tar.gz, .tar.xz, ...) into ``dest``.

    Refused before anything is extracted: absolute paths, ``..``, drive letters, links,
    devices and other special members, and archives of more than ``max_members`` members or
    ``max_bytes`` bytes unpacked (sizes as the archive declares them; zip extraction stops at
    the declared size of each member, tar's sizes are exact)."""

    def check(entries: list[tuple[str, bool, int]]) -> None:
        """(name, is a plain file or folder, unpacked size) of every member."""
        bad = [name for name, plain, _ in entries if not plain or not _safe_member(name)]
        if bad:
            raise KDADError(f"archive {archive} holds an unsafe member {bad[0]!r}; not extracted")
        total = sum(size for _, _, size in entries)
        if len(entries) > max_members or total > max_bytes:
            raise KDADError(
                f"archive {archive} unpacks to {len(entries)} members and {total} bytes, more than "
                f"the {max_members} members / {max_bytes} bytes a dataset may hold; not extracted"
            )

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                infos = handle.infolist()
                # A zip entry whose external attributes say "symbolic link" is a link.
                check(
                    [
                        (i.filename, (i.external_attr >> 16) & 0o170000 != 0o120000, i.file_size)
                        for i in infos
                    ]
                )
                handle.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as handle:
                members = handle.getmembers()
                check([(m.name, m.isfile() or m.isdir(), m.size) for m in members])
                if hasattr(tarfile, "data_filter"):  # a second guard where Python has it
                    handle.extractall(dest, members=members, filter="data")
                else:
                    handle.extractall(dest, members=members)
        else:
            raise KDADError(f"archive {archive} is neither a zip nor a tar file")
    except KDADError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise KDADError(
            f"cannot extract {archive} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "nothing was extracted into place"
        ) from None


def _content_dir(tmp: Path, subdir: str | None, expect: Sequence[str]) -> Path:
    """The folder of the unpacked archive that becomes data.root.

    ``subdir`` names it; ``None`` takes the archive's top level if the expected layout is
    there, else its single top-level folder (an archive that wraps the tree in one folder).
    """
    if subdir not in (None, "", "."):
        content = tmp / subdir
        if not content.is_dir():
            found = sorted(p.name for p in tmp.iterdir())
            raise KDADError(
                f"the archive has no folder {subdir!r} at its top level (found: {found})"
            )
        return content
    if subdir is None and _missing(tmp, expect):
        entries = [
            p
            for p in tmp.iterdir()
            if p.name not in _IGNORED_TOP_LEVEL and not p.name.startswith(".")
        ]
        if len(entries) == 1 and entries[0].is_dir() and not _missing(entries[0], expect):
            return entries[0]
    return tmp


def _missing(root: Path, expect: Sequence[str]) -> list[str]:
    return [rel for rel in expect if not (root / rel).exists()]


def _links(tree: Path) -> list[Path]:
    """Symbolic links anywhere in ``tree`` (not followed)."""
    found = []
    for folder, dirs, files in os.walk(tree, followlinks=False):
        found += [
            Path(folder) / name for name in (*dirs, *files) if (Path(folder) / name).is_symlink()
        ]
    return found


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (several processes, e.g. DDP ranks, may ask for
    the same dataset): an flock on the folder's descriptor, so no lock file is left behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def ensure_dataset(
    name: str,
    root: str | Path,
    spec: Mapping[str, Any],
    archive: str | Path | None = None,
    keep_archive: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Make ``root`` hold dataset ``name`` (see the module docstring); return ``root``."""
    root = Path(os.path.expanduser(str(root))).absolute()
    expect = list(spec.get("expect") or [])
    sha256 = (spec.get("sha256") or None) and str(spec["sha256"]).lower()
    marker = root / MARKER
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent):
        if marker.is_file():
            log.info("%s is already in %s (downloaded by kdad); nothing to do", name, root)
            return root
        if root.is_dir() and any(root.iterdir()):
            if expect and not _missing(root, expect):
                log.info("%s already holds %s (put there by hand); nothing to do", root, name)
                return root
            raise KDADError(
                f"data.root={root} exists and is not empty, but is not a complete {name} tree "
                f"(missing {_missing(root, expect)[:3]}); move it away or choose another data.root"
            )
        if root.exists() and not root.is_dir():
            raise KDADError(f"data.root={root} exists and is not a folder")
        for stale in parent.glob(f".{root.name}.extract-*"):  # left by a killed extraction
            shutil.rmtree(stale, ignore_errors=True)

        downloaded = False
        if archive is not None:
            source = Path(os.path.expanduser(str(archive))).absolute()
            if not source.is_file():
                raise KDADError(f"archive={source}: no such file")
            if not sha256:
                log.warning(
                    "datasets.%s.sha256 is not set: %s is extracted unverified", name, source
                )
            elif sha256_of(source) != sha256:
                raise KDADError(
                    f"archive={source}: its SHA-256 does not match datasets.{name}.sha256 ({sha256}); "
                    "not the official archive, or a damaged copy"
                )
        else:
            filename = spec.get("filename") or Path(urllib.parse.urlparse(spec["url"]).path).name
            source = parent / str(filename)
            fetch(spec["url"], source, sha256, spec.get("size"), timeout, progress)
            downloaded = True

        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extract-", dir=parent))
        try:
            log.info("extracting %s", source)
            unpack(source, tmp)
            links = _links(tmp)
            if links:
                raise KDADError(
                    f"{source} holds a symbolic link ({links[0].relative_to(tmp)}); a dataset tree "
                    "with links is refused (it could point outside data.root); nothing was extracted into place"
                )
            content = _content_dir(tmp, spec.get("subdir"), expect)
            missing = _missing(content, expect)
            if missing:
                raise KDADError(
                    f"{source} does not hold the {name} layout (missing {missing[:3]}); nothing was extracted into place"
                )
            info = {
                "dataset": name,
                "url": spec.get("url"),
                "sha256": sha256,
                "archive": source.name,
                "extracted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (content / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            if root.is_dir():
                root.rmdir()  # empty (checked above)
            os.rename(content, root)  # atomic: the whole tree appears at once
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if downloaded and not keep_archive:
            source.unlink(missing_ok=True)
    log.info("%s is ready in %s", name, root)
    return root


def download(cfg: DictConfig) -> None:
    layout = str(cfg.data.layout)
    spec = dataset_spec(layout, OmegaConf.to_container(cfg.datasets, resolve=True))
    ensure_dataset(
        layout,
        str(cfg.data.root),
        spec,
        archive=cfg.get("archive"),
        keep_archive=bool(cfg.get("keep_archive", False)),
        timeout=float(cfg.get("timeout", 60)),
        progress=bool(cfg.get("progress", True)),
    )
