"""The one LightningModule that trains and tests every variant.

It knows nothing about a variant beyond the interface of :class:`kdad.models.base.DistillationModel`:
the training step minimises ``net.loss(net(images))``, validation reports the same loss on
held-out normal training images, and the test step turns ``net.predict`` into metrics.

Everything needed to rebuild the module lives in its hyper-parameters as plain data (the
model's Hydra config, the optimiser and scheduler partials, the preprocessing), so a checkpoint
is self-describing: :func:`kdad.checkpoint.load_module` rebuilds it without the user's config.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from hydra.utils import instantiate
from torch import Tensor, nn

from kdad.errors import KDADError
from kdad.metrics import METRIC_LEVEL, build_metrics
from kdad.models.base import DistillationModel

# The frozen teacher is in eval mode on purpose (its BatchNorm statistics are the target).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def build_net(model: Mapping[str, Any]) -> DistillationModel:
    """Instantiate a variant from its Hydra config (a mapping with ``_target_``)."""
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
            trainable parameters only (the student side; the teacher is frozen).
        scheduler: an optional Hydra partial for ``torch.optim.lr_scheduler``, stepped per epoch.
        model_name: the variant's name (``rd``, ``stfpm``, ...), recorded in results.
        preprocess: image size, crop and normalisation the model was trained with, for reuse
            by evaluation and prediction.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        model_name: str = "model",
        preprocess: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(model)
        self.test_metrics = nn.ModuleDict(build_metrics())
        self.train_stats: dict[str, float] = {}
        self.test_results: dict[str, float] = {}

    # --- training -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        loader = self.trainer.datamodule.train_dataloader() if self.trainer.datamodule else None
        if loader is not None and not self.trainer.ckpt_path:
            self.net.before_fit(loader)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        loss = self.net.loss(self.net(images))
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images)
        )
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        loss = self.net.loss(self.net(images))
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(images), sync_dist=True
        )
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
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
        maps, scores = self.net.predict(batch["image"])
        labels, masks = batch["label"], batch["mask"]
        for name, metric in self.test_metrics.items():
            if METRIC_LEVEL[name] == "image":
                metric.update(scores, labels)
            else:
                metric.update(maps[:, 0], masks[:, 0] > 0.5)
        return {"anomaly_maps": maps, "pred_scores": scores}

    def on_test_epoch_end(self) -> None:
        for name, metric in self.test_metrics.items():
            # torchmetrics gathers the states of all processes before computing; the exact
            # float64 value goes to metrics.json, the logged copy is float32.
            value = metric.compute()
            self.test_results[name] = float(value)
            self.log(f"test/{name}", value.float(), sync_dist=False)

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kdad"] = {
            "format": 1,
            "model_name": self.hparams.model_name,
            "train_stats": dict(self.train_stats),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_stats = dict(checkpoint.get("kdad", {}).get("train_stats", {}))


__all__ = ["DistillationModule", "build_net"]
