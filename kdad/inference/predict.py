"""``kdad-predict ckpt_path=PATH input=PATH``: score images with a trained model.

    kdad-predict ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt input=/line7/today
    kdad-predict ckpt_path=logs/train/runs/<run> input='/line7/*/cam2_*.png' device=cuda

``input`` is an image file, a folder (searched recursively for image files) or a glob pattern
(or a list of them). The variant, its weights, its preprocessing and its thresholds come from
the checkpoint. The run folder gets:

- ``predictions.csv``: one row per input file, in input order: ``path, status, score,
  normalized_score, label, defect_fraction, overlay, error``. ``status`` is ``ok`` or
  ``failed`` (the file could not be read: ``error`` says why, the other values are empty).
  ``score`` is the raw image score; ``normalized_score`` puts the image threshold at 1 and the
  median normal validation score at 0 (:mod:`kdad.metrics.thresholds`); ``label`` is 1 (anomalous,
  ``score > threshold``) or 0; ``defect_fraction`` is the share of map pixels above the pixel
  threshold. Without thresholds (a model trained with ``data.val_fraction=0`` and none given
  as ``image_threshold=``/``pixel_threshold=``) these three are empty.
- ``overlays/<name>.png`` per image: the image | its heatmap over it | the contour of the
  predicted defect mask (pixels above the pixel threshold), with the score and label below.
  Names come from the file's path below the input folder, sanitised to ``[A-Za-z0-9._-]``
  and made unique, so nothing is written outside the run folder and same-named files from
  different folders never overwrite each other.

Unreadable files are skipped with a warning and a ``failed`` row; the run goes on. When no
input at all could be read, the command fails (exit 2) after writing ``predictions.csv``.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kdad.data.layouts import IMAGE_EXTENSIONS
from kdad.data.transforms import Preprocess, load_image
from kdad.engine.hydra import output_dir
from kdad.errors import KDADError, one_line
from kdad.io.atomic import write_csv_atomic, write_png_atomic, write_text_atomic
from kdad.io.run_folder import RunFolder
from kdad.lightning.loading import load_module
from kdad.metrics import thresholds as kdad_thresholds
from kdad.viz.overlay import render_overlay

log = logging.getLogger("kdad")

HEADER = (
    "path",
    "status",
    "score",
    "normalized_score",
    "label",
    "defect_fraction",
    "overlay",
    "error",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
}
MAX_NAME = 120


# --- inputs and output names --------------------------------------------------------------
def _visible(path: Path, base: Path) -> bool:
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        parts = (path.name,)
    return not any(part.startswith(".") for part in parts)


def find_inputs(spec: Any, recursive: bool = True) -> list[tuple[Path, Path]]:
    """``(file, base folder)`` for every input file, in a stable order, without duplicates.

    A folder yields its image files (by extension, hidden ones skipped); a file or a glob
    match is taken as given, whatever its extension (an unreadable one becomes a failed row).
    """
    specs = list(spec) if isinstance(spec, ListConfig | list | tuple) else [spec]
    if not specs or any(s in (None, "") for s in specs):
        raise KDADError("kdad-predict needs input=PATH (an image, a folder or a glob pattern)")
    found: list[tuple[Path, Path]] = []
    for item in specs:
        text = os.path.expanduser(str(item))
        path = Path(text).absolute()
        if path.is_dir():
            candidates = path.rglob("*") if recursive else path.iterdir()
            files = sorted(
                f
                for f in candidates
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and _visible(f, path)
            )
            base = path
            if not files:
                raise KDADError(
                    f"input={text}: no image files in this folder ({', '.join(IMAGE_EXTENSIONS)})"
                )
        elif path.is_file():
            files, base = [path], path.parent
        elif glob.has_magic(text):
            files = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
            if not files:
                raise KDADError(f"input={text}: the pattern matches no file")
            files = [f.absolute() for f in files]
            base = Path(os.path.commonpath([str(f.parent) for f in files]))
        else:
            raise KDADError(f"input={text}: no such file or folder")
        found += [(f, base) for f in files]
    unique: dict[str, tuple[Path, Path]] = {}
    for file, base in found:
        unique.setdefault(str(file.resolve()), (file, base))
    return list(unique.values())


def sanitize(part: str) -> str:
    """A path component reduced to ``[A-Za-z0-9._-]``, never hidden, never ``.`` or ``..``."""
    cleaned = _UNSAFE.sub("_", part).strip("._-")
    if cleaned.split(".")[0].upper() in _RESERVED:
        cleaned = f"_{cleaned}"
    return cleaned


def output_names(files: Sequence[tuple[Path, Path]], suffix: str = ".png") -> list[str]:
    """A unique, safe file name per input: its path below its base folder joined with ``__``.

    ``a/x.png`` and ``b/x.png`` become ``a__x.png`` and ``b__x.png``; names that still
    collide (``x.png`` and ``x.bmp``, or two names equal after sanitising or up to case) get
    ``-2``, ``-3``, ...; long names are shortened with a hash of the full path.
    """
    used: set[str] = set()
    names: list[str] = []
    for file, base in files:
        try:
            rel = file.relative_to(base)
        except ValueError:
            rel = Path(file.name)
        parts = [sanitize(p) for p in (*rel.parent.parts, rel.stem)]
        stem = "__".join(p for p in parts if p) or "image"
        if len(stem) > MAX_NAME:
            digest = hashlib.sha1(str(rel).encode("utf-8", "surrogateescape")).hexdigest()[:10]
            stem = f"{stem[: MAX_NAME - 11].rstrip('._-')}-{digest}"
        name, k = f"{stem}{suffix}", 2
        while name.lower() in used:
            name, k = f"{stem}-{k}{suffix}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, refusing anything that would land outside ``folder``."""
    target = (folder / name).resolve()
    if target.parent != folder.resolve() or name in ("", ".", ".."):
        raise KDADError(f"refusing to write {name!r} outside {folder}")
    return target


