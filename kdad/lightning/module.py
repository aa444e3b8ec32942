"""The one LightningModule that trains and tests every variant.

It knows nothing about a variant beyond the interface of :class:`kdad.models.base.DistillationModel`:
the training step minimises ``net.loss(net(images))``, validation reports the same loss on
held-out normal training images, and the test step turns ``net.predict`` into metrics.

Everything needed to rebuild the module lives in its hyper-parameters as plain data (the
model's Hydra config, the optimiser and scheduler partials, the preprocessing), so a checkpoint
is self-describing: :func:`kdad.lightning.loading.load_module` rebuilds it without the user's config.
Besides the weights, a checkpoint's ``kdad`` entry holds the decision thresholds fit after
training (:mod:`kdad.metrics.thresholds`) and the random-number state at the end of the last finished
epoch, so that a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from torch import Tensor, nn

from kdad.errors import KDADError
from kdad.io.checkpoint import sign
from kdad.lightning.teacher_cache import TeacherFeatureCache
from kdad.metrics import METRIC_LEVEL, build_metrics
from kdad.models.base import DistillationModel

log = logging.getLogger("kdad")

# The frozen teacher is in eval mode on purpose (its BatchNorm statistics are the target).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# on_before_batch_transfer reads the sample indices before they go to the device; Lightning's
# note that the module's hook is used rather than the datamodule's is expected.
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer`.*")
# Third-party noise kdad cannot fix, silenced by exact message: Lightning's own use of a torch
# API torch deprecated (lightning/pytorch/utilities/_pytree.py), and its advertisements.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


class _NoAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisements())


def _nested_targets(value: Any, path: str) -> list[str]:
    if isinstance(value, Mapping):
        found = [path] if "_target_" in value and path else []
        for key, item in value.items():
            found += _nested_targets(item, f"{path}.{key}" if path else str(key))
        return found
    if isinstance(value, list | tuple):
        return [p for i, item in enumerate(value) for p in _nested_targets(item, f"{path}.{i}")]
    return []


def check_model_target(model: Mapping[str, Any]) -> type[DistillationModel]:
    """The variant class ``model["_target_"]`` names, checked *before* anything is called.

    A config (or a checkpoint's hyper-parameters) could otherwise make ``instantiate`` call
    any importable function: only a :class:`DistillationModel` subclass is accepted, and no
    nested ``_target_`` (arguments are plain data).
    """
    target = model.get("_target_") if isinstance(model, Mapping) else None
    if not isinstance(target, str) or not target:
        raise KDADError(
            "model._target_ is missing: the model config must name a kdad variant class"
        )
    try:
        cls = get_class(target)
    except Exception:
        raise KDADError(f"model._target_={target}: not an importable class") from None
    if not (isinstance(cls, type) and issubclass(cls, DistillationModel)):
        raise KDADError(f"model._target_={target} is not a kdad DistillationModel")
    nested = _nested_targets({k: v for k, v in model.items() if k != "_target_"}, "")
    if nested:
        raise KDADError(f"model.{nested[0]}: nested _target_ is not allowed in a model config")
    return cls


def _cache_mode(value: bool | str) -> str:
    """``teacher_cache``: true/"on", false/"off" or "auto" (on when within the memory budget)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).lower()
    if text in ("auto", "on", "off", "true", "false"):
        return {"true": "on", "false": "off"}.get(text, text)
    raise KDADError(f"teacher_cache={value!r}: expected auto, true or false")


def build_net(model: Mapping[str, Any]) -> DistillationModel:
    """Instantiate a variant from its Hydra config (a mapping with ``_target_``)."""
    check_model_target(model)
    try:
        net = instantiate(dict(model), _convert_="all")
    except KDADError:
        raise
    except Exception as exc:  # Hydra wraps the constructor's error; unwrap user errors.
        cause = exc.__cause__ or exc
        if isinstance(cause, KDADError):
            raise cause from None
        raise
    if not isinstance(net, DistillationModel):
        raise KDADError(f"model._target_={model.get('_target_')} is not a kdad DistillationModel")
    return net


