"""Attention blocks shared by the variants.

CBAM (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018): channel attention
(a shared MLP over average- and max-pooled descriptors, eq. 2) followed *in series* by spatial
attention (a 7x7 convolution over channel-wise average and max maps, eq. 3):

    F' = M_c(F) * F,    F'' = M_s(F') * F'
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ChannelAttention(nn.Module):
    """M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), shape (N,C,1,1).

    The shared MLP (two bias-free 1x1 convolutions, CBAM's) is applied to both descriptors in
    one call, as matrix products on (2N, C) instead of convolutions on (N, C, 1, 1) maps: the
    same values with a fraction of the small-kernel work. The max is ``max(dim)`` (gradient
    to one maximum) rather than ``amax`` (gradient split among tied maxima): the same forward
    values, a cheaper backward; they differ only at exact ties.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        # Kept as CBAM's Sequential so the parameters keep their names (mlp.0, mlp.2) in
        # checkpoints; forward uses the two weights directly (the ReLU is F.relu there).
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=(2, 3)), x.flatten(2).max(dim=2).values])  # (2N, C)
        hidden = F.relu(F.linear(pooled, self.mlp[0].weight.flatten(1)))
        avg, peak = F.linear(hidden, self.mlp[2].weight.flatten(1)).chunk(2)
        return torch.sigmoid(avg + peak)[:, :, None, None]


class SpatialAttention(nn.Module):
    """M_s(F) = sigmoid(conv7x7([AvgPool_c(F); MaxPool_c(F)])), shape (N,1,H,W).

    The channel max is ``max(dim)``, as in :class:`ChannelAttention`. The two pooled maps are
    stacked channels-last (position-major), where oneDNN's backward of this 2->1 convolution
    is ~3x faster than on NCHW maps (same values).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.stack([x.mean(dim=1), x.max(dim=1).values], dim=-1).permute(0, 3, 1, 2)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Channel attention, then spatial attention, each multiplied onto the features."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)
