"""``kdad-export ckpt_path=PATH format=onnx|torchscript``: a trained model as one graph.

    kdad-export ckpt_path=logs/train/runs/<run> format=onnx                        # <run>/model.onnx
    kdad-export ckpt_path=logs/train/runs/<run> format=onnx preprocess=uint8_hwc   # <run>/model.uint8_hwc.onnx
    kdad-export ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt format=torchscript output=rd4ad.pt

The graph returns ``anomaly_map`` (N, 1, S, S) and ``score`` (N,): the same maps and raw scores
as :meth:`kdad.models.base.DistillationModel.predict`, Gaussian smoothing included (NFERD's
normal feature bank is a constant of the graph). Its input ``image`` depends on ``preprocess``:

- ``none``: a *normalised* batch (N, 3, S, S), float32 (RGB scaled to [0, 1], resized to
  ``image_size`` squared, centre-cropped to ``crop_size``, minus ``mean`` over ``std``);
- ``uint8_hwc``: decoded RGB pixels, uint8 (N, H, W, 3), any H and W;
- ``float_chw``: RGB in [0, 1], float32 (N, 3, H, W), any H and W.

In the raw modes the graph does what kdad's data pipeline does
(:class:`kdad.data.transforms.Preprocess`): resize (bilinear, antialiased) to the checkpoint's
``image_size``, clamp to [0, 1], centre-crop, normalise. TorchScript also takes a single image
without the batch axis ((H, W, 3) or (3, H, W): a batch of one); ONNX declares the input's rank
(4), as the ONNX checker requires. TorchScript traces the same ``F.interpolate`` kernel as kdad;
ONNX gets the resize as Gather + weighted sums (:func:`resize_taps`, with ATen's weights in
float32): the TorchScript-based exporter has no antialiased Resize, and ONNX's own
``Resize(antialias=1)`` (opset 18, torch.export-based exporter only) differs more at large
scale factors (experiments/benchmark/results/export_preprocess_cpu.md).

Beside the model, ``<output>.json`` holds what a deployment needs: the input contract, the
output shapes, the thresholds and normalisation of the checkpoint (:mod:`kdad.metrics.thresholds`) and
the measured difference to PyTorch. The same JSON is embedded in the file (ONNX
``metadata_props["kdad"]``, TorchScript extra file ``kdad.json``).

Before the file is moved into place, the exported model is run (onnxruntime / TorchScript) on
random inputs of another batch size than the tracing example and compared with the PyTorch
model; in the raw modes on random uint8 images of other sizes than the tracing example (a batch
and one image; TorchScript: without the batch axis), compared with ``Preprocess`` + the PyTorch
model. A difference above ``tolerance`` stops with an error and writes nothing.

Without ``output=`` the file goes into the run folder of the checkpoint (the folder above its
``checkpoints/``, else the checkpoint's folder). An export replaces an earlier export (a file
whose ``<output>.json`` is kdad's export metadata), never any other file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdad.data.transforms import Preprocess
from kdad.errors import KDADError
from kdad.io.atomic import atomic_path, write_json_atomic
from kdad.io.run_folder import RunFolder, resolve_checkpoint
from kdad.lightning.loading import load_module
from kdad.lightning.module import DistillationModule
from kdad.models.base import DistillationModel

log = logging.getLogger("kdad")

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# What the graph's input is: none = the network's normalised batch; the others raw images.
PREPROCESS = ("none", "uint8_hwc", "float_chw")
INPUT_NAME, OUTPUT_NAMES = "image", ("anomaly_map", "score")
METADATA_KEY = "kdad_export_format"
_INSTALL_HINT = "pip install 'kdad[export]'"


def resize_taps(length: Tensor | int, size: int) -> tuple[Tensor, Tensor]:
    """Source indices and weights, each (size, K), of a bilinear, antialiased resize of one axis
    from ``length`` to ``size`` pixels: ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=True)`` as ATen computes it (UpSampleKernel, after PIL).

    Output pixel i is centred at ``c = scale·(i + ½)``, ``scale = length / size``; source pixel
    j weighs ``max(0, 1 − |(j − c + ½)·inv|)``, ``inv = 1 / scale`` when shrinking (the triangle
    stretched over the pixels it covers) and 1 when enlarging; each row sums to 1. The K taps
    from ``floor(c − support + ½)`` cover every non-zero weight (``support = max(scale, 1)``);
    taps past the edge weigh 0. Float32 in ATen's order, so the result matches it to float
    rounding. Only tensor operations on ``length``: traced, the taps follow the input's size.
    """
    source = torch.arange(length).to(torch.float32)
    count = source[-1:] + 1.0  # length, as a tensor
    scale = count / size  # float32, as ATen's opmath
    shrinking = scale >= 1.0
    inverse = torch.where(shrinking, 1.0 / scale, torch.ones_like(scale))
    support = torch.where(shrinking, scale, torch.ones_like(scale))
    center = scale * (torch.arange(size, dtype=torch.float32) + 0.5)
    first = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    taps = torch.ceil(support * 2.0).to(torch.int64) + 1
    index = first[:, None] + torch.arange(taps[0]).to(torch.float32)[None, :]
    distance = ((index - center[:, None]) + 0.5) * inverse
    weights = torch.clamp(1.0 - distance.abs(), min=0.0) * (index < count).to(torch.float32)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.minimum(index, count - 1.0).to(torch.int64), weights


def resize_rows(x: Tensor, size: int) -> Tensor:
    """Resize axis 2 of (N, C, L, W) to ``size`` with :func:`resize_taps`: whole rows gathered
    (contiguous copies) and weighted, (N, C, size, W)."""
    index, weights = resize_taps(x.shape[2], size)
    rows = x.index_select(2, index.reshape(-1))
    rows = rows.reshape(x.shape[0], x.shape[1], size, -1, x.shape[3])
    return (rows * weights[:, :, None]).sum(dim=3)


class RawImages(nn.Module):
    """Raw RGB images -> the normalised batch (N, 3, S, S) kdad's data pipeline makes.

    :class:`kdad.data.transforms.Preprocess` on a batch, for the layout ``uint8_hwc``
    ((N,) H, W, 3 uint8: pixels / 255) or ``float_chw`` ((N,) 3, H, W in [0, 1]): resize
    (bilinear, antialiased) to ``image_size`` squared, clamp to [0, 1], centre-crop to
    ``crop_size``, (x − mean) / std. ``gather_resize``: the resize as gathered rows and weights
    (:func:`resize_rows`, for ONNX), else ``F.interpolate`` (for TorchScript: kdad's kernel).
    """

    def __init__(self, preprocess: Preprocess, layout: str, gather_resize: bool) -> None:
        super().__init__()
        if layout not in PREPROCESS[1:]:
            raise KDADError(f"preprocess={layout}: expected one of {', '.join(PREPROCESS[1:])}")
        self.layout = layout
        self.image_size = preprocess.image_size
        self.crop_size = preprocess.crop_size
        self.gather_resize = gather_resize
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std).view(3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        # Negative axes: traced to TorchScript, a single image (no batch axis) becomes a batch of
        # one. (ONNX's exporter fixes the input's rank at 4, so there it is a no-op.)
        x = images.reshape(-1, images.size(-3), images.size(-2), images.size(-1))
        if self.layout == "uint8_hwc":
            x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        else:
            x = x.to(torch.float32)
        size = self.image_size
        if self.gather_resize:
            x = resize_rows(resize_rows(x, size).transpose(2, 3), size).transpose(2, 3)
        else:
            x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
        if self.crop_size is not None:
            top = (size - self.crop_size) // 2
            x = x[..., top : top + self.crop_size, top : top + self.crop_size]
        return (x - self.mean) / self.std


class InferenceModel(nn.Module):
    """The exported graph: input (see ``preprocess``) -> (anomaly map (N,1,S,S), score (N,))."""

    def __init__(self, net: DistillationModel, raw: RawImages | None = None) -> None:
        super().__init__()
        self.net = net
        self.raw = raw

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.raw is not None:
            images = self.raw(images)
        return self.net.predict(images)


def checkpoint_preprocess(module: DistillationModule) -> Preprocess:
    """The preprocessing the checkpoint was trained with (size, crop, normalisation)."""
    preprocess = module.hparams.get("preprocess") or {}
    if not preprocess.get("image_size"):
        raise KDADError(
            "the checkpoint records no preprocessing (image_size): cannot size the graph's input"
        )
    normalisation = {k: preprocess[k] for k in ("mean", "std") if preprocess.get(k)}
    return Preprocess(preprocess["image_size"], preprocess.get("crop_size"), **normalisation)


def input_size(module: DistillationModule) -> int:
    return checkpoint_preprocess(module).output_size


def _input_contract(pre: Preprocess, mode: str, n: int | str, fmt: str) -> dict[str, Any]:
    common = {
        "name": INPUT_NAME,
        "preprocess": mode,
        "color": "RGB",
        "resize": pre.image_size,
        "crop": pre.crop_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
    }
    size = pre.output_size
    if mode == "none":
        return {
            **common,
            "shape": [n, 3, size, size],
            "dtype": "float32",
            "note": "pixels/255, resized (bilinear, antialiased) to resize x resize, "
            "centre-cropped to crop, then (x - mean) / std",
        }
    hwc = mode == "uint8_hwc"
    image = ["height", "width", 3] if hwc else [3, "height", "width"]
    contract = {
        **common,
        "shape": [n, *image],
        "dtype": "uint8" if hwc else "float32",
        "range": [0, 255] if hwc else [0.0, 1.0],
        "note": "any height and width; the graph resizes (bilinear, antialiased) to resize x "
        "resize, clamps to [0, 1], centre-crops to crop and applies (x - mean) / std, as "
        "kdad.data.transforms.Preprocess",
    }
    if fmt == "torchscript":  # ONNX fixes the input's rank
        contract["single_image_shape"] = image  # a batch of one
    return contract


def describe(
    module: DistillationModule,
    fmt: str,
    dynamic_batch: bool,
    batch: int,
    preprocess: str = "none",
) -> dict[str, Any]:
    """The metadata written beside (and into) the exported file."""
    pre = checkpoint_preprocess(module)
    size = pre.output_size
    n: int | str = "batch" if dynamic_batch else batch
    return {
        METADATA_KEY: 1,
        "format": fmt,
        "model": str(module.hparams.model_name),
        "input": _input_contract(pre, preprocess, n, fmt),
        "network_input": [n, 3, size, size],
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


def _dynamic_axes(preprocess: str, dynamic_batch: bool) -> dict[int, str]:
    """The input's axes that may vary: the batch, and in the raw modes height and width."""
    axes = {0: "batch"} if dynamic_batch else {}
    if preprocess == "uint8_hwc":
        axes.update({1: "height", 2: "width"})
    elif preprocess == "float_chw":
        axes.update({2: "height", 3: "width"})
    return axes


def write_onnx(
    model: InferenceModel,
    example: Tensor,
    path: Path,
    meta: dict[str, Any],
    opset: int = 17,
    dynamo: bool = False,
    dynamic_batch: bool = True,
    preprocess: str = "none",
) -> Path:
    onnx = _require("onnx", "format=onnx")
    axes = _dynamic_axes(preprocess, dynamic_batch)
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
                dynamic_shapes=({i: Dim(name) for i, name in axes.items()},) if axes else None,
                opset_version=opset,
                external_data=False,
            )
        else:
            batch = {0: "batch"} if dynamic_batch else {}
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: axes, **dict.fromkeys(OUTPUT_NAMES, batch)}
                if axes
                else None,
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


