"""The small interface every variant implements, so one LightningModule can drive them all.

A variant is a plain ``nn.Module`` holding a frozen ``teacher`` and trainable student parts:

- ``forward(images)`` returns the aligned feature pairs ``[(target, prediction), ...]``: what
  the student must reproduce and what it produced, one pair per alignment;
- ``loss(pairs)`` is the variant's training objective on those pairs;
- ``predict(images)`` returns the anomaly map (N,1,H,W) at the input size and the image
  scores (N,), through the shared :mod:`kdad.models.anomaly_map`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdad.config import choice
from kdad.errors import KDADError
from kdad.models.anomaly_map import DISTANCES, AnomalyMapGenerator, Distance

FeaturePairs = list[tuple[Tensor, Tensor]]


def batch_images(batch: Any) -> Tensor:
    """The image tensor of a batch: kdad's dict batches, (images, ...) tuples or a bare tensor
    (what the models that read a training loader themselves, NFERD's bank and kNN's, get)."""
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


class DistillationModel(nn.Module):
    """Base class: distances per pair, fused by an :class:`AnomalyMapGenerator`.

    Args:
        distance: per-pixel distance of a pair for the map (``cosine``, ``normalized_l2``, ``l2``).
        anomaly_map: keyword arguments of :class:`AnomalyMapGenerator` (fusion, sigma, ...).
    """

    teacher: nn.Module

    def __init__(
        self, distance: Distance | str = "cosine", anomaly_map: Mapping | None = None
    ) -> None:
        super().__init__()
        self.distance = choice(Distance, distance, "model.distance")
        try:
            self.map_generator = AnomalyMapGenerator(**dict(anomaly_map or {}))
        except KDADError:
            raise
        except (TypeError, ValueError) as exc:
            raise KDADError(f"model.anomaly_map: {exc}") from None

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """The frozen teacher's targets, without gradient (deterministic: eval mode, no grad)."""
        return self.teacher(images)

    def forward(self, images: Tensor, targets: list[Tensor] | None = None) -> FeaturePairs:
        """(target, prediction) pairs; ``targets``: this batch's :meth:`teacher_features`, when
        already known (the training loop's teacher-feature cache), else computed here."""
        raise NotImplementedError  # pragma: no cover - abstract

    def loss(self, pairs: FeaturePairs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def distance_maps(self, pairs: FeaturePairs) -> list[Tensor]:
        measure = DISTANCES[self.distance]
        return [measure(target, prediction) for target, prediction in pairs]

    def predict(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Anomaly maps (N,1,H,W) at the input's size and raw image scores (N,)."""
        maps = self.map_generator(self.distance_maps(self(images)), size=tuple(images.shape[-2:]))
        return maps, self.map_generator.image_score(maps)

    def num_parameters(self, trainable: bool | None = None) -> int:
        """Parameter count: all (None), trainable only (True) or frozen only (False)."""
        return sum(
            p.numel()
            for p in self.parameters()
            if trainable is None or p.requires_grad == trainable
        )

    @torch.no_grad()
    def before_fit(self, train_loader) -> None:
        """Called once before training with the training loader (e.g. to build a feature bank)."""
