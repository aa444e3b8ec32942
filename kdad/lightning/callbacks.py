"""Lightning callbacks: throughput, heatmap images and per-image scores.

They observe the LightningModule's outputs and write files into the run folder (atomically)
and, where a W&B logger is attached, to Weights & Biases.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from kdad.errors import disk_full
from kdad.io.atomic import write_csv_atomic, write_npz_atomic, write_png_atomic, write_text_atomic
from kdad.io.run_folder import SAMPLES, RunFolder
from kdad.metrics import thresholds
from kdad.viz.overlay import heatmap_panel
from kdad.viz.plots import FIGURE_FORMATS, check_formats, plot_curves

log = logging.getLogger("kdad")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather_objects(trainer: L.Trainer, items: list[Any]) -> list[Any]:
    """All processes' lists concatenated (rank order); the list itself without DDP."""
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return items
    gathered: list[list[Any] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class SpeedMonitor(L.Callback):
    """Measures training and test throughput for metrics.json.

    - ``train_seconds``: wall time of ``fit`` (everything from the first hook to the last,
      validation and one-off work such as building a feature bank included);
    - ``train_images_per_second``: training images processed divided by the time of the
      training loop alone (data loading included, validation excluded);
    - ``test_images_per_second``: test images divided by the time from the start of the test
      loop to the end of its last batch (loading, maps, scores, metric updates; the final
      metric computation excluded).
    """

    def __init__(self) -> None:
        self.test_images_per_second = float("nan")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._fit_start = time.perf_counter()
        self._val_seconds = 0.0
        self._train_images = 0
        self._train_loop_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_loop_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._train_images += len(batch["image"])
        self._publish(pl_module, time.perf_counter())

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and hasattr(self, "_val_start"):
            self._val_seconds += time.perf_counter() - self._val_start

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._publish(pl_module, time.perf_counter())

    def _publish(self, pl_module: L.LightningModule, now: float) -> None:
        loop = max(now - (self._train_loop_start or self._fit_start) - self._val_seconds, 1e-9)
        pl_module.train_stats = {
            "train_seconds": now - self._fit_start,
            "train_images_per_second": self._train_images / loop,
            "train_images": float(self._train_images),
        }

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._test_start = time.perf_counter()
        self._test_images = 0

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._test_images += len(batch["image"])
        self._test_end = time.perf_counter()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        elapsed = max(getattr(self, "_test_end", self._test_start) - self._test_start, 1e-9)
        # Under DDP: all processes' images over the slowest process's time.
        shares = _gather_objects(trainer, [(self._test_images, elapsed)])
        self.test_images_per_second = sum(n for n, _ in shares) / max(t for _, t in shares)


def save_checkpoint_atomically(trainer: L.Trainer, path: str | Path, weights_only: bool) -> None:
    """``trainer.save_checkpoint`` to a temporary file beside ``path`` (the same name on every
    rank: the strategy writes on rank 0), moved onto ``path`` once complete: a kill during the
    write leaves the previous file intact."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.partial")
    try:
        trainer.save_checkpoint(partial, weights_only)
    except Exception as exc:  # a full disk, a lost mount: no partial file left behind
        if trainer.is_global_zero:
            partial.unlink(missing_ok=True)
        full = next(
            (e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError)), None
        )
        if full is not None and disk_full(full) is not None:  # name the checkpoint, not the temp
            raise OSError(full.errno, os.strerror(full.errno), str(target)) from exc
        raise
    if trainer.is_global_zero:
        os.replace(partial, target)
    trainer.strategy.barrier("kdad_checkpoint")


class Checkpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last.ckpt`` written every ``every_n_epochs`` epochs
    whatever ``save_top_k`` is, and every file written atomically.

    Lightning 2.6 writes ``last.ckpt`` only when it also saves a top-k checkpoint at that
    step, so with kdad's defaults (``save_top_k: 0``: no "best" file unless a model asks for
    one) a killed run had nothing to resume from. Each checkpoint goes to a temporary file
    beside its target and is moved onto it once complete, so a kill during a write leaves the
    previous one intact.
    """

    def _save_last_due(self, trainer: L.Trainer) -> None:
        due = self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
        if due and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(
            trainer
        ) and self._should_save_on_train_epoch_end(trainer):
            self._save_last_due(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(
            trainer
        ) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_due(trainer)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_checkpoint_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def scheduler_signal() -> signal.Signals | None:
    """The signal with which a job scheduler ends this job to requeue it, or None: submitit's
    (``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default) when the job runs under submitit (Hydra's
    submitit launchers: ``launcher=slurm``, ``local_gpus``, ``local_cpu``). Slurm sends it
    ``hydra.launcher.signal_delay_s`` before the time limit and on pre-emption."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    found = getattr(signal, name, None)
    return found if isinstance(found, signal.Signals) else None


class SaveOnInterrupt(L.Callback):
    """On SIGTERM (Lightning stops its loops with ``SIGTERMException``), write a resumable
    ``last.ckpt`` (weights, optimiser and loop state; atomically) before the run stops.

    Under a job scheduler that ends a job with its own signal to requeue it (submitit:
    :func:`scheduler_signal`), that signal is deferred while fitting: Lightning stops at the
    end of the current step as on SIGTERM, the checkpoint is written, and only then does the
    scheduler's handler run (:meth:`hand_over`: submitit requeues the job, when
    ``hydra.launcher.max_num_timeout`` allows it, and exits). The requeued job runs the same
    command in the same folder and resumes it (``resume=auto``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved = False
        self.deferred: tuple[Any, int, Any] | None = None  # the scheduler's handler and call
        self._replaced: tuple[signal.Signals, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's SIGTERM handler is in place by now (it is registered after on_fit_start).
        number = scheduler_signal()
        if number is None or self._replaced is not None:
            return
        original = signal.getsignal(number)
        if not callable(original):
            return

        def defer(signum: int, frame: Any) -> None:
            self.deferred = (original, signum, frame)
            log.warning(
                "received the job scheduler's %s: stopping after this step to save a resumable "
                "checkpoint before the job is requeued",
                signal.Signals(signum).name,
            )
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops its loops at a step's end

        signal.signal(number, defer)
        self._replaced = (number, original)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        """The scheduler's own handler again: outside the training loop it acts at once."""
        if self._replaced is not None:
            signal.signal(*self._replaced)
            self._replaced = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint_atomically(trainer, self.path, weights_only=False)
            self.saved = True

    def hand_over(self) -> None:
        """Run the scheduler's deferred handler (it requeues the job and exits); nothing
        without one."""
        if self.deferred is not None:
            handler, signum, frame = self.deferred
            self.deferred = None
            handler(signum, frame)


class ThresholdFitter(L.Callback):
    """Fits the decision thresholds when fitting ends, on the validation split (never the test
    set), and keeps them on the module, so every checkpoint saved afterwards carries them
    (:mod:`kdad.metrics.thresholds`). Without validation images the module gets none."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit(trainer, pl_module)

    def fit(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: str = "final") -> None:
        datamodule = trainer.datamodule
        if datamodule is None or getattr(datamodule, "val_dataset", None) is None:
            pl_module.thresholds = None
            log.warning(
                "no validation split (data.val_fraction=0): no thresholds were fit, so the checkpoint "
                "holds none and kdad-predict reports raw scores only (no normalised score or label) "
                "unless given image_threshold=/pixel_threshold=; train with data.val_fraction>0 to fit them"
            )
            return
        device = trainer.strategy.root_device
        pl_module.to(device)
        pl_module.thresholds = thresholds.fit_thresholds(
            pl_module.net, datamodule.val_dataloader(), self.settings, device
        )
        log.info("thresholds (%s weights): %s", weights, thresholds.describe(pl_module.thresholds))


class HeatmapWriter(L.Callback):
    """Saves ``num_images`` test samples as PNG panels (input | ground truth | heatmap | colour
    bar).

    Half are anomalous, taken in turn from each defect type, half normal; all panels share one
    colour scale (min and max over the chosen maps, written at the ends of the colour bar), so
    a normal image looks calm next to a defect instead of being stretched to full red. Files
    go to ``dirpath`` and, with a W&B logger, to the run as ``test/heatmaps``.
    """

    def __init__(self, dirpath: str, num_images: int = 16) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._candidates: dict[str, list[dict[str, Any]]] = {}

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        preprocess = getattr(trainer.datamodule, "preprocess", None)
        if self.num_images <= 0 or preprocess is None:
            return
        for i, defect in enumerate(batch["defect_type"]):
            group = "good" if int(batch["label"][i]) == 0 else str(defect)
            kept = self._candidates.setdefault(group, [])
            if len(kept) >= self.num_images:
                continue  # enough of this kind to choose from
            kept.append(
                {
                    "image": preprocess.denormalize(batch["image"][i].cpu()),
                    "mask": batch["mask"][i, 0].cpu().numpy(),
                    "map": outputs["anomaly_maps"][i, 0].float().cpu().numpy(),
                    "score": float(outputs["pred_scores"][i]),
                    "path": str(batch["path"][i]),
                    "defect": group,
                }
            )

    def _choose(self) -> list[dict[str, Any]]:
        normals = self._candidates.get("good", [])
        defects = [self._candidates[k] for k in sorted(self._candidates) if k != "good"]
        want_defects = self.num_images - min(len(normals), self.num_images // 2)
        chosen: list[dict[str, Any]] = []
        for rank in range(self.num_images):  # round-robin over defect types
            for group in defects:
                if rank < len(group) and len(chosen) < want_defects:
                    chosen.append(group[rank])
        return chosen + normals[: self.num_images - len(chosen)]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Under DDP every process saw a share of the test set: pool their candidates so the
        # panels are the ones a single process would choose (test order = path order).
        pooled: dict[str, list[dict[str, Any]]] = {}
        for part in _gather_objects(trainer, [getattr(self, "_candidates", {})]):
            for group, items in part.items():
                pooled.setdefault(group, []).extend(items)
        if not trainer.is_global_zero or not pooled:
            return
        self._candidates = {
            g: sorted(items, key=lambda k: k["path"])[: self.num_images]
            for g, items in pooled.items()
        }
        chosen = self._choose()
        vmin = min(float(k["map"].min()) for k in chosen)
        vmax = max(float(k["map"].max()) for k in chosen)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        files, captions = [], []
        for index, kept in enumerate(chosen):
            panel = heatmap_panel(kept["image"], kept["mask"], kept["map"], vmin, vmax)
            name = f"{index:03d}_{kept['defect']}_{Path(kept['path']).stem}.png"
            target = write_png_atomic(self.dirpath / name, panel)
            files.append(str(target))
            captions.append(f"{kept['defect']} {Path(kept['path']).name} score={kept['score']:.4g}")
        # The chosen samples' arrays, so that kdad-aggregate can put several models side by side.
        arrays = {
            "image": np.stack([k["image"] for k in chosen]),
            "mask": np.stack([k["mask"] > 0.5 for k in chosen]),
            "map": np.stack([k["map"] for k in chosen]).astype(np.float32),
            "score": np.array([k["score"] for k in chosen], dtype=np.float64),
            "path": np.array([k["path"] for k in chosen]),
        }
        write_npz_atomic(self.dirpath / SAMPLES, arrays)
        for logger in _wandb_loggers(trainer):
            logger.log_image(key="test/heatmaps", images=files, caption=captions)


class ScoreWriter(L.Callback):
    """Writes every test image's raw score to ``scores.csv``; with a W&B logger, the same rows
    as the table ``test/scores`` with the normalised score and predicted label (from the
    module's thresholds, where it has them) and a thumbnail for up to ``max_thumbnails``
    images, spread evenly over the path-ordered test set (every defect type is in it)."""

    def __init__(self, path: str, max_thumbnails: int = 64, thumbnail_size: int = 96) -> None:
        self.path = Path(path)
        self.max_thumbnails = int(max_thumbnails)
        self.thumbnail_size = int(thumbnail_size)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows: list[list[Any]] = []
        self._thumbs: dict[str, np.ndarray] = {}
        # Every step-th image of the path-ordered test split gets a thumbnail.
        dataset = getattr(trainer.datamodule, "test_dataset", None)
        count = len(dataset) if dataset is not None else 0
        self._thumbnail_step = max(1, -(-count // max(self.max_thumbnails, 1)))

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        scores = outputs["pred_scores"].float().cpu().tolist()
        for path, defect, label, score in zip(
            batch["path"], batch["defect_type"], batch["label"].tolist(), scores, strict=True
        ):
            self._rows.append([str(path), str(defect), int(label), float(score)])
        preprocess = getattr(trainer.datamodule, "preprocess", None)
        if _wandb_loggers(trainer) and self.max_thumbnails > 0 and preprocess is not None:
            for i, path in enumerate(batch["path"]):
                # The test split is in path order and "index" is the position in it: keep only
                # every step-th image's thumbnail, the ones the table shows.
                if int(batch["index"][i]) % self._thumbnail_step != 0:
                    continue
                image = Image.fromarray(preprocess.denormalize(batch["image"][i].cpu()))
                image.thumbnail((self.thumbnail_size, self.thumbnail_size))
                self._thumbs[str(path)] = np.asarray(image)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = sorted(_gather_objects(trainer, self._rows))  # every process's share, in path order
        loggers = _wandb_loggers(trainer)
        thumbs: dict[str, np.ndarray] = {}
        if loggers:
            for part in _gather_objects(trainer, [self._thumbs]):
                thumbs.update(part)
        if not trainer.is_global_zero:
            return
        header = ["path", "defect_type", "label", "score"]
        write_csv_atomic(self.path, header, rows)
        if loggers:
            self._log_table(loggers, rows, thumbs, getattr(pl_module, "thresholds", None))

    def _log_table(
        self,
        loggers: list[WandbLogger],
        rows: list[list[Any]],
        thumbs: dict[str, np.ndarray],
        fitted: dict[str, Any] | None,
    ) -> None:
        import wandb

        image_level = (fitted or {}).get("image")
        data = []
        for path, defect, label, score in rows:
            normalized = thresholds.normalize(score, image_level) if image_level else None
            predicted = int(score > image_level["threshold"]) if image_level else None
            thumb = thumbs.get(path)
            data.append(
                [
                    path,
                    defect,
                    label,
                    score,
                    normalized,
                    predicted,
                    wandb.Image(thumb) if thumb is not None else None,
                ]
            )
        columns = [
            "path",
            "defect_type",
            "label",
            "score",
            "normalized_score",
            "predicted_label",
            "thumbnail",
        ]
        for logger in loggers:
            logger.log_table(key="test/scores", columns=columns, data=data)


class CurveWriter(L.Callback):
    """Saves the image/pixel ROC curves and the PRO curve of a test run.

    Writes ``curves.json`` (each curve downsampled to at most 2000 points, from the exact
    curves of the test metrics, gathered over all processes) and the figure ``curves.png``
    (and ``curves.pdf``; ``formats`` picks among png, pdf, svg) with each curve's exact area
    (AUROC, AUPRO) in its legend; with a W&B logger each curve is a line plot backed by a
    table (``test/curves/image_roc``, ``test/curves/pixel_roc``, ``test/curves/pixel_pro``),
    so runs can be overlaid in a dashboard, and the PNG is logged as ``test/curves_png``.
    """

    def __init__(
        self, dirpath: str, points: int = 2000, formats: Sequence[str] | None = None
    ) -> None:
        self.dirpath = Path(dirpath)
        self.points = int(points)
        self.formats = check_formats(FIGURE_FORMATS if formats is None else list(formats))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from kdad.metrics.anomaly import downsample_curve

        metrics = getattr(pl_module, "test_metrics", {})
        curves: dict[str, dict[str, list[float]]] = {}
        areas: dict[str, float] = {}
        fpr_limit = None
        for name, axes in (
            ("image_auroc", ("fpr", "tpr")),
            ("pixel_auroc", ("fpr", "tpr")),
            ("pixel_aupro", ("fpr", "pro")),
        ):
            metric = metrics[name] if name in metrics else None  # noqa: SIM401 - ModuleDict has no .get
            curve = metric.curve() if metric is not None and hasattr(metric, "curve") else None
            if curve is not None:
                x, y = downsample_curve(*curve, points=self.points)
                curves[name.replace("_auroc", "_roc").replace("pixel_aupro", "pixel_pro")] = {
                    axes[0]: x,
                    axes[1]: y,
                }
                # The exact area for the legend (every process takes part, as in curve());
                # torchmetrics caches it, so the module's own compute() costs nothing more.
                areas[name] = float(metric.compute())
                fpr_limit = getattr(metric, "fpr_limit", fpr_limit)
        if not curves or not trainer.is_global_zero:
            return
        folder = RunFolder(self.dirpath)
        write_text_atomic(folder.curves, json.dumps(curves) + "\n")
        model_name = str(getattr(pl_module.hparams, "model_name", ""))
        png = plot_curves(
            {model_name: curves},
            folder.curves_figure,
            title=model_name,
            areas={model_name: areas},
            fpr_limit=fpr_limit,
            formats=self.formats,
        )[0]
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        for logger in loggers:
            plots: dict[str, Any] = {}
            for name, axes in curves.items():
                x_name, y_name = list(axes)
                table = wandb.Table(
                    columns=[x_name, y_name],
                    data=[list(p) for p in zip(*axes.values(), strict=True)],
                )
                plots[f"test/curves/{name}"] = wandb.plot.line(
                    table, x_name, y_name, title=f"{name.replace('_', ' ')}"
                )
            logger.experiment.log(plots)
            if png.suffix == ".png":  # W&B shows raster images only
                logger.log_image(key="test/curves_png", images=[str(png)])
