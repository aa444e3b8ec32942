"""kdad-export: every variant in conf/model/ exports to ONNX and TorchScript, and the exported
graphs reproduce the PyTorch model's anomaly maps and scores (Gaussian blur included) to 1e-4;
with ``preprocess=uint8_hwc|float_chw`` the graphs take raw images of any size and reproduce
kdad's own pipeline (Preprocess + model). The command writes beside the run, never over a
run's own files, and refuses bad values of its keys with one line.

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
from clirun import run_in_process
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from kdad.config import CONFIG_DIR
from kdad.data.transforms import Preprocess
from kdad.engine.run import build_module
from kdad.errors import KDADError
from kdad.inference import export as kdad_export
from kdad.inference.export import export_module
from kdad.lightning.loading import load_module, save_checkpoint
from kdad.lightning.module import DistillationModule

VARIANTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
# variant -> why it cannot be exported (empty: every variant must export).
SKIP: dict[str, str] = {}
SIZE = 64
TOLERANCE = 1e-4


def tiny_module(variant: str, *overrides: str) -> DistillationModule:
    """The variant as conf/model/<variant>.yaml defines it, shrunk, with its bank built."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={variant}",
                "model.backbone=resnet18",
                "model.pretrained=false",
                f"data.image_size={SIZE}",
                *overrides,
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
    assert {"rd4ad", "stfpm"} <= set(VARIANTS)
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
    with pytest.raises(KDADError, match="preprocess='rgb'"):
        export_module(module, tmp_path / "model.onnx", preprocess="rgb")


CROP = 48  # the raw-input tests use a checkpoint trained with a centre crop


@pytest.fixture(scope="module")
def cropped() -> DistillationModule:
    return tiny_module("stfpm", f"data.crop_size={CROP}")


