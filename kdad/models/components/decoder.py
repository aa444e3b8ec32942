"""RD4AD's student decoder: the teacher's stages mirrored, upsampling by 2x2 transposed convs.

Mirrors ``de_resnet.py`` of the official code: the stage nearest the bottleneck has as many
blocks as the teacher's first stage (3/4/6 for wide_resnet50_2, 2/2/2 for resnet18), and each
stage's output has the channels of the teacher stage it is compared with.

Teachers whose stage outputs are signed (EfficientNet, MobileNet: a stage ends in a linear
projection plus skip, so about half their values are negative) cannot be matched exactly by
features that end in a ReLU, as ResNet stages (and the official decoder) do:
``linear_output=True`` drops the ReLU after the last block of each stage (a switch; the
official ReLU is the default).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdad.models.components.resnet_blocks import DECODER_BLOCKS, deconv2x2, kaiming_init


class ReverseDecoder(nn.Module):
    """Decode the bottleneck embedding into student features for teacher stages 3, 2, 1.

    Args:
        in_channels: the bottleneck's output channels.
        channels: teacher channels ``(c1, c2, c3)``; stage outputs match them.
        block: ``"bottleneck"`` or ``"basic"``.
        layers: blocks per decoder stage, nearest the bottleneck first.
        width_per_group, groups: as the teacher's blocks.
        linear_output: no ReLU at the end of each stage (for teachers with signed features).
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, int, int],
        block: str = "bottleneck",
        layers: tuple[int, int, int] = (3, 4, 6),
        width_per_group: int = 64,
        groups: int = 1,
        linear_output: bool = False,
    ) -> None:
        super().__init__()
        block_cls = DECODER_BLOCKS[block]
        self.groups, self.base_width = groups, width_per_group
        self.inplanes = in_channels
        c1, c2, c3 = channels
        self.layer1 = self._make_layer(block_cls, c3, layers[0])
        self.layer2 = self._make_layer(block_cls, c2, layers[1])
        self.layer3 = self._make_layer(block_cls, c1, layers[2])
        self.linear_output = bool(linear_output)
        for stage in (self.layer1, self.layer2, self.layer3):
            stage[-1].relu_out = not self.linear_output
        kaiming_init(self)

    def _make_layer(self, block_cls: type[nn.Module], out_ch: int, blocks: int) -> nn.Sequential:
        planes = out_ch // block_cls.expansion
        upsample = nn.Sequential(deconv2x2(self.inplanes, out_ch, 2), nn.BatchNorm2d(out_ch))
        stage = [block_cls(self.inplanes, planes, 2, upsample, self.groups, self.base_width)]
        self.inplanes = out_ch
        stage += [
            block_cls(out_ch, planes, 1, None, self.groups, self.base_width)
            for _ in range(1, blocks)
        ]
        return nn.Sequential(*stage)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """Student features in teacher order: [stage 1, stage 2, stage 3]."""
        f3 = self.layer1(embedding)
        f2 = self.layer2(f3)
        f1 = self.layer3(f2)
        return [f1, f2, f3]