class DistillationModule(L.LightningModule):
    """Train and test any :class:`DistillationModel`.

    Args:
        model: the variant's Hydra config (``_target_`` and constructor arguments).
        optimizer: a Hydra partial for ``torch.optim`` (``_partial_: true``), applied to the
            trainable parameters only (the student side; the teacher is frozen); None for a
            variant without trainable parameters.
        scheduler: an optional Hydra partial for ``torch.optim.lr_scheduler``, stepped per epoch.
        model_name: the variant's name (``rd4ad``, ``stfpm``, ...), recorded in results.
        preprocess: image size, crop and normalisation the model was trained with, for reuse
            by evaluation and prediction.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any] | None,
        scheduler: Mapping[str, Any] | None = None,
        model_name: str = "model",
        preprocess: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        teacher_cache: bool | str = False,
        teacher_cache_max_gb: float = 4.0,
    ) -> None:
        super().__init__()
        # The config reaches the loggers once, flattened (kdad.engine.run), not as a nested copy.
        self.save_hyperparameters(logger=False)
        self.net = build_net(model)
        # Speed switches (experiments/benchmark): neither changes what is computed.
        self.channels_last = bool(channels_last)
        # A bound method, not a module: a second module attribute would duplicate the state dict.
        self._train_forward = torch.compile(self.net.forward) if compile else self.net.forward
        # The frozen teacher's features of each training image, computed in the first epoch
        # and reused (kdad.lightning.teacher_cache); built in on_train_start once the data size is known.
        self.teacher_cache_mode = _cache_mode(teacher_cache)
        self.teacher_cache_max_gb = float(teacher_cache_max_gb)
        self._teacher_cache: TeacherFeatureCache | None = None
        self._host_index: Tensor | None = None
        # Buffers every rank builds identically (NFERD's feature bank) need no DDP broadcast,
        # which would re-send them every step.
        self._ddp_params_and_buffers_to_ignore = [
            f"net.{name}" for name, _ in self.net.named_buffers() if name.endswith(".features")
        ]
        self.test_metrics = nn.ModuleDict(build_metrics())
        self.train_stats: dict[str, float] = {}
        self.test_results: dict[str, float] = {}
        # Fit on validation data after training (kdad.metrics.thresholds); None until then.
        self.thresholds: dict[str, Any] | None = None
        self._epoch_end_rng: dict[str, Any] | None = None

    # --- training -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        loader = self.trainer.datamodule.train_dataloader() if self.trainer.datamodule else None
        if loader is not None and not self.trainer.ckpt_path:
            self.net.before_fit(loader)

    def _images(self, batch: Mapping[str, Tensor]) -> Tensor:
        images = batch["image"]
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    @property
    def trains(self) -> bool:
        """Whether the variant has trainable parameters (``model=knn`` has none: its "fit" is
        the memory bank that :meth:`on_fit_start` builds)."""
        return any(p.requires_grad for p in self.net.parameters())

    def on_train_start(self) -> None:
        self._teacher_cache = None
        if self.teacher_cache_mode == "off" or not self.trains:
            return
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        try:
            capacity = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            log.info("teacher cache off: the training data has no length")
            return
        budget = self.teacher_cache_max_gb if self.teacher_cache_mode == "auto" else float("inf")
        self._teacher_cache = TeacherFeatureCache(capacity, budget * 2**30)

    def on_train_end(self) -> None:
        self._teacher_cache = None  # frees its memory before testing

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The sample indices while still in host memory: the teacher cache checks them there.
        index = batch.get("index") if isinstance(batch, Mapping) else None
        self._host_index = index if isinstance(index, Tensor) else None
        return batch

    def _teacher_targets(self, batch: Mapping[str, Tensor], images: Tensor) -> list[Tensor] | None:
        cache = self._teacher_cache
        index = batch.get("index")
        if cache is None or not cache.enabled or not isinstance(index, Tensor):
            return None
        targets = cache.lookup(index, self._host_index)
        if targets is None:
            targets = self.net.teacher_features(images)
            cache.store(index, targets, self._host_index)
        return targets

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        if not self.trains:
            return None  # nothing to optimise: Lightning skips the step
        images = self._images(batch)
        targets = self._teacher_targets(batch, images)
        loss = self.net.loss(self._train_forward(images, targets))
        # Not on the progress bar: showing the step loss would force a device sync every step.
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def on_train_epoch_end(self) -> None:
        # The state the next epoch starts from (its shuffling draws from it). Checkpoints
        # store this one, not the state at saving time, which later work may have advanced.
        self._epoch_end_rng = capture_rng_state()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        images = self._images(batch)
        loss = self.net.loss(self.net(images))
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True
        )
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params or not self.hparams.optimizer:
            return None  # a training-free variant (model=knn)
        optimizer = instantiate(dict(self.hparams.optimizer), _convert_="all")(params)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(dict(self.hparams.scheduler), _convert_="all")(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # --- testing --------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        for metric in self.test_metrics.values():
            metric.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        maps, scores = self.net.predict(self._images(batch))
        labels, masks = batch["label"], batch["mask"]
        # The metrics keep their states in host memory (build_metrics' states_on_cpu): one host
        # copy of the batch, shared by every pixel metric, rather than a copy per metric.
        pixel_maps = maps[:, 0].detach().float().cpu()
        pixel_masks = (masks[:, 0] > 0.5).cpu()
        for name, metric in self.test_metrics.items():
            if METRIC_LEVEL[name] == "image":
                metric.update(scores, labels)
            else:
                metric.update(pixel_maps, pixel_masks)
        return {"anomaly_maps": maps, "pred_scores": scores}

    def on_test_epoch_end(self) -> None:
        for name, metric in self.test_metrics.items():
            # torchmetrics gathers the states of all processes before computing; the exact
            # float64 value goes to metrics.json, the logged copy is float32. The states live
            # in host memory (build_metrics' states_on_cpu), so the value is computed there.
            value = metric.compute()
            self.test_results[name] = float(value)
            self.log(f"test/{name}", value.float().to(self.device), sync_dist=False)

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kdad"] = {
            "format": 1,
            "model_name": self.hparams.model_name,
            "train_stats": dict(self.train_stats),
            "thresholds": self.thresholds,
            "rng": self._epoch_end_rng,
        }
        # One digest over weights, hyper-parameters and thresholds: a loader detects any of
        # them corrupted or changed after saving (kdad.io.checkpoint).
        if "state_dict" in checkpoint:
            sign(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("kdad", {})
        self.train_stats = dict(meta.get("train_stats", {}))
        self.thresholds = meta.get("thresholds")
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and meta.get("rng"):
            # Resuming: continue the random streams where the checkpointed epoch ended.
            self._epoch_end_rng = meta["rng"]
            restore_rng_state(meta["rng"])


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python random states as tensors and plain data, so a
    checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    version, python_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"])
    )


__all__ = [
    "DistillationModule",
    "build_net",
    "capture_rng_state",
    "check_model_target",
    "restore_rng_state",
]
