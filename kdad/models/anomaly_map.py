"""Per-layer distances -> one fused, smoothed anomaly map -> image score.

Shared by every variant. The defaults reproduce the official code:

- RD4AD (``cal_anomaly_map``, amap_mode ``'a'``): per layer ``1 - cos`` along channels,
  bilinear upsampling with ``align_corners=True``, summed over layers, then
  ``scipy.ndimage.gaussian_filter(sigma=4)``; the image score is the map's maximum.
- STFPM (``test`` in main.py): per layer ``||t/|t| - s/|s|||^2`` (= ``2 (1 - cos)``),
  bilinear resizing (``align_corners=False``) to the *first layer's* resolution, multiplied
  there, and the product resized bilinearly to the image size (``cv2.resize``, the same
  half-pixel bilinear rule); no smoothing; score = maximum. ``fuse_at='first_layer'``.

The Gaussian filter here equals scipy's (``truncate=4``, ``mode='reflect'``) to float
precision, but runs in torch on the model's device and exports to ONNX/TorchScript.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.config import choice


class MapFusion(str, Enum):
    """How the per-layer maps are fused (``model.anomaly_map.fusion``)."""

    add = "add"  # RD4AD
    product = "product"  # STFPM
    mean = "mean"


class Score(str, Enum):
    """The image score from the map (``model.anomaly_map.score``)."""

    max = "max"
    mean = "mean"


class FuseAt(str, Enum):
    """Where the layers are fused (``model.anomaly_map.fuse_at``)."""

    image = "image"
    first_layer = "first_layer"


class Distance(str, Enum):
    """Per-pixel distance of a feature pair (``model.distance``; HKT's ``model.loss``)."""

    cosine = "cosine"
    normalized_l2 = "normalized_l2"
    l2 = "l2"


FUSIONS = tuple(m.value for m in MapFusion)
SCORES = tuple(m.value for m in Score)
FUSE_AT = tuple(m.value for m in FuseAt)


def cosine_distance(target: Tensor, prediction: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - cos(target, prediction)`` along channels: (N,C,h,w) x2 -> (N,1,h,w).

    ``F.cosine_similarity``'s value (each norm clamped at ``eps``) from three reductions along
    channels, without its two normalised full-size copies: fewer full-size passes forward and
    backward, in whatever memory layout the maps have (experiments/benchmark/README.md).
    """
    dots = (target * prediction).sum(dim=1, keepdim=True)
    norms = target.norm(dim=1, keepdim=True).clamp_min(eps)
    return 1.0 - dots / (norms * prediction.norm(dim=1, keepdim=True).clamp_min(eps))


def normalized_l2_distance(target: Tensor, prediction: Tensor, eps: float = 1e-12) -> Tensor:
    """STFPM's ``||t/|t| - s/|s|||^2`` along channels (equals ``2 (1 - cos)``): (N,1,h,w)."""
    diff = F.normalize(target, dim=1, eps=eps) - F.normalize(prediction, dim=1, eps=eps)
    return diff.pow(2).sum(dim=1, keepdim=True)


def l2_distance(target: Tensor, prediction: Tensor) -> Tensor:
    """Squared Euclidean distance along channels (no normalisation): (N,1,h,w)."""
    return (target - prediction).pow(2).sum(dim=1, keepdim=True)


DISTANCES = {
    Distance.cosine.value: cosine_distance,
    Distance.normalized_l2.value: normalized_l2_distance,
    Distance.l2.value: l2_distance,
}


def _reflect_index(length: int, radius: int, device: torch.device) -> Tensor:
    """Indices extending ``range(length)`` by ``radius`` on both sides, scipy 'reflect' style.

    scipy's 'reflect' repeats the edge sample (d c b a | a b c d | d c b a); a period of
    ``2 * length`` makes it valid for any radius, also when the map is smaller than the kernel.
    """
    positions = torch.arange(-radius, length + radius, device=device)
    period = positions.remainder(2 * length)
    return torch.where(period < length, period, 2 * length - 1 - period)


class GaussianBlur2d(nn.Module):
    """Separable Gaussian smoothing equal to ``scipy.ndimage.gaussian_filter`` (reflect mode)."""

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.radius = int(truncate * self.sigma + 0.5)
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = (
            torch.exp(-0.5 * (x / self.sigma) ** 2)
            if self.sigma > 0
            else torch.ones(1, dtype=torch.float64)
        )
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def forward(self, maps: Tensor) -> Tensor:
        if self.sigma <= 0:
            return maps
        n, c, h, w = maps.shape
        x = maps.reshape(n * c, 1, h, w)
        k = self.kernel.to(x.dtype)
        x = x.index_select(3, _reflect_index(w, self.radius, x.device))
        x = F.conv2d(x, k.view(1, 1, 1, -1))
        x = x.index_select(2, _reflect_index(h, self.radius, x.device))
        x = F.conv2d(x, k.view(1, 1, -1, 1))
        return x.reshape(n, c, h, w)


class AnomalyMapGenerator(nn.Module):
    """Fuse per-layer distance maps into one anomaly map at the image's size.

    Args:
        fusion: ``add`` (RD4AD), ``product`` (STFPM) or ``mean`` over layers.
        sigma: Gaussian smoothing of the fused map; 0 turns it off.
        align_corners: of the bilinear upsampling (RD4AD: True, STFPM: False).
        score: image score from the map: ``max`` (both official codes) or ``mean``.
        fuse_at: where the layers are fused: ``image`` (each layer resized to the image size,
            then fused: RD4AD's ``cal_anomaly_map``) or ``first_layer`` (each layer resized
            to the first layer's resolution, fused there, the result resized to the image
            size: STFPM's ``test``). Equal for ``add``/``mean`` up to interpolation error,
            different for ``product``.
    """

    def __init__(
        self,
        fusion: MapFusion | str = "add",
        sigma: float = 4.0,
        align_corners: bool = True,
        score: Score | str = "max",
        fuse_at: FuseAt | str = "image",
    ) -> None:
        super().__init__()
        # A wrong choice is a ChoiceError: a user error, and a ValueError as before.
        self.fusion = choice(MapFusion, fusion, "model.anomaly_map.fusion")
        self.score = choice(Score, score, "model.anomaly_map.score")
        self.fuse_at = choice(FuseAt, fuse_at, "model.anomaly_map.fuse_at")
        self.align_corners = bool(align_corners)
        self.blur = GaussianBlur2d(sigma)

    def _resize(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, distance_maps: list[Tensor], size: tuple[int, int]) -> Tensor:
        """(N,1,h_i,w_i) per layer -> (N,1,H,W)."""
        first = (distance_maps[0].shape[-2], distance_maps[0].shape[-1])
        fuse_size = first if self.fuse_at == "first_layer" else size
        resized = [self._resize(d, fuse_size) for d in distance_maps]
        fused = resized[0]
        for d in resized[1:]:
            fused = fused * d if self.fusion == "product" else fused + d
        if self.fusion == "mean":
            fused = fused / len(resized)
        if self.fuse_at == "first_layer":
            fused = self._resize(fused, size)
        return self.blur(fused)

    def image_score(self, anomaly_map: Tensor) -> Tensor:
        """(N,1,H,W) -> (N,): the raw score, never squashed."""
        flat = anomaly_map.flatten(1)
        return flat.amax(dim=1) if self.score == "max" else flat.mean(dim=1)


def gaussian_kernel_size(sigma: float, truncate: float = 4.0) -> int:
    """Width of the kernel scipy uses for ``sigma`` (for documentation and tests)."""
    return 2 * int(truncate * sigma + 0.5) + 1 if sigma > 0 else 1


__all__ = [
    "DISTANCES",
    "FUSE_AT",
    "FUSIONS",
    "SCORES",
    "AnomalyMapGenerator",
    "Distance",
    "FuseAt",
    "GaussianBlur2d",
    "MapFusion",
    "Score",
    "cosine_distance",
    "gaussian_kernel_size",
    "l2_distance",
    "normalized_l2_distance",
]
