"""STFPM: Student-Teacher Feature Pyramid Matching for Anomaly Detection.

Wang et al., BMVC 2021; official code gdwang08/STFPM. Teacher and student share the
architecture (ResNet-18 stages 1-3); the teacher is ImageNet-pretrained and frozen, the student
randomly initialised and trained on normal images. Features are L2-normalised along channels
(eq. 1) and the loss at stage l is

    l_l = 1/(2 h_l w_l) * sum_{i,j} || F_t(i,j) - F_s(i,j) ||^2        (eq. 2)

summed over stages (eq. 3). The anomaly map is the product over stages of the upsampled
per-position distances (eq. 4-5); the image score is its maximum. As in the official
``test()``, the stages are multiplied at the first stage's resolution and the product is then
resized to the image (``model.anomaly_map.fuse_at=first_layer``; ``image`` multiplies after
resizing each stage to the image size).

The student is a randomly initialised copy of the teacher's architecture with torchvision's
initialisation (every BatchNorm scale 1, as the official torchvision resnet18 student), not
timm's ``zero_init_last`` (see :mod:`kdad.models.components.backbone`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from kdad.models.anomaly_map import Distance
from kdad.models.base import DistillationModel, FeaturePairs
from kdad.models.components.backbone import Teacher, create_feature_extractor


def pyramid_matching_loss(pairs: FeaturePairs, scale: float = 0.5) -> Tensor:
    """Sum over stages of ``scale * ||t/|t| - s/|s|||^2``, averaged over positions and images.

    ``scale=0.5`` is the paper's eq. 2. The official main.py drops the 1/2 (``scale=1.0``),
    which doubles the effective SGD step; both are a config switch (``model.loss_scale``).
    """
    loss = pairs[0][0].new_zeros(())
    for target, prediction in pairs:
        diff = F.normalize(target, dim=1) - F.normalize(prediction, dim=1)
        loss = loss + scale * diff.pow(2).sum(dim=1).mean()
    return loss


class STFPM(DistillationModel):
    """Frozen teacher and a same-architecture, randomly initialised student.

    Args:
        backbone: timm name (default ``resnet18.tv_in1k``, the torchvision weights of the
            official code).
        layers: stages matched (official: layer1-layer3).
        pretrained, weights_path: teacher weights; the student always starts random.
        loss_scale: factor of the per-stage loss (paper 0.5; official main.py 1.0).
        distance, anomaly_map: see :class:`DistillationModel`.
    """

    def __init__(
        self,
        backbone: str = "resnet18.tv_in1k",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | None = None,
        loss_scale: float = 0.5,
        distance: Distance | str = "normalized_l2",
        anomaly_map: Mapping | None = None,
    ) -> None:
        super().__init__(distance, anomaly_map)
        self.teacher = Teacher(backbone, layers, pretrained, weights_path)
        self.student = create_feature_extractor(backbone, layers, pretrained=False)
        self.loss_scale = float(loss_scale)

    def forward(self, images: Tensor, targets: list[Tensor] | None = None) -> FeaturePairs:
        if targets is None:
            targets = self.teacher_features(images)
        return list(zip(targets, self.student(images), strict=True))

    def loss(self, pairs: FeaturePairs) -> Tensor:
        return pyramid_matching_loss(pairs, self.loss_scale)


__all__ = ["STFPM", "pyramid_matching_loss"]
