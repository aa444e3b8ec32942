"""NFERD's Hybrid Attention Fusion Module (HAFM) and the fusion modes it is ablated against.

Electronics 2024, 13(20):4125 (NFERD; title and authors not stated in the available text),
section 3: the HAFM fuses the student's feature map
with the normal features recalled from the bank, "ensur[ing] that key spatial details are
preserved while maintaining information between channels": channel attention and spatial
attention are applied *in parallel* to the same input (CBAM applies them in series), then
combined. The attention branches are CBAM's (:mod:`kdad.models.components.attention`):

    x   = s + v                                   merge="add" (default)
    x   = ReLU(BN(conv1x1([s ; v])))              merge="concat"
    out = x * M_c(x) + x * M_s(x)                 combine="add" (default)
    out = x * M_c(x) * M_s(x)                     combine="mul"

The text says neither how the two maps enter the module nor how the branches are combined.
``merge="add"`` keeps a direct path from the decoder's map to the output: HAFM starts as
``s + v`` (both gates ~0.5) and learns to re-weight channels and positions; the learned 1x1 mix
(``concat``) replaces that path and trained less stably in our runs. ``combine="add"`` keeps
each branch's refinement separately (neither gate can silence what the other keeps); ``mul`` is
the joint 3-D gate.

Fusion modes (``model.fusion``), so that each differs from the next by one thing:

- ``add``: ``s + v`` (no parameters);  ``concat``: the 1x1 mix of ``[s ; v]`` alone;
- ``hafm``: the merge (``model.hafm.merge``), then HAFM (parallel attention);
- ``cbam``: the same merge, then CBAM (series attention);
- ``none``: no fusion, the student map passes through (RD4AD).

Without a bank (``model.nfb.enabled=false``) there is no ``v``: ``hafm`` and ``cbam`` then refine
the student map alone (an attention-only ablation); ``add``, ``concat`` and ``none`` have nothing
to fuse and pass the student map through, exactly as RD4AD.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor, nn

from kdad.config import choice
from kdad.errors import KDADError
from kdad.models.components.attention import (
    CBAM,
    ChannelAttention,
    SpatialAttention,
    pooled_descriptors,
)
from kdad.models.components.layout import maps, positions
from kdad.models.components.resnet_blocks import conv1x1, kaiming_init


class Fusion(str, Enum):
    """How a decoder stage fuses the recalled map (``model.fusion``; see the module doc)."""

    hafm = "hafm"
    cbam = "cbam"
    add = "add"
    concat = "concat"
    none = "none"


class Combine(str, Enum):
    """How HAFM's parallel branches are combined (``model.hafm.combine``)."""

    add = "add"  # x*Mc + x*Ms
    mul = "mul"  # x*Mc*Ms


class Merge(str, Enum):
    """How s and v enter the attention (``model.hafm.merge``)."""

    add = "add"  # s + v
    concat = "concat"  # a 1x1 mix of [s ; v]


FUSIONS = tuple(m.value for m in Fusion)
COMBINES = tuple(m.value for m in Combine)
MERGES = tuple(m.value for m in Merge)