# --- loading ------------------------------------------------------------------------------
def display_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the image's aspect ratio and ``long_side`` pixels along its longer side."""
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class PredictDataset(Dataset):
    """Loads one input: the model tensor and a display-size copy, or the reason it failed."""

    def __init__(
        self, files: Sequence[Path], preprocess: Preprocess, overlay_size: int | None
    ) -> None:
        self.files = list(files)
        self.preprocess = preprocess
        self.overlay_size = overlay_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index, "image": None, "display": None, "error": None}
        try:
            pixels = load_image(self.files[index])
            item["image"] = self.preprocess(pixels)
            if self.overlay_size:
                h, w = display_size(pixels.shape[0], pixels.shape[1], self.overlay_size)
                shown = Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR)
                item["display"] = np.asarray(shown)
        except KDADError as exc:
            item["error"] = one_line(exc)
        except Exception as exc:  # any other failure of one file must not stop the batch
            item["error"] = (
                f"cannot read image file {self.files[index]}: {type(exc).__name__}: {exc}"
            )
        if item["error"] is not None:
            item["image"] = item["display"] = None
        return item


def _keep_as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


# --- overlays -----------------------------------------------------------------------------
def map_to_display(
    anomaly_map: torch.Tensor, preprocess: Preprocess, size: tuple[int, int]
) -> np.ndarray:
    """The model-resolution map (S, S) placed on a display image of ``size`` (h, w).

    The model saw the image resized to ``image_size`` squared (aspect ratio not kept), then
    centre-cropped to ``crop_size``: the map covers that crop; outside it the values are NaN.
    """
    h, w = size
    grid = anomaly_map.float()[None, None]
    if preprocess.crop_size is None:
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    full, crop = preprocess.image_size, preprocess.crop_size
    top = (full - crop) // 2
    y0, y1 = round(top * h / full), round((top + crop) * h / full)
    x0, x1 = round(top * w / full), round((top + crop) * w / full)
    canvas = np.full((h, w), np.nan, dtype=np.float32)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = F.interpolate(
            grid, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
        )[0, 0].numpy()
    return canvas


