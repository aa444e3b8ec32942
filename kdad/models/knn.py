"""``model=knn``: a training-free nearest-neighbour reference on the teacher's patch features.

The line every distillation variant must reach: the same frozen teacher (backbone and layers
as the variant it stands beside), no student. In the manner of PatchCore (Roth et al., CVPR
2022), without its score re-weighting:

1. *Patch features.* Each of the teacher's ``layers`` is averaged over a ``patch_size`` x
   ``patch_size`` neighbourhood (stride 1, so every position sees its surroundings), brought
   to one grid of ``stride`` image pixels per cell (area averaging for finer layers, bilinear
   for coarser ones) and the layers are concatenated along channels.
2. *Memory bank.* "Training" is one pass over the training images that collects their patch
   features and keeps at most ``bank_size`` of them: a greedy coreset (``sampling=coreset``:
   each new entry is the patch farthest from those already kept, measured on a seeded random
   projection to ``projection_dim`` dimensions, as PatchCore) or a seeded random subsample
   (``random``).
3. *Map and score.* Each test patch's Euclidean distance to its nearest bank entry is the
   anomaly map, resized to the image and smoothed by the shared map generator (Gaussian
   sigma 4 by default); the image score is the map's maximum.

It implements the variants' interface: :meth:`forward` pairs each patch feature with its
nearest bank entry (so the validation "loss" is the mean nearest-neighbour distance of
held-out normal images), and the bank is a persistent buffer that travels with checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.config import choice
from kdad.errors import KDADError
from kdad.models.base import DistillationModel, FeaturePairs, batch_images
from kdad.models.components.backbone import Teacher

log = logging.getLogger("kdad")


class Sampling(str, Enum):
    """How the memory bank is subsampled (``model.sampling``)."""

    coreset = "coreset"  # greedy k-centre (PatchCore)
    random = "random"  # a seeded subsample


SAMPLINGS = tuple(m.value for m in Sampling)


def greedy_coreset(features: Tensor, size: int, projection_dim: int, seed: int) -> Tensor:
    """Indices of ``size`` rows of ``features`` (N, C) chosen by greedy k-centre selection.

    Distances are measured after a seeded Gaussian random projection to ``projection_dim``
    dimensions (none when the features have fewer); the first centre is a seeded random row.
    """
    generator = torch.Generator().manual_seed(int(seed))
    points = features.float()
    if projection_dim and points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator)
        points = points @ projection.to(points.device) / projection_dim**0.5
    # Squared distances from |x|^2 + |c|^2 - 2 x.c: one matrix-vector product per new centre.
    norms = points.pow(2).sum(dim=1)
    chosen = torch.empty(size, dtype=torch.long)
    index = int(torch.randint(len(points), (1,), generator=generator))
    nearest = torch.full_like(norms, float("inf"))
    for i in range(size):
        chosen[i] = index
        distance = norms + norms[index] - 2 * (points @ points[index])
        nearest = torch.minimum(nearest, distance)
        index = int(torch.argmax(nearest))
    return chosen


class KNN(DistillationModel):
    """Training-free reference: nearest-neighbour distance to a bank of normal patch features.

    Args:
        backbone, layers, pretrained, weights_path: the teacher (see :class:`Teacher`).
        stride: image pixels per cell of the patch grid (8: a 16 x 16 grid at 128 px).
        patch_size: neighbourhood averaged around each position of every layer (1 = none).
        bank_size: the most patch features kept (all of them when there are fewer).
        sampling: ``coreset`` (greedy k-centre) or ``random`` (a seeded subsample).
        projection_dim: dimensions of the random projection the coreset is chosen in.
        seed: seed of the coreset's projection and start, or of the random subsample.
        anomaly_map: see :class:`~kdad.models.anomaly_map.AnomalyMapGenerator`.
    """

    bank: Tensor

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | None = None,
        stride: int = 8,
        patch_size: int = 3,
        bank_size: int = 4096,
        sampling: Sampling | str = "coreset",
        projection_dim: int = 128,
        seed: int = 0,
        anomaly_map: Mapping | None = None,
    ) -> None:
        super().__init__("l2", anomaly_map)
        for key, value, low in (
            ("stride", stride, 1),
            ("patch_size", patch_size, 1),
            ("bank_size", bank_size, 1),
            ("projection_dim", projection_dim, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise KDADError(f"model.{key}={value!r}: expected an integer >= {low}")
        if patch_size % 2 == 0:
            raise KDADError(f"model.patch_size={patch_size}: expected an odd number")
        sampling = choice(Sampling, sampling, "model.sampling")
        self.teacher = Teacher(backbone, layers, pretrained, weights_path)
        for reduction in self.teacher.reductions:
            if max(reduction, stride) % min(reduction, stride):
                raise KDADError(
                    f"model.stride={stride}: the layers' strides {self.teacher.reductions} must "
                    "each divide it or be divisible by it (e.g. 4, 8 or 16)"
                )
        self.stride, self.patch_size = int(stride), int(patch_size)
        self.bank_size, self.sampling = int(bank_size), sampling
        self.projection_dim, self.seed = int(projection_dim), int(seed)
        channels = sum(self.teacher.channels)
        self.register_buffer("bank", torch.zeros(0, channels), persistent=True)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The bank's length is only known once built: take the checkpoint's.
        stored = state_dict.get(prefix + "bank")
        if isinstance(stored, Tensor) and stored.dim() == 2:
            self.bank = torch.empty_like(stored, device=self.bank.device, dtype=self.bank.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # --- patch features ----------------------------------------------------------------------
    def patch_features(self, images: Tensor, targets: list[Tensor] | None = None) -> Tensor:
        """(B, C, h, w): every layer's neighbourhood-averaged features on one grid of
        ``stride`` image pixels per cell, concatenated along channels.

        A finer layer is area-averaged by its (whole) factor to the grid, a coarser one
        upsampled bilinearly by its factor: fixed factors, so the graph exports."""
        layers = self.teacher(images) if targets is None else targets
        pad = self.patch_size // 2
        aligned = []
        for features, reduction in zip(layers, self.teacher.reductions, strict=True):
            features = features.float()
            if self.patch_size > 1:
                features = F.avg_pool2d(
                    features, self.patch_size, stride=1, padding=pad, count_include_pad=False
                )
            if reduction < self.stride:
                features = F.avg_pool2d(features, self.stride // reduction)
            elif reduction > self.stride:
                features = F.interpolate(
                    features,
                    scale_factor=reduction // self.stride,
                    mode="bilinear",
                    align_corners=False,
                )
            aligned.append(features)
        size = min(f.shape[-2] for f in aligned), min(f.shape[-1] for f in aligned)
        return torch.cat([f[..., : size[0], : size[1]] for f in aligned], dim=1)

    @torch.no_grad()
    def before_fit(self, train_loader) -> None:
        """Build the bank: one pass over the training images (the whole "training")."""
        rows = []
        device = self.bank.device
        for batch in train_loader:
            patches = self.patch_features(batch_images(batch).to(device))
            rows.append(patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]).cpu())
        if not rows:
            raise KDADError("model=knn: no training images to build the memory bank from")
        features = torch.cat(rows)
        size = min(self.bank_size, len(features))
        if size == len(features):
            chosen = torch.arange(len(features))
        elif self.sampling == "coreset":
            chosen = greedy_coreset(features, size, self.projection_dim, self.seed)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(len(features), generator=generator)[:size]
        self.bank = features[chosen].to(device=device).contiguous()
        log.info(
            "knn memory bank: %d of %d training patch features (%s)",
            size,
            len(features),
            self.sampling if size < len(features) else "all",
        )

    # --- the variant's interface -------------------------------------------------------------
    def nearest(self, patches: Tensor, chunk: int = 4096) -> Tensor:
        """Each patch's nearest bank entry: (B, C, h, w) -> (B, C, h, w).

        The nearest entry minimises |b|^2 - 2 q.b (|q|^2 is the same for every entry): one
        matrix product per ``chunk`` patches; in an exported graph, one for all of them.
        """
        if self.bank.shape[0] == 0:
            raise KDADError(
                "model=knn: the memory bank is empty: build it with before_fit(train_loader) "
                "(kdad-train does) or load a checkpoint that holds it"
            )
        b, c, h, w = patches.shape
        queries = patches.permute(0, 2, 3, 1).reshape(-1, c)
        bank = self.bank.to(queries.dtype)
        bank_sq = bank.pow(2).sum(dim=1)

        def closest(rows: Tensor) -> Tensor:
            return (bank_sq - 2 * rows @ bank.T).argmin(dim=1)

        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if exporting or queries.shape[0] <= chunk:
            index = closest(queries)
        else:
            index = torch.cat([closest(part) for part in queries.split(chunk)])
        return bank[index].reshape(b, h, w, c).permute(0, 3, 1, 2)

    def forward(self, images: Tensor, targets: list[Tensor] | None = None) -> FeaturePairs:
        """One pair: the patch features and their nearest bank entries."""
        patches = self.patch_features(images, targets)
        return [(patches, self.nearest(patches))]

    def distance_maps(self, pairs: FeaturePairs) -> list[Tensor]:
        """Euclidean distance to the nearest bank entry at every grid cell: (B, 1, h, w)."""
        return [
            (target - nearest).pow(2).sum(dim=1, keepdim=True).sqrt() for target, nearest in pairs
        ]

    def loss(self, pairs: FeaturePairs) -> Tensor:
        """Mean nearest-neighbour distance (nothing is trained; validation reports it)."""
        return torch.stack([m.mean() for m in self.distance_maps(pairs)]).sum()


__all__ = ["KNN", "SAMPLINGS", "Sampling", "greedy_coreset"]