def run_exported(
    path: Path, fmt: str, images: Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported file on ``images`` (CPU): (maps, scores) as numpy arrays."""
    if fmt == "onnx":
        ort = _require("onnxruntime", "checking an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = images.numpy() if isinstance(images, Tensor) else np.ascontiguousarray(images)
        maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: feed})
        return np.asarray(maps), np.asarray(scores)
    with _quiet_tracing(), torch.no_grad():
        loaded = torch.jit.load(str(path), map_location="cpu")
        maps, scores = loaded(torch.as_tensor(images))
    return maps.numpy(), scores.numpy()


def _raw_sizes(image_size: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(tracing example, checked batch, checked single image) heights and widths: all
    different, not square, shrinking and enlarging, so that a size baked into the graph shows."""
    return (
        (image_size * 3 // 2 + 1, image_size * 3 // 2 + 1),
        (image_size * 2 + 3, image_size * 3 // 2 + 5),
        (image_size // 2 + 3, image_size + 7),
    )


def raw_example(pre: Preprocess, preprocess: str, batch: int) -> Tensor:
    height, width = _raw_sizes(pre.image_size)[0]
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (batch, height, width, 3), generator=generator)
    if preprocess == "uint8_hwc":
        return pixels.to(torch.uint8)
    return pixels.permute(0, 3, 1, 2).float() / 255.0


def _max_diffs(
    maps: np.ndarray, scores: np.ndarray, ref_maps: Tensor, ref_scores: Tensor, what: str
) -> tuple[float, float]:
    if maps.shape != tuple(ref_maps.shape) or scores.shape != tuple(ref_scores.shape):
        raise KDADError(
            f"the exported model returns shapes {maps.shape}, {scores.shape} instead of "
            f"{tuple(ref_maps.shape)}, {tuple(ref_scores.shape)} for {what}"
        )
    return (
        float(np.abs(maps - ref_maps.numpy()).max()),
        float(np.abs(scores - ref_scores.numpy()).max()),
    )


def compare(
    module: DistillationModule,
    path: Path,
    fmt: str,
    batch: int = 2,
    seed: int = 0,
    preprocess: str = "none",
    single: bool = True,
) -> dict[str, Any]:
    """Max absolute differences of the exported model's maps and scores to PyTorch's.

    ``preprocess="none"``: on a random normalised batch, against the network. Raw modes: on
    random uint8 RGB images of two sizes other than the tracing example's (a batch of
    ``batch``, and with ``single`` one image: TorchScript without the batch axis, ONNX a batch
    of one), the graph's input made from them (float_chw: pixels / 255, channels first), against
    :class:`~kdad.data.transforms.Preprocess` + the network: kdad's own pipeline.
    """
    net = module.net.eval()
    pre = checkpoint_preprocess(module)
    if preprocess == "none":
        size = pre.output_size
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref_maps, ref_scores = net.predict(images)
        maps, scores = run_exported(path, fmt, images)
        map_diff, score_diff = _max_diffs(maps, scores, ref_maps, ref_scores, f"a batch of {batch}")
        return {
            "anomaly_map_max_abs_diff": map_diff,
            "score_max_abs_diff": score_diff,
            "batch": batch,
        }
    rng = np.random.default_rng(seed)
    _, batch_size, single_size = _raw_sizes(pre.image_size)
    cases = [(batch, batch_size)] + ([(None, single_size)] if single else [])
    map_diff = score_diff = 0.0
    shapes = []
    for count, (height, width) in cases:
        pixels = rng.integers(0, 256, (count or 1, height, width, 3), dtype=np.uint8)
        with torch.no_grad():
            ref_maps, ref_scores = net.predict(torch.stack([pre(p) for p in pixels]))
        inputs = (
            pixels if preprocess == "uint8_hwc" else pixels.transpose(0, 3, 1, 2) / np.float32(255)
        )
        if count is None and fmt == "torchscript":
            inputs = inputs[0]
        shapes.append(list(inputs.shape))
        maps, scores = run_exported(path, fmt, inputs)
        diffs = _max_diffs(maps, scores, ref_maps, ref_scores, f"input {inputs.shape}")
        map_diff, score_diff = max(map_diff, diffs[0]), max(score_diff, diffs[1])
    return {
        "anomaly_map_max_abs_diff": map_diff,
        "score_max_abs_diff": score_diff,
        "batch": batch,
        "input_shapes": shapes,
        "reference": "random uint8 RGB images -> kdad.data.transforms.Preprocess -> predict",
    }


def _is_export_metadata(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and METADATA_KEY in meta


def check_target(path: Path) -> None:
    """An export may replace an earlier export (its ``<name>.json`` is kdad's export metadata),
    never another file: a run's checkpoints, metrics.json, config.yaml, a user's file."""
    if path.is_dir():
        raise KDADError(
            f"output={path} is a folder: name the file to write, e.g. output={path / 'model.onnx'}"
        )
    sidecar = path.with_name(path.name + ".json")
    if _is_export_metadata(sidecar):
        return
    for target in (path, sidecar):
        if target.exists() or target.is_symlink():
            raise KDADError(
                f"output={path} would replace {target}, which is not a kdad export (a run's own "
                "file?): choose another output= or remove that file"
            )


def default_output(checkpoint: Path, fmt: str, preprocess: str) -> Path:
    """``<run folder>/model[.<preprocess>]<.onnx|.pt>``: the run folder of a checkpoint in its
    ``checkpoints/`` folder, else the checkpoint's own folder."""
    name = "model" if preprocess == "none" else f"model.{preprocess}"
    return RunFolder.of(checkpoint).path / f"{name}{FORMATS[fmt]}"


def export_module(
    module: DistillationModule,
    path: str | Path,
    fmt: str = "onnx",
    *,
    preprocess: str = "none",
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
    if preprocess not in PREPROCESS:
        raise KDADError(f"preprocess={preprocess!r}: expected one of {', '.join(PREPROCESS)}")
    path = Path(path)
    check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.cpu().eval()
    pre = checkpoint_preprocess(module)
    if preprocess == "none":
        size = pre.output_size
        example = torch.randn(
            example_batch, 3, size, size, generator=torch.Generator().manual_seed(1)
        )
        raw = None
    else:
        example = raw_example(pre, preprocess, example_batch)
        raw = RawImages(pre, preprocess, gather_resize=fmt == "onnx")
    model = InferenceModel(module.net, raw).eval()
    meta = describe(module, fmt, dynamic_batch, example_batch, preprocess)
    # Written beside the target and moved into place only after the check passed.
    with atomic_path(path, suffix=f".tmp{path.suffix}", fixed=True) as tmp:
        if fmt == "onnx":
            write_onnx(model, example, tmp, meta, opset, dynamo, dynamic_batch, preprocess)
        else:
            write_torchscript(model, example, tmp, meta)
        if check:
            batch = check_batch if dynamic_batch else example_batch
            single = dynamic_batch or example_batch == 1
            diffs = compare(module, tmp, fmt, batch, preprocess=preprocess, single=single)
            meta["check"] = {**diffs, "tolerance": tolerance}
            worst = max(diffs["anomaly_map_max_abs_diff"], diffs["score_max_abs_diff"])
            if not worst <= tolerance:  # also catches NaN
                raise KDADError(
                    f"the {fmt} export differs from the PyTorch model by {worst:.3g} (> tolerance={tolerance}); "
                    "nothing was written"
                )
            log.info(
                "%s export matches PyTorch: max |diff| map %.3g, score %.3g (inputs %s)",
                fmt,
                diffs["anomaly_map_max_abs_diff"],
                diffs["score_max_abs_diff"],
                diffs.get("input_shapes", f"a batch of {batch}"),
            )
    write_json_atomic(path.with_name(path.name + ".json"), meta)
    return meta


def opset_range(dynamo: bool) -> tuple[int, int]:
    """The ``opset`` values an export accepts: from 11 (the raw modes' Range and Clip) up to
    the newest the chosen torch exporter writes (the dynamo one converts down from 18)."""
    try:
        from torch.onnx import _constants

        legacy, newest = (
            _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET,
            _constants.ONNX_MAX_OPSET,
        )
    except (ImportError, AttributeError):  # a torch that moved them: its documented values
        legacy, newest = 20, 23
    return (11, newest if dynamo else legacy)


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Every export key typed and in range before the checkpoint is read; a bad value is one
    line ``<key>=<value>: expected ...``."""

    def refuse(key: str, expected: str) -> KDADError:
        return KDADError(f"{key}={_shown(cfg.get(key))}: expected {expected}")

    for key, choices in (("format", tuple(FORMATS)), ("preprocess", PREPROCESS)):
        if cfg.get(key) not in choices:
            raise refuse(key, " or ".join(choices))
    for key in ("allow_unsigned", "dynamo", "dynamic_batch", "check"):
        if not isinstance(cfg.get(key), bool):
            raise refuse(key, "true or false")
    for key in ("example_batch", "check_batch"):
        if not _is_int(cfg.get(key)) or cfg.get(key) < 1:
            raise refuse(key, "an integer >= 1")
    low, high = opset_range(bool(cfg.dynamo))
    if not _is_int(cfg.get("opset")) or not low <= cfg.opset <= high:
        exporter = "torch.export-based" if cfg.dynamo else "TorchScript-based"
        raise refuse(
            "opset",
            f"an integer from {low} to {high} (the ONNX opsets of torch's {exporter} exporter)",
        )
    tolerance = cfg.get("tolerance")
    number = isinstance(tolerance, int | float) and not isinstance(tolerance, bool)
    if not number or not math.isfinite(tolerance) or tolerance < 0:
        raise refuse("tolerance", "a number >= 0 (the largest |difference| to PyTorch allowed)")
    output = cfg.get("output")
    if output is not None and (
        isinstance(output, bool)
        or not str(output).strip()
        or not isinstance(output, str | int | float)
    ):
        raise refuse("output", "a file path, or null for <run folder>/model.<onnx|pt>")


def export(cfg: DictConfig) -> dict[str, Any]:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise KDADError(
            "kdad-export needs ckpt_path=PATH (a checkpoint or run folder of kdad-train)"
        )
    check_config(cfg)
    fmt, preprocess = str(cfg.format), str(cfg.preprocess)
    checkpoint = resolve_checkpoint(cfg.ckpt_path)
    output = (
        Path(str(cfg.output)).expanduser()
        if cfg.output is not None
        else default_output(checkpoint, fmt, preprocess)
    )
    if output.resolve() == checkpoint.resolve():
        raise KDADError(f"output={output} is the checkpoint itself: choose another output=")
    check_target(output)  # before the checkpoint is read
    module = load_module(checkpoint, allow_unsigned=cfg.allow_unsigned)
    meta = export_module(
        module,
        output,
        fmt,
        preprocess=preprocess,
        opset=cfg.opset,
        dynamo=cfg.dynamo,
        dynamic_batch=cfg.dynamic_batch,
        example_batch=cfg.example_batch,
        check=cfg.check,
        check_batch=cfg.check_batch,
        tolerance=float(cfg.tolerance),
    )
    log.info("wrote %s (and %s.json)", output, output.name)
    return meta