def kdads_pipeline(module: DistillationModule, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) -> what kdad-predict computes: Preprocess per image, then the model."""
    preprocess = Preprocess(SIZE, CROP)
    return reference(module, torch.stack([preprocess(p) for p in pixels]))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("mode", ["uint8_hwc", "float_chw"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_raw_input_graphs_reproduce_kdads_pipeline(
    cropped: DistillationModule, fmt: str, mode: str, tmp_path: Path
) -> None:
    path = tmp_path / f"model.{fmt}"
    # The built-in check is off: this test compares on its own images.
    meta = export_module(cropped, path, fmt, preprocess=mode, check=False)
    rng = np.random.default_rng(3)
    # Shrunk and stretched (not square), and exactly the training size (no resize, crop only).
    for count, height, width in ((2, 90, 50), (None, SIZE, SIZE)):
        pixels = rng.integers(0, 256, (count or 1, height, width, 3), dtype=np.uint8)
        expected_maps, expected_scores = kdads_pipeline(cropped, pixels)
        images = pixels if mode == "uint8_hwc" else pixels.transpose(0, 3, 1, 2) / np.float32(255)
        if count is None and fmt == "torchscript":
            images = images[0]  # one image without the batch axis: a batch of one
        maps, scores = kdad_export.run_exported(path, fmt, images)
        assert_close("anomaly_map", maps, expected_maps)
        assert_close("score", scores, expected_scores)
    contract = meta["input"]
    assert contract["preprocess"] == mode and (contract["resize"], contract["crop"]) == (SIZE, CROP)
    assert contract["dtype"] == ("uint8" if mode == "uint8_hwc" else "float32")
    assert meta["network_input"] == ["batch", 3, CROP, CROP]
    if fmt == "onnx":
        onnx.checker.check_model(onnx.load(str(path)))  # a valid model: its input has a rank
        graph_input = ort.InferenceSession(
            str(path), providers=["CPUExecutionProvider"]
        ).get_inputs()[0]
        assert graph_input.name == "image" and graph_input.shape == contract["shape"]
        assert graph_input.type == ("tensor(uint8)" if mode == "uint8_hwc" else "tensor(float)")


def test_the_check_compares_raw_inputs_with_kdads_pipeline(
    cropped: DistillationModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = export_module(cropped, tmp_path / "model.pt", "torchscript", preprocess="uint8_hwc")
    shapes = meta["check"]["input_shapes"]
    assert len(shapes) == 2 and len(shapes[0]) == 4 and len(shapes[1]) == 3  # a batch, one image
    assert all(shape[-3:-1] != [SIZE, SIZE] for shape in shapes)  # other sizes than training
    assert meta["check"]["anomaly_map_max_abs_diff"] <= TOLERANCE
    # A graph that preprocesses differently from kdad (here: brighter) is caught.
    forward = kdad_export.RawImages.forward
    monkeypatch.setattr(kdad_export.RawImages, "forward", lambda self, x: forward(self, x) + 0.05)
    with pytest.raises(KDADError, match="differs from the PyTorch model"):
        export_module(cropped, tmp_path / "bad.pt", "torchscript", preprocess="uint8_hwc")
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "bad.pt.json").exists()


def test_cli_exports_a_checkpoint_and_its_thresholds(tmp_path: Path) -> None:
    """Run as a user does (a new process): the file lands in the run folder, not in Hydra's."""
    run = tmp_path / "run"
    save_checkpoint(tiny_module("rd4ad"), run / "checkpoints" / "last.ckpt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad.cli.export",
            f"ckpt_path={run}",
            "format=torchscript",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model.pt").is_file() and not (tmp_path / "hydra" / "model.pt").exists()
    meta = json.loads((run / "model.pt.json").read_text())
    assert meta["model"] == "rd4ad" and meta["thresholds"]["image"]["threshold"] == 1.5
    assert meta["check"]["anomaly_map_max_abs_diff"] <= TOLERANCE and meta["check"]["batch"] == 2
    assert not list(run.glob(".*.tmp*"))  # written via a temporary file, nothing left over


def test_cli_writes_beside_the_run_and_never_over_its_files(
    tmp_path: Path, env: dict[str, str]
) -> None:
    run = tmp_path / "run"
    ckpt = save_checkpoint(tiny_module("stfpm"), run / "checkpoints" / "last.ckpt")
    (run / "metrics.json").write_text('{"image_auroc": 0.9}\n')
    before = ckpt.read_bytes()

    def export(*args: str, expect: int = 0) -> str:
        proc = run_in_process("kdad.cli.export", list(args), env, tmp_path, expect=expect)
        return proc.stderr

    export(f"ckpt_path={ckpt}", "preprocess=uint8_hwc")  # a checkpoint file: its run folder
    assert (run / "model.uint8_hwc.onnx").is_file()
    assert json.loads((run / "model.uint8_hwc.onnx.json").read_text())["input"]["dtype"] == "uint8"
    export(f"ckpt_path={run}", "preprocess=uint8_hwc", "opset=18")  # an earlier export: replaced
    for output, named in (
        (ckpt, ckpt),
        (run / "checkpoints", run / "checkpoints"),  # a folder
        (run / "metrics.json", run / "metrics.json"),
        (run / "metrics", run / "metrics.json"),  # its <output>.json would be metrics.json
    ):
        stderr = export(f"ckpt_path={run}", f"output={output}", expect=2)
        errors = [line for line in stderr.splitlines() if line.startswith("kdad: error:")]
        assert len(errors) == 1 and f"output={output}" in errors[0], stderr[-2000:]
        assert str(named) in errors[0] and "Traceback" not in stderr
    assert ckpt.read_bytes() == before
    assert json.loads((run / "metrics.json").read_text()) == {"image_auroc": 0.9}
    assert not list((tmp_path / "logs").rglob("model*"))  # Hydra's folder keeps only the log


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tolerance=abc", "tolerance=abc: expected a number >= 0"),
        ("tolerance=-1", "tolerance=-1: expected a number >= 0"),
        ("tolerance=nan", "tolerance=nan: expected a number >= 0"),
        ("opset=999", "opset=999: expected an integer from 11 to "),
        ("opset=17.5", "opset=17.5: expected an integer from 11 to "),
        ("format=tflite", "format=tflite: expected onnx or torchscript"),
        ("preprocess=rgb", "preprocess=rgb: expected none or uint8_hwc or float_chw"),
        ("check=maybe", "check=maybe: expected true or false"),
        ("dynamo=1", "dynamo=1: expected true or false"),
        ("example_batch=0", "example_batch=0: expected an integer >= 1"),
        ("check_batch=two", "check_batch=two: expected an integer >= 1"),
        ("output=true", "output=true: expected a file path"),
    ],
)
def test_bad_values_of_the_export_keys_get_one_line(
    override: str, expected: str, tmp_path: Path, env: dict[str, str]
) -> None:
    # Checked before the checkpoint is read: no checkpoint is needed to see the error.
    proc = run_in_process(
        "kdad.cli.export", ["ckpt_path=missing.ckpt", override], env, tmp_path, expect=2
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"kdad: error: {expected}"), proc.stderr
    assert "Traceback" not in proc.stderr