class HybridAttention(nn.Module):
    """Channel and spatial attention computed in parallel from the same input, then combined.

    Args:
        channels: feature channels.
        reduction: channel-attention MLP reduction (CBAM's 16).
        kernel_size: spatial-attention convolution size (CBAM's 7).
        combine: ``add`` (x*M_c + x*M_s) or ``mul`` (x*M_c*M_s).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        kernel_size: int = 7,
        combine: Combine | str = "add",
    ) -> None:
        super().__init__()
        self.combine = choice(Combine, combine, "model.hafm.combine")
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        # Both gates from the same x (parallel), its four descriptors pooled in one pass.
        mean_hw, max_hw, mean_c, max_c = pooled_descriptors(x)
        n, c, h, w = x.shape
        channel_gate = self.channel.gate(mean_hw, max_hw).view(n, 1, c)
        spatial_gate = self.spatial.gate(mean_c, max_c).reshape(n, h * w, 1)
        # Gated on position-major rows (N, H*W, C), a view of channels-last x: the broadcast
        # gate (N, C, 1, 1) + (N, 1, H, W) would come out NCHW, and the product of a
        # channels-last and an NCHW map (forward and backward) cannot run on contiguous rows.
        rows = positions(x)
        if self.combine == "add":  # x * M_c + x * M_s, with one full-size product
            gated = rows * (channel_gate + spatial_gate)
        else:
            gated = rows * channel_gate * spatial_gate
        return maps(gated, h, w)


class StageFusion(nn.Module):
    """One decoder stage's fusion of the student map ``s`` with the recalled map ``v``.

    Args:
        mode: one of :data:`FUSIONS`.
        channels: channels of the student stage.
        fuse_recall: whether the bank is on (a ``v`` is given to :meth:`forward`).
        merge: how ``s`` and ``v`` enter HAFM/CBAM: ``add`` (s + v) or ``concat`` (the 1x1 mix).
        reduction, kernel_size, combine: HAFM/CBAM settings (``combine`` is HAFM's only).
    """

    def __init__(
        self,
        mode: Fusion | str,
        channels: int,
        fuse_recall: bool,
        merge: Merge | str = "add",
        reduction: int = 16,
        kernel_size: int = 7,
        combine: Combine | str = "add",
    ) -> None:
        super().__init__()
        mode = choice(Fusion, mode, "model.fusion")
        merge = choice(Merge, merge, "model.hafm.merge")
        self.mode, self.fuse_recall = mode, fuse_recall
        # add and concat are merges without attention; hafm and cbam attend to the merged map.
        self.merge = {"add": "add", "concat": "concat"}.get(mode, merge) if fuse_recall else None
        if mode == "none":
            self.merge = None
        self.mix = _mix(channels) if self.merge == "concat" else None
        self.attention: nn.Module | None = None
        if mode == "hafm":
            self.attention = HybridAttention(channels, reduction, kernel_size, combine)
        elif mode == "cbam":
            self.attention = CBAM(channels, reduction, kernel_size)

    def forward(self, student: Tensor, recalled: Tensor | None = None) -> Tensor:
        if self.merge is not None and recalled is None:
            raise KDADError(
                f"model.fusion={self.mode}: this stage fuses a recalled map, but none was given"
            )
        x = student
        if self.merge == "add":
            x = student + recalled
        elif self.merge == "concat":
            x = self.mix(torch.cat([student, recalled], dim=1))
        return x if self.attention is None else self.attention(x)


class HAFM(StageFusion):
    """The Hybrid Attention Fusion Module: ``StageFusion`` in mode ``hafm``.

    Args:
        channels: channels of the student stage.
        fuse_recall: whether a recalled map is fused (``False``: attention on the student map alone).
        merge, reduction, kernel_size, combine: see :class:`StageFusion` and :class:`HybridAttention`.
    """

    def __init__(
        self,
        channels: int,
        fuse_recall: bool = True,
        merge: Merge | str = "add",
        reduction: int = 16,
        kernel_size: int = 7,
        combine: Combine | str = "add",
    ) -> None:
        super().__init__("hafm", channels, fuse_recall, merge, reduction, kernel_size, combine)


def _mix(channels: int) -> nn.Sequential:
    """[s ; v] (2C channels) -> C channels: 1x1 conv, BN, ReLU (non-negative like the decoder's output)."""
    mix = nn.Sequential(
        conv1x1(2 * channels, channels), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
    )
    kaiming_init(mix)
    return mix


__all__ = [
    "COMBINES",
    "FUSIONS",
    "HAFM",
    "MERGES",
    "Combine",
    "Fusion",
    "HybridAttention",
    "Merge",
    "StageFusion",
]