class OverlayWriter:
    """Renders and saves overlays on background threads, so that writing them overlaps with
    the model (PNG encoding releases the GIL). At most ``max_pending`` wait in memory; the
    first error is raised by :meth:`submit` or :meth:`close`."""

    def __init__(self, folder: Path, workers: int = 2, max_pending: int = 32) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdad-overlay")
        self.pending: deque[Future] = deque()
        self.max_pending = max_pending

    def submit(self, name: str, *render_args: Any) -> str:
        """Queue the overlay ``name`` (see :func:`render_overlay` for the arguments); return
        its path relative to the run folder."""
        target = inside(self.folder, name)
        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(
            self.pool.submit(lambda: write_png_atomic(target, render_overlay(*render_args)))
        )
        return f"{self.folder.name}/{target.name}"

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --- the command --------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KDADError(f"device={name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KDADError(
                f"device={name}: CUDA is not available here (use device=cpu or device=auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KDADError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise KDADError(f"device={name}: expected auto, cpu, cuda or cuda:N")
    return device


def _positive(cfg: DictConfig, key: str) -> int:
    value = cfg.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < (0 if key == "num_workers" else 1)
    ):
        raise KDADError(
            f"{key}={value!r}: expected an integer >= {0 if key == 'num_workers' else 1}"
        )
    return value


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Score every input, write predictions.csv and the overlays; return a summary."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise KDADError(
            "kdad-predict needs ckpt_path=PATH (a checkpoint or run folder of kdad-train)"
        )
    if OmegaConf.is_missing(cfg, "input"):
        raise KDADError("kdad-predict needs input=PATH (an image, a folder or a glob pattern)")
    batch_size, num_workers = _positive(cfg, "batch_size"), _positive(cfg, "num_workers")
    overlay_size = _positive(cfg, "overlay_size") if cfg.get("overlays", True) else None
    out = RunFolder(output_dir())
    write_text_atomic(out.config, OmegaConf.to_yaml(cfg, resolve=True))
    device = resolve_device(cfg.get("device", "auto"))
    inputs = find_inputs(cfg.input, bool(cfg.get("recursive", True)))  # before the model loads
    names = output_names(inputs)

    module = load_module(cfg.ckpt_path, allow_unsigned=bool(cfg.allow_unsigned))
    net = module.net.to(device).eval()
    trained = module.hparams.get("preprocess") or {}
    preprocess = Preprocess(
        **{k: trained[k] for k in ("image_size", "crop_size") if trained.get(k) is not None}
    )
    thresholds = kdad_thresholds.override(
        module.thresholds, cfg.get("image_threshold"), cfg.get("pixel_threshold")
    )
    image_level = (thresholds or {}).get("image")
    pixel_level = (thresholds or {}).get("pixel")
    log.info("model=%s, %s, on %s", module.hparams.model_name, preprocess, device)
    if image_level is None:
        log.warning(
            "the checkpoint holds no image threshold (trained with data.val_fraction=0?): "
            "scores only, normalized_score and label are left empty; pass image_threshold=VALUE to set one"
        )
    else:
        log.info("thresholds: %s", kdad_thresholds.describe(thresholds))

    writer = OverlayWriter(out.overlays) if overlay_size else None
    loader = DataLoader(
        PredictDataset([f for f, _ in inputs], preprocess, overlay_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep_as_list,
        pin_memory=device.type == "cuda",
    )
    rows: list[list[str] | None] = [None] * len(inputs)
    failed = anomalous = 0
    start = time.perf_counter()
    progress = tqdm(
        total=len(inputs), desc="predict", unit="img", disable=not cfg.get("progress", True)
    )
    try:
        for batch in loader:
            good = [item for item in batch if item["error"] is None]
            for item in batch:
                if item["error"] is not None:
                    failed += 1
                    log.warning("skipped: %s", item["error"])
                    path = str(inputs[item["index"]][0])
                    rows[item["index"]] = [path, "failed", "", "", "", "", "", item["error"]]
            if good:
                images = torch.stack([item["image"] for item in good]).to(device, non_blocking=True)
                with torch.inference_mode():
                    maps, scores = net.predict(images)
                maps, scores = maps[:, 0].float().cpu(), scores.float().cpu()
                for item, anomaly_map, score in zip(good, maps, scores.tolist(), strict=True):
                    row = _row(
                        item,
                        anomaly_map,
                        score,
                        inputs,
                        names,
                        image_level,
                        pixel_level,
                        preprocess,
                        writer,
                    )
                    anomalous += row[4] == "1"
                    rows[item["index"]] = row
            progress.update(len(batch))
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - start
    write_csv_atomic(out.predictions, HEADER, rows)
    scored = len(inputs) - failed
    summary = {
        "images": len(inputs),
        "scored": scored,
        "failed": failed,
        "anomalous": anomalous if image_level else None,
        "seconds": seconds,
        "images_per_second": scored / seconds if seconds > 0 else math.nan,
    }
    log.info(
        "%d image(s) scored (%s anomalous), %d failed, %.2f images/s end to end; results in %s",
        scored,
        anomalous if image_level else "?",
        failed,
        summary["images_per_second"],
        out.predictions,
    )
    if inputs and failed == len(inputs):
        # Nothing was scored: a failure, whatever the rows say (predictions.csv lists why).
        raise KDADError(
            f"none of the {failed} input image(s) could be read (reasons in {out.predictions})"
        )
    return summary


def _row(
    item: dict[str, Any],
    anomaly_map: torch.Tensor,
    score: float,
    inputs: Sequence[tuple[Path, Path]],
    names: Sequence[str],
    image_level: dict[str, Any] | None,
    pixel_level: dict[str, Any] | None,
    preprocess: Preprocess,
    writer: OverlayWriter | None,
) -> list[str]:
    index = item["index"]
    normalized = label = defect_fraction = None
    if image_level:
        normalized = kdad_thresholds.normalize(score, image_level)
        label = int(score > image_level["threshold"])
    if pixel_level:
        defect_fraction = float((anomaly_map > pixel_level["threshold"]).float().mean())
    overlay = ""
    if writer is not None and item["display"] is not None:
        display = item["display"]
        heat = map_to_display(anomaly_map, preprocess, display.shape[:2])
        verdict = {None: "no threshold", 0: "normal", 1: "ANOMALOUS"}[label]
        caption = (
            f"score {score:.4g}"
            + (f"  normalised {normalized:.3f}" if normalized is not None else "")
            + f"  {verdict}"
        )
        colour = {None: (200, 200, 200), 0: (120, 220, 120), 1: (255, 90, 90)}[label]
        overlay = writer.submit(names[index], display, heat, pixel_level, caption, colour)
    return [
        str(inputs[index][0]),
        "ok",
        _fmt(score),
        _fmt(normalized),
        "" if label is None else str(label),
        _fmt(defect_fraction),
        overlay,
        "",
    ]
