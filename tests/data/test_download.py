"""kdad-download against small archives served by a local HTTP server started here.

Checked: a verified download is extracted atomically and a second call does nothing (not even
a request); a wrong checksum, an interrupted download, an archive that fails half-way through
extraction, an unsafe member or a wrong layout leave nothing behind (no data.root, no partial
file, no temporary folder); a half-written download is never resumed; a tree already in place
is left alone; ``data.download=true`` fetches before the data module is built; the CLI prints
one line and exits 2 on errors.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fake_trees import make_btad_tree, make_mvtec_tree
from omegaconf import OmegaConf

from kdad.data import download as kdad_download
from kdad.data.datamodule import instantiate_data
from kdad.data.download import MARKER, ensure_dataset
from kdad.errors import KDADError


class ArchiveServer:
    """Serves ``files`` on 127.0.0.1; ``/truncated/<name>`` promises the whole file and sends half."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                name = self.path.lstrip("/")
                truncated = name.startswith("truncated/")
                body = server.files.get(name.removeprefix("truncated/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if truncated else body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tar_gz(root: Path, members: list[str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.add(path, arcname=str(path.relative_to(root)))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("archives")
    # MVTec AD style: categories at the archive's top level.
    mvtec = make_mvtec_tree(
        base / "mvtec",
        "bottle",
        num_train=3,
        num_test_good=1,
        defects=("crack",),
        num_per_defect=1,
        size=16,
    )
    # BTAD style: a zip with one wrapping folder.
    make_btad_tree(
        base / "btad" / "BTech_Dataset_transformed",
        "01",
        num_train=3,
        num_test_ok=1,
        num_test_ko=1,
        size=16,
    )
    btad_zip = io.BytesIO()
    with zipfile.ZipFile(btad_zip, "w") as archive:
        for path in sorted((base / "btad").rglob("*")):
            if path.is_file():
                archive.write(path, str(path.relative_to(base / "btad")))
    # Incompressible files, so that cutting the archive in two cuts the extraction half-way.
    noisy = base / "noisy"
    rng = np.random.default_rng(0)
    for i in range(12):
        target = noisy / "bottle" / "train" / "good" / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(rng.bytes(20_000))
    noisy_tgz = tar_gz(noisy)
    unsafe = io.BytesIO()
    with tarfile.open(fileobj=unsafe, mode="w:gz") as archive:
        for name in ("bottle/train/good/000.png", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"abc"))
    # A top folder that is a link to "." (the tree then seems to hold itself): links are refused.
    linked = io.BytesIO()
    with tarfile.open(fileobj=linked, mode="w:gz") as archive:
        for path in sorted(mvtec.rglob("*")):
            if path.is_file():
                archive.add(path, arcname=f"mvtec/{path.relative_to(mvtec)}")
        info = tarfile.TarInfo("mvtec/data")
        info.type, info.linkname = tarfile.SYMTYPE, "."
        archive.addfile(info)
    (base / "other" / "readme.txt").parent.mkdir(parents=True)
    (base / "other" / "readme.txt").write_text("not a dataset")
    return {
        "mvtec.tar.gz": tar_gz(mvtec),
        "btad.zip": btad_zip.getvalue(),
        "cut.tar.gz": noisy_tgz[: int(len(noisy_tgz) * 0.6)],
        "unsafe.tar.gz": unsafe.getvalue(),
        "other.tar.gz": tar_gz(base / "other"),
        "linked.tar.gz": linked.getvalue(),
    }


@pytest.fixture(scope="module")
def server(archives: dict[str, bytes]) -> Iterator[ArchiveServer]:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # never through a proxy
    served = ArchiveServer(archives)
    yield served
    served.close()


def spec(server: ArchiveServer, name: str, archives: dict[str, bytes], **changes: object) -> dict:
    return {
        "url": server.url(name),
        "sha256": sha256(archives[name]),
        "size": None,
        "filename": name,
        "subdir": None,
        "expect": ["bottle/train/good"],
        **changes,
    }


def leftovers(parent: Path, root: Path) -> list[str]:
    """Anything in ``parent`` but the dataset tree (no lock file either: the lock is the folder's)."""
    return sorted(p.name for p in parent.iterdir() if p != root)


def test_download_is_verified_atomic_and_idempotent(server, archives, tmp_path: Path) -> None:
    root = tmp_path / "data" / "mvtec_ad"
    before = len(server.requests)
    assert (
        ensure_dataset("mvtec", root, spec(server, "mvtec.tar.gz", archives), progress=False)
        == root
    )
    assert len(list((root / "bottle" / "train" / "good").glob("*.png"))) == 3
    assert (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").is_file()
    assert (root / MARKER).is_file()
    assert leftovers(root.parent, root) == []  # archive deleted, no .part, no temp folder
    assert len(server.requests) == before + 1
    assert "Range" not in server.requests[-1][1]
    # A second call does nothing: no request, the tree untouched.
    stamp = (root / MARKER).stat().st_mtime_ns
    ensure_dataset("mvtec", root, spec(server, "mvtec.tar.gz", archives), progress=False)
    assert len(server.requests) == before + 1 and (root / MARKER).stat().st_mtime_ns == stamp


def test_zip_with_a_wrapping_folder(server, archives, tmp_path: Path) -> None:
    root = tmp_path / "btad"
    ensure_dataset(
        "btad",
        root,
        spec(
            server, "btad.zip", archives, subdir="BTech_Dataset_transformed", expect=["01/train/ok"]
        ),
        progress=False,
        keep_archive=True,
    )
    assert len(list((root / "01" / "train" / "ok").glob("*.bmp"))) == 3
    assert (tmp_path / "btad.zip").is_file()  # keep_archive


def test_wrong_checksum_keeps_nothing(server, archives, tmp_path: Path) -> None:
    root = tmp_path / "mvtec_ad"
    with pytest.raises(KDADError, match=r"SHA-256 .* does not match the expected 0000"):
        ensure_dataset(
            "mvtec", root, spec(server, "mvtec.tar.gz", archives, sha256="0" * 64), progress=False
        )
    assert not root.exists() and leftovers(tmp_path, root) == []


def test_interrupted_download_keeps_nothing_and_is_never_resumed(
    server, archives, tmp_path: Path
) -> None:
    root = tmp_path / "mvtec_ad"
    cut = spec(server, "mvtec.tar.gz", archives, url=server.url("truncated/mvtec.tar.gz"))
    with pytest.raises(KDADError, match="interrupted after"):
        ensure_dataset("mvtec", root, cut, progress=False)
    assert not root.exists() and leftovers(tmp_path, root) == []
    # A killed process may leave a partial file: it is discarded, never continued.
    (tmp_path / ".mvtec.tar.gz.part").write_bytes(archives["mvtec.tar.gz"][:100])
    ensure_dataset("mvtec", root, spec(server, "mvtec.tar.gz", archives), progress=False)
    assert (root / MARKER).is_file() and leftovers(tmp_path, root) == []
    assert "Range" not in server.requests[-1][1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cut.tar.gz", "cannot extract"),  # fails half-way through extraction
        ("unsafe.tar.gz", "unsafe member '../escaped.txt'"),  # a member outside the folder
        ("other.tar.gz", "does not hold the mvtec layout"),
        ("linked.tar.gz", "unsafe member 'mvtec/data'"),  # a symbolic link
    ],
)
def test_failed_extraction_leaves_no_half_tree(
    server, archives, tmp_path: Path, name: str, message: str
) -> None:
    root = tmp_path / "sub" / "mvtec_ad"
    with pytest.raises(KDADError, match=message):
        ensure_dataset("mvtec", root, spec(server, name, archives), progress=False)
    assert not root.exists()
    assert (
        not (tmp_path / "escaped.txt").exists() and not (tmp_path / "sub" / "escaped.txt").exists()
    )
    # The verified archive is kept (no new download next time), nothing else.
    assert leftovers(tmp_path / "sub", root) == [name]


def test_a_tree_already_in_place_is_left_alone(server, archives, tmp_path: Path) -> None:
    placed = make_mvtec_tree(
        tmp_path / "by_hand", "bottle", num_train=1, num_test_good=1, defects=(), size=8
    )
    before = len(server.requests)
    ensure_dataset("mvtec", placed, spec(server, "mvtec.tar.gz", archives), progress=False)
    assert len(server.requests) == before and not (placed / MARKER).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(KDADError, match="exists and is not empty"):
        ensure_dataset("mvtec", foreign, spec(server, "mvtec.tar.gz", archives), progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_data_download_true_fetches_before_building_the_datamodule(
    server, archives, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        kdad_download, "registry", lambda: {"mvtec": spec(server, "mvtec.tar.gz", archives)}
    )
    root = tmp_path / "mvtec_ad"
    data = OmegaConf.create(
        {
            "_target_": "kdad.data.AnomalyDataModule",
            "layout": "mvtec",
            "root": str(root),
            "category": "bottle",
            "image_size": 16,
            "val_fraction": 0,
            "download": True,
        }
    )
    datamodule = instantiate_data(data)
    datamodule.setup()
    assert len(datamodule.train_dataset) == 3 and (root / MARKER).is_file()
    with pytest.raises(KDADError, match="can download btad, mvtec only"):
        kdad_download.dataset_spec("folder", {"mvtec": {}, "btad": {}})


def test_official_archives_are_configured() -> None:
    datasets = kdad_download.registry()
    assert (
        datasets["mvtec"]["sha256"]
        == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    )
    assert datasets["btad"]["url"] == "https://avires.dimi.uniud.it/papers/btad/btad.zip"
    assert (
        datasets["btad"]["sha256"]
        == "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"
    )


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kdad.cli.download", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli(server, archives, tmp_path: Path) -> None:
    root = tmp_path / "mvtec_ad"
    args = [
        "data=mvtec",
        f"data.root={root}",
        f"datasets.mvtec.url={server.url('mvtec.tar.gz')}",
        "datasets.mvtec.filename=mvtec.tar.gz",
        "datasets.mvtec.expect=[bottle/train/good]",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    wrong = run_cli([*args, f"datasets.mvtec.sha256={'0' * 64}"], tmp_path)
    errors = [line for line in wrong.stderr.splitlines() if line.startswith("kdad: error:")]
    assert wrong.returncode == 2 and len(errors) == 1 and "does not match" in errors[0], (
        wrong.stderr
    )
    assert "Traceback" not in wrong.stderr and not root.exists()
    good = [*args, f"datasets.mvtec.sha256={sha256(archives['mvtec.tar.gz'])}"]
    proc = run_cli(good, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (root / "bottle" / "train" / "good").is_dir() and (root / MARKER).is_file()
    count = len(server.requests)
    again = run_cli(good, tmp_path)
    assert again.returncode == 0 and len(server.requests) == count  # idempotent


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_absolute_paths_and_bombs_are_refused_before_extraction(tmp_path: Path, kind: str) -> None:
    def archive(name: str, entries: list[tuple[str, bytes]]) -> Path:
        path = tmp_path / f"{name}.{kind}"
        if kind == "zip":
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as handle:
                for member, data in entries:
                    handle.writestr(member, data)
        else:
            with tarfile.open(path, "w:gz") as handle:
                for member, data in entries:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    handle.addfile(info, io.BytesIO(data))
        return path

    out = tmp_path / "out"
    with pytest.raises(KDADError, match="unsafe member '/etc/kdad_test'"):
        kdad_download.unpack(archive("absolute", [("/etc/kdad_test", b"x")]), out)
    # A "bomb": tiny compressed, huge unpacked (here: over a small cap).
    zeros = archive("zeros", [("a/zeros.bin", bytes(2_000_000))])
    assert zeros.stat().st_size < 100_000
    with pytest.raises(KDADError, match="more than the 10 members / 1000000 bytes"):
        kdad_download.unpack(zeros, out, max_members=10, max_bytes=1_000_000)
    many = archive("many", [(f"a/{i}.txt", b"x") for i in range(11)])
    with pytest.raises(KDADError, match="unpacks to 11 members"):
        kdad_download.unpack(many, out, max_members=10, max_bytes=1_000_000)
    assert not out.exists() or not any(out.rglob("*"))  # nothing was written
    kdad_download.unpack(many, out, max_members=11, max_bytes=1_000_000)
    assert len(list((out / "a").iterdir())) == 11
