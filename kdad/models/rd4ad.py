"""RD4AD: Anomaly Detection via Reverse Distillation from One-Class Embedding.

Deng & Li, CVPR 2022; official code hq-deng/RD4AD. The frozen teacher encoder E yields
features of stages 1-3; the trainable one-class bottleneck embedding (OCBE, sec. 3.2) fuses
them into a compact code; the student decoder D mirrors E and restores the multi-scale
features from that code (reverse distillation, sec. 3.1). Training minimises, per image,
eq. 2 summed over stages (eq. 3):

    L = sum_k  1 - cos( vec(f_E^k), vec(f_D^k) )

and at test time the map is sum_k (1 - cos) along channels, upsampled and smoothed (sec. 3.3).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from enum import Enum

import torch.nn.functional as F
from torch import Tensor

from kdad.config import choice
from kdad.errors import KDADError
from kdad.models.anomaly_map import Distance
from kdad.models.base import DistillationModel, FeaturePairs
from kdad.models.components.backbone import Teacher, resnet_spec
from kdad.models.components.bottleneck import OneClassBottleneck
from kdad.models.components.decoder import ReverseDecoder


class DecoderOutput(str, Enum):
    """The decoder's last activation (``model.decoder_output``)."""

    relu = "relu"  # the official decoder
    linear = "linear"  # no final ReLU (signed teacher stages, e.g. EfficientNet)


DECODER_OUTPUTS = tuple(m.value for m in DecoderOutput)


def reverse_distillation_loss(pairs: FeaturePairs) -> Tensor:
    """Official ``loss_fucntion``: sum over stages of the batch mean of 1 - cos of flattened maps."""
    loss = pairs[0][0].new_zeros(())
    for target, prediction in pairs:
        cos = F.cosine_similarity(target.flatten(1), prediction.flatten(1), dim=1)
        loss = loss + (1.0 - cos).mean()
    return loss


class RD4AD(DistillationModel):
    """Teacher encoder -> OCBE -> student decoder, compared stage by stage.

    Args:
        backbone: timm name of the teacher (default the torchvision weights the official code
            loads: ``wide_resnet50_2.tv_in1k``).
        layers: teacher stages (exactly three).
        pretrained, weights_path: teacher weights (see :class:`Teacher`).
        bottleneck_blocks: OCE blocks; ``None`` = official (2 for resnet18, else 3).
        decoder_layers: blocks per decoder stage; ``None`` = the teacher's (3/4/6 for wrn50).
        official_unused_layer: keep the official OCBE's unused ``conv4``/``bn4`` (see
            :class:`OneClassBottleneck`) so parameter counts match the official code.
        decoder_output: ``relu`` (the official decoder: every stage ends in a ReLU, as ResNet
            stages do) or ``linear`` (no final ReLU, so the student can produce the negative
            values of teachers with signed stage outputs, e.g. EfficientNet).
        distance, anomaly_map: see :class:`DistillationModel`.

    Non-ResNet teachers (e.g. ``tf_efficientnet_lite0``: 24/40/112 channels at strides 4/8/16)
    get the same OCBE (stride-2 3x3 convs from stages 1 and 2 to stage 3's size and width,
    concatenation, 2 OCE basic blocks to ``2 c3`` channels at stride 32) and a basic-block
    decoder with 2 blocks per stage whose outputs have the teacher's stage widths. Lite0's
    stage outputs are signed, so a ReLU-terminated decoder cannot reproduce them exactly;
    the default stays the official ``relu`` (``decoder_output=linear`` is the switch).
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | None = None,
        bottleneck_blocks: int | None = None,
        decoder_layers: Sequence[int] | None = None,
        official_unused_layer: bool = True,
        decoder_output: DecoderOutput | str = "relu",
        distance: Distance | str = "cosine",
        anomaly_map: Mapping | None = None,
    ) -> None:
        super().__init__(distance, anomaly_map)
        decoder_output = choice(DecoderOutput, decoder_output, "model.decoder_output")
        if len(layers) != 3:
            raise KDADError(
                f"model.layers={list(layers)}: RD4AD's bottleneck fuses exactly 3 teacher stages"
            )
        self.teacher = Teacher(backbone, layers, pretrained, weights_path)
        channels = tuple(self.teacher.channels)
        reductions = self.teacher.reductions
        if any(b != 2 * a for a, b in itertools.pairwise(reductions)):
            raise KDADError(
                f"model.layers={list(layers)}: RD4AD needs stages that each halve the resolution; "
                f"{backbone} gives strides {reductions}"
            )
        spec = resnet_spec(self.teacher.encoder)
        block = spec.block if spec else "basic"
        width, groups = (spec.width_per_group, spec.groups) if spec else (64, 1)
        default_layers = spec.layers if spec else (2, 2, 2)
        if bottleneck_blocks is None:
            bottleneck_blocks = 2 if default_layers == (2, 2, 2) else 3
        self.bn = OneClassBottleneck(
            channels, block, bottleneck_blocks, width, groups, official_unused_layer
        )
        self.decoder = ReverseDecoder(
            self.bn.out_channels,
            channels,
            block,
            tuple(decoder_layers or default_layers),
            width,
            groups,
            linear_output=decoder_output == "linear",
        )

    def forward(self, images: Tensor, targets: list[Tensor] | None = None) -> FeaturePairs:
        if targets is None:
            targets = self.teacher_features(images)
        predictions = self.decoder(self.bn(targets))
        return list(zip(targets, predictions, strict=True))

    def loss(self, pairs: FeaturePairs) -> Tensor:
        return reverse_distillation_loss(pairs)


__all__ = ["DECODER_OUTPUTS", "RD4AD", "DecoderOutput", "reverse_distillation_loss"]
