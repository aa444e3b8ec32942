"""kdad-export: every variant in conf/model/ exports to ONNX and TorchScript, and the exported
graphs reproduce the PyTorch model's anomaly maps and scores (Gaussian blur included) to 1e-4.

Variants are found by listing conf/model/*.yaml, so a new variant is covered as soon as its
config lands; one can only be skipped with a reason in ``SKIP``. Each checkpoint is built with
random weights (resnet18, 64 px; NFERD's normal feature bank filled from random images), saved
and loaded back through the real checkpoint code, exported, and run with onnxruntime and
``torch.jit.load`` on a batch of another size than the tracing example (dynamic batch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from kdad.config import CONFIG_DIR
from kdad.engine.run import build_module
from kdad.errors import KDADError
from kdad.inference.export import export_module
from kdad.lightning.loading import load_module, save_checkpoint
from kdad.lightning.module import DistillationModule

VARIANTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
# variant -> why it cannot be exported (empty: every variant must export).
SKIP: dict[str, str] = {}
SIZE = 64
TOLERANCE = 1e-4


def tiny_module(variant: str) -> DistillationModule:
    """The variant as conf/model/<variant>.yaml defines it, shrunk, with its bank built."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={variant}",
                "model.backbone=resnet18",
                "model.pretrained=false",
                f"data.image_size={SIZE}",
            ],
        )
    torch.manual_seed(0)
    module = build_module(cfg)
    images = [{"image": torch.randn(3, SIZE, SIZE)} for _ in range(6)]
    module.net.before_fit(DataLoader(images, batch_size=4))  # NFERD: fills the feature bank
    module.thresholds = {
        "image": {"method": "quantile", "threshold": 1.5, "center": 1.0, "scale": 0.5}
    }
    return module.eval()


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param in SKIP:
        pytest.skip(f"{request.param}: {SKIP[request.param]}")
    path = tmp_path_factory.mktemp(request.param) / "model.ckpt"
    return save_checkpoint(tiny_module(request.param), path)


def reference(module: DistillationModule, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        maps, scores = module.net.eval().predict(images)
    return maps.numpy(), scores.numpy()


def inputs(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def assert_close(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    diff = float(np.abs(got - expected).max())
    assert diff <= TOLERANCE, f"{name}: max |diff| {diff:.3g} > {TOLERANCE}"


def test_every_model_config_is_covered() -> None:
    assert {"rd", "stfpm"} <= set(VARIANTS)
    assert set(SKIP) <= set(VARIANTS), "SKIP names a variant that no longer exists"


def test_onnx_matches_pytorch(checkpoint: Path, tmp_path: Path) -> None:
    module = load_module(checkpoint)
    meta = export_module(module, tmp_path / "model.onnx", "onnx")
    images = inputs()
    expected_maps, expected_scores = reference(module, images)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    maps, scores = session.run(["anomaly_map", "score"], {"image": images.numpy()})
    assert_close("anomaly_map", maps, expected_maps)
    assert_close("score", scores, expected_scores)
    # What a deployment needs travels with the file.
    embedded = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(embedded["kdad"])["thresholds"]["image"]["threshold"] == 1.5
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert (
        sidecar["input"]["shape"] == ["batch", 3, SIZE, SIZE] and sidecar["model"] == meta["model"]
    )
    assert sidecar["check"]["anomaly_map_max_abs_diff"] <= TOLERANCE


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch(checkpoint: Path, tmp_path: Path) -> None:
    module = load_module(checkpoint)
    # Checked here independently (the built-in check runs in the CLI test).
    export_module(module, tmp_path / "model.pt", "torchscript", check=False)
    images = inputs(batch=2)
    expected_maps, expected_scores = reference(module, images)
    extra = {"kdad.json": ""}
    loaded = torch.jit.load(str(tmp_path / "model.pt"), map_location="cpu", _extra_files=extra)
    with torch.no_grad():
        maps, scores = loaded(images)
    assert_close("anomaly_map", maps.numpy(), expected_maps)
    assert_close("score", scores.numpy(), expected_scores)
    assert json.loads(extra["kdad.json"])["format"] == "torchscript"


def test_export_errors(tmp_path: Path) -> None:
    module = tiny_module("stfpm")
    with pytest.raises(KDADError, match="format='tflite'"):
        export_module(module, tmp_path / "model.tflite", "tflite")


def test_cli_exports_a_checkpoint_and_its_thresholds(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tiny_module("rd"), tmp_path / "rd.ckpt")
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad.cli.export",
            f"ckpt_path={ckpt}",
            "format=torchscript",
            f"hydra.run.dir={run}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model.pt").is_file()
    meta = json.loads((run / "model.pt.json").read_text())
    assert meta["model"] == "rd" and meta["thresholds"]["image"]["threshold"] == 1.5
    assert meta["check"]["anomaly_map_max_abs_diff"] <= TOLERANCE and meta["check"]["batch"] == 2
    assert not list(run.glob(".*.tmp*"))  # written via a temporary file, nothing left over
