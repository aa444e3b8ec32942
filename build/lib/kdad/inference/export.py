"""``kdad-export ckpt_path=PATH format=onnx|torchscript``: a trained model as one graph.

    kdad-export ckpt_path=logs/train/runs/<run> format=onnx
    kdad-export ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt format=torchscript output=rd.pt

The exported graph takes a *normalised* image batch ``image`` (N, 3, S, S), float32 (RGB
scaled to [0, 1], resized to ``image_size`` squared, centre-cropped to ``crop_size``, minus
``mean`` over ``std``), and returns ``anomaly_map`` (N, 1, S, S) and ``score`` (N,): the same
maps and raw scores as :meth:`kdad.models.base.DistillationModel.predict`, Gaussian smoothing
included (NFERD's normal feature bank is a constant of the graph). The batch size is dynamic.

Beside the model, ``<output>.json`` holds what a deployment needs: the input size and
normalisation, the output shapes, the thresholds and normalisation of the checkpoint
(:mod:`kdad.thresholds`) and the measured difference to PyTorch. The same JSON is embedded in
the file (ONNX ``metadata_props["kdad"]``, TorchScript extra file ``kdad.json``).

Before the file is moved into place, the exported model is run (onnxruntime / TorchScript) on
random inputs of another batch size than the tracing example and compared with the PyTorch
model; a difference above ``tolerance`` stops with an error and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdad.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from kdad.engine.hydra import output_dir
from kdad.errors import KDADError
from kdad.io.atomic import atomic_path, write_json_atomic
from kdad.lightning.loading import load_module
from kdad.lightning.module import DistillationModule
from kdad.models.base import DistillationModel

log = logging.getLogger("kdad")

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME, OUTPUT_NAMES = "image", ("anomaly_map", "score")
_INSTALL_HINT = "pip install 'kdad[export]'"


class InferenceModel(nn.Module):
    """The exported graph: normalised images (N,3,S,S) -> (anomaly map (N,1,S,S), score (N,))."""

    def __init__(self, net: DistillationModel) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.net.predict(images)


def input_size(module: DistillationModule) -> int:
    preprocess = module.hparams.get("preprocess") or {}
    if not preprocess.get("image_size"):
        raise KDADError(
            "the checkpoint records no preprocessing (image_size): cannot size the graph's input"
        )
    return Preprocess(preprocess["image_size"], preprocess.get("crop_size")).output_size


def describe(
    module: DistillationModule, fmt: str, dynamic_batch: bool, batch: int
) -> dict[str, Any]:
    """The metadata written beside (and into) the exported file."""
    preprocess = dict(module.hparams.get("preprocess") or {})
    size = input_size(module)
    n: int | str = "batch" if dynamic_batch else batch
    return {
        "kdad_export_format": 1,
        "format": fmt,
        "model": str(module.hparams.model_name),
        "input": {
            "name": INPUT_NAME,
            "shape": [n, 3, size, size],
            "dtype": "float32",
            "color": "RGB",
            "resize": preprocess.get("image_size"),
            "crop": preprocess.get("crop_size"),
            "mean": list(preprocess.get("mean") or IMAGENET_MEAN),
            "std": list(preprocess.get("std") or IMAGENET_STD),
            "note": "pixels/255, resized (bilinear, antialiased) to resize x resize, centre-cropped to crop, then (x - mean) / std",
        },
        "outputs": {OUTPUT_NAMES[0]: [n, 1, size, size], OUTPUT_NAMES[1]: [n]},
        "thresholds": module.thresholds,
        "versions": {"torch": torch.__version__, "kdad": _version("kdad")},
    }


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's expected notes (shapes fixed except the batch; deprecations)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def _require(package: str, why: str) -> Any:
    try:
        return __import__(package)
    except ImportError:
        raise KDADError(f"{why} needs the {package} package: {_INSTALL_HINT}") from None


def write_onnx(
    model: InferenceModel,
    example: Tensor,
    path: Path,
    meta: dict[str, Any],
    opset: int = 17,
    dynamo: bool = False,
    dynamic_batch: bool = True,
) -> Path:
    onnx = _require("onnx", "format=onnx")
    with _quiet_tracing(), torch.no_grad():
        if dynamo:
            from torch.export import Dim

            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: Dim("batch")},) if dynamic_batch else None,
                opset_version=opset,
                external_data=False,
            )
        else:
            axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes if dynamic_batch else None,
                opset_version=opset,
                do_constant_folding=True,
            )
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = "kdad", json.dumps(meta)
    onnx.save(graph, str(path))
    return path


def write_torchscript(
    model: InferenceModel, example: Tensor, path: Path, meta: dict[str, Any]
) -> Path:
    with _quiet_tracing(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"kdad.json": json.dumps(meta)})
    return path


def run_exported(path: Path, fmt: str, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported file on ``images`` (CPU): (maps, scores) as numpy arrays."""
    if fmt == "onnx":
        ort = _require("onnxruntime", "checking an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
        return np.asarray(maps), np.asarray(scores)
    with _quiet_tracing(), torch.no_grad():
        loaded = torch.jit.load(str(path), map_location="cpu")
        maps, scores = loaded(images)
    return maps.numpy(), scores.numpy()


def compare(
    module: DistillationModule, path: Path, fmt: str, batch: int = 2, seed: int = 0
) -> dict[str, float]:
    """Max absolute differences of the exported model's maps and scores to PyTorch's."""
    size = input_size(module)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref_maps, ref_scores = module.net.eval().predict(images)
    maps, scores = run_exported(path, fmt, images)
    if maps.shape != tuple(ref_maps.shape) or scores.shape != tuple(ref_scores.shape):
        raise KDADError(
            f"the exported model returns shapes {maps.shape}, {scores.shape} instead of "
            f"{tuple(ref_maps.shape)}, {tuple(ref_scores.shape)} for a batch of {batch}"
        )
    return {
        "anomaly_map_max_abs_diff": float(np.abs(maps - ref_maps.numpy()).max()),
        "score_max_abs_diff": float(np.abs(scores - ref_scores.numpy()).max()),
        "batch": batch,
    }


def export_module(
    module: DistillationModule,
    path: str | Path,
    fmt: str = "onnx",
    *,
    opset: int = 17,
    dynamo: bool = False,
    dynamic_batch: bool = True,
    example_batch: int = 1,
    check: bool = True,
    check_batch: int = 2,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Export ``module`` to ``path``; return the metadata (also written to ``<path>.json``)."""
    if fmt not in FORMATS:
        raise KDADError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.cpu().eval()
    size = input_size(module)
    example = torch.randn(example_batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = InferenceModel(module.net).eval()
    meta = describe(module, fmt, dynamic_batch, example_batch)
    # Written beside the target and moved into place only after the check passed.
    with atomic_path(path, suffix=f".tmp{path.suffix}", fixed=True) as tmp:
        if fmt == "onnx":
            write_onnx(model, example, tmp, meta, opset, dynamo, dynamic_batch)
        else:
            write_torchscript(model, example, tmp, meta)
        if check:
            batch = check_batch if dynamic_batch else example_batch
            diffs = compare(module, tmp, fmt, batch)
            meta["check"] = {**diffs, "tolerance": tolerance}
            worst = max(diffs["anomaly_map_max_abs_diff"], diffs["score_max_abs_diff"])
            if not worst <= tolerance:  # also catches NaN
                raise KDADError(
                    f"the {fmt} export differs from the PyTorch model by {worst:.3g} (> tolerance={tolerance}); "
                    "nothing was written"
                )
            log.info(
                "%s export matches PyTorch: max |diff| map %.3g, score %.3g (batch %d)",
                fmt,
                diffs["anomaly_map_max_abs_diff"],
                diffs["score_max_abs_diff"],
                batch,
            )
    write_json_atomic(path.with_name(path.name + ".json"), meta)
    return meta


def export(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise KDADError(
            "kdad-export needs ckpt_path=PATH (a checkpoint or run folder of kdad-train)"
        )
    fmt = str(cfg.get("format", "onnx"))
    if fmt not in FORMATS:
        raise KDADError(f"format={fmt}: expected one of {', '.join(FORMATS)}")
    module = load_module(cfg.ckpt_path, allow_unsigned=bool(cfg.allow_unsigned))
    output = (
        Path(str(cfg.output)).expanduser()
        if cfg.get("output")
        else output_dir() / f"model{FORMATS[fmt]}"
    )
    meta = export_module(
        module,
        output,
        fmt,
        opset=int(cfg.get("opset", 17)),
        dynamo=bool(cfg.get("dynamo", False)),
        dynamic_batch=bool(cfg.get("dynamic_batch", True)),
        example_batch=int(cfg.get("example_batch", 1)),
        check=bool(cfg.get("check", True)),
        check_batch=int(cfg.get("check_batch", 2)),
        tolerance=float(cfg.get("tolerance", 1e-4)),
    )
    log.info("wrote %s (and %s.json)", output, output.name)
    return meta
