"""Projectors: map one student level onto the shape of a (deeper) teacher level.

HKT (Xu & Jiang, J. Imaging 2025, 11(4):102) transfers the teacher's highest layer to every
student level and states, in its abstract, that "multiple projectors are built inside the model
to facilitate the teacher in transferring knowledge to each layer of the student". The public
text gives no layer-by-layer design, so kdad chooses the simplest one that can reach any deeper
level of a CNN pyramid (documented in :class:`Projector`).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from kdad.errors import KDADError
from kdad.models.components.resnet_blocks import conv3x3, kaiming_init


class Projector(nn.Sequential):
    """Student level ``(in_channels, H, W)`` -> ``(out_channels, H / downsample, W / downsample)``.

    Structure (kdad's choice; the paper is silent): ``log2(downsample)`` steps of
    ``conv3x3(stride 2) - BatchNorm - ReLU``, each doubling the width (capped at
    ``out_channels``) as a ResNet stage does, then a ``1x1`` convolution with bias to exactly
    ``out_channels``. The final layer is linear so it can match the teacher's features whatever
    their sign (EfficientNet stage outputs end in a linear conv + BN: about half of their values
    are negative). A level already at the target resolution gets the ``1x1`` convolution only.
    For ResNets the widths follow the backbone's own pyramid (resnet18 layer1: 64 -> 128 -> 256
    -> 1x1 256); for tf_efficientnet_lite0 (24/40/112 channels at strides 4/8/16) layer1 gives
    24 -> 48 -> 96 -> 1x1 112, layer2 40 -> 80 -> 1x1 112, layer3 a 1x1 112 -> 112.

    Args:
        in_channels: channels of the student level.
        out_channels: channels of the target (the teacher's highest layer).
        downsample: resolution ratio student / target, a power of two (1, 2, 4, ...).
        keep_resolution: the same steps with stride 1: the output keeps the level's resolution
            (HKT's ``cross_scale=level``, where the target is resized to the level instead).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        downsample: int = 1,
        keep_resolution: bool = False,
    ) -> None:
        steps = math.log2(downsample) if downsample >= 1 else -1.0
        if steps < 0 or steps != int(steps):
            raise KDADError(
                f"projector: a student level {downsample}x the resolution of the teacher's top layer; "
                "expected a power of two >= 1 (the top layer must be the coarsest of model.layers)"
            )
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(int(steps)):
            next_width = min(2 * width, out_channels)
            layers += [
                conv3x3(width, next_width, stride=1 if keep_resolution else 2),
                nn.BatchNorm2d(next_width),
                nn.ReLU(inplace=True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, out_channels, kernel_size=1, bias=True))
        super().__init__(*layers)
        self.in_channels, self.out_channels, self.downsample = in_channels, out_channels, downsample
        kaiming_init(self)

    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features)


__all__ = ["Projector"]
