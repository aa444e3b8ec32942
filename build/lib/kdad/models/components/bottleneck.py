"""RD4AD's one-class bottleneck embedding (OCBE), Deng & Li, CVPR 2022, section 3.2.

Multi-scale feature fusion (MFF): teacher stages 1 and 2 are brought to stage 3's resolution
and width by stride-2 3x3 convolutions, the three are concatenated, and one-class embedding
(OCE) blocks compress them to the decoder's input (2048x8x8 for wide_resnet50_2 at 256 px).
This mirrors ``BN_layer`` of the official code, including its widths (OCE blocks as wide as
the encoder's, e.g. width_per_group 128 for wide_resnet50_2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdad.models.components.resnet_blocks import ENCODER_BLOCKS, conv1x1, conv3x3, kaiming_init


class OneClassBottleneck(nn.Module):
    """OCBE over three teacher stages with channels ``(c1, c2, c3)``.

    Args:
        channels: teacher channels of stages 1-3 (each stage halves the resolution).
        block: ``"bottleneck"`` or ``"basic"`` (the teacher's block type).
        num_blocks: OCE blocks (official: 3, but 2 for resnet18).
        width_per_group, groups: width of the bottleneck blocks, as the teacher's.
        official_unused_layer: keep ``conv4``/``bn4``, a 1x1 conv the official ``BN_layer``
            defines but never calls. It changes nothing the model computes; it is kept so that
            the trainable-parameter count and the state dict match the official code.
    """

    def __init__(
        self,
        channels: tuple[int, int, int],
        block: str = "bottleneck",
        num_blocks: int = 3,
        width_per_group: int = 64,
        groups: int = 1,
        official_unused_layer: bool = True,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        block_cls = ENCODER_BLOCKS[block]
        out_ch = 2 * c3
        planes = out_ch // block_cls.expansion
        self.conv1 = conv3x3(c1, c2, 2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c2, c3, 2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = conv3x3(c2, c3, 2)
        self.bn3 = nn.BatchNorm2d(c3)
        if official_unused_layer:
            self.conv4 = conv1x1(4 * c3, out_ch)
            self.bn4 = nn.BatchNorm2d(out_ch)
        downsample = nn.Sequential(conv1x1(3 * c3, out_ch, 2), nn.BatchNorm2d(out_ch))
        blocks = [block_cls(3 * c3, planes, 2, downsample, groups, width_per_group)]
        blocks += [
            block_cls(out_ch, planes, 1, None, groups, width_per_group)
            for _ in range(1, num_blocks)
        ]
        self.bn_layer = nn.Sequential(*blocks)
        self.out_channels = out_ch
        kaiming_init(self)

    def forward(self, features: list[Tensor]) -> Tensor:
        f1, f2, f3 = features
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(f1))))))
        l2 = self.relu(self.bn3(self.conv3(f2)))
        return self.bn_layer(torch.cat([l1, l2, f3], dim=1)).contiguous()
