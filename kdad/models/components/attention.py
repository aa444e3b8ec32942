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

from kdad.models.components.layout import positions


class _Pools(torch.autograd.Function):
    """The four pooled descriptors CBAM's branches read, in one pass with one backward.

    Forward on a position-major view of ``x`` (N, H*W, C): the mean and the max over positions
    (N, C) for channel attention, over channels (N, H*W) for spatial attention. Autograd would
    build each descriptor's gradient as a full-size tensor and add them up; this backward
    writes one full-size tensor (the two means' gradients, broadcast) and scatters the two
    maxima's gradients into it. The max takes the gradient to one maximum (``max(dim)``), as
    autograd's ``max(dim)`` does.
    """

    @staticmethod
    def forward(ctx, rows: Tensor):  # type: ignore[override]
        mean_hw = rows.mean(dim=1)
        max_hw, index_hw = rows.max(dim=1)
        mean_c = rows.mean(dim=2)
        max_c, index_c = rows.max(dim=2)
        ctx.save_for_backward(index_hw, index_c)
        ctx.shape = rows.shape
        ctx.mark_non_differentiable(index_hw, index_c)
        return mean_hw, max_hw, mean_c, max_c, index_hw, index_c

    @staticmethod
    def backward(ctx, g_mean_hw, g_max_hw, g_mean_c, g_max_c, _i, _j):  # type: ignore[override]
        index_hw, index_c = ctx.saved_tensors
        n, p, c = ctx.shape
        zeros_c = g_max_hw.new_zeros(n, c) if g_mean_hw is None else g_mean_hw / p
        zeros_p = g_max_c.new_zeros(n, p) if g_mean_c is None else g_mean_c / c
        grad = zeros_c[:, None, :] + zeros_p[:, :, None]  # (N, P, C), the only full-size write
        if g_max_hw is not None:
            grad.scatter_add_(1, index_hw[:, None, :], g_max_hw[:, None, :])
        if g_max_c is not None:
            grad.scatter_add_(2, index_c[:, :, None], g_max_c[:, :, None])
        return grad


def pooled_descriptors(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``x`` (N, C, H, W) -> (mean over H x W, max over H x W) (N, C) and (mean over C,
    max over C) (N, H, W): what channel and spatial attention pool (:class:`_Pools`)."""
    n, _, h, w = x.shape
    if not (torch.is_grad_enabled() and x.requires_grad):
        # Inference and exported graphs: the plain operators (no backward to fuse).
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), x.mean(dim=1), x.amax(dim=1)
    mean_hw, max_hw, mean_c, max_c, _, _ = _Pools.apply(positions(x))
    return mean_hw, max_hw, mean_c.view(n, h, w), max_c.view(n, h, w)


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

    def gate(self, mean: Tensor, peak: Tensor) -> Tensor:
        """The gate (N, C) from the descriptors pooled over positions (N, C) each."""
        hidden = F.relu(F.linear(torch.cat([mean, peak]), self.mlp[0].weight.flatten(1)))
        avg, top = F.linear(hidden, self.mlp[2].weight.flatten(1)).chunk(2)
        return torch.sigmoid(avg + top)

    def forward(self, x: Tensor) -> Tensor:
        mean, peak, _, _ = pooled_descriptors(x)
        return self.gate(mean, peak)[:, :, None, None]


class SpatialAttention(nn.Module):
    """M_s(F) = sigmoid(conv7x7([AvgPool_c(F); MaxPool_c(F)])), shape (N,1,H,W).

    The channel max is ``max(dim)``, as in :class:`ChannelAttention`. The two pooled maps are
    stacked channels-last (position-major), where oneDNN's backward of this 2->1 convolution
    is faster than on NCHW maps (same values).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def gate(self, mean: Tensor, peak: Tensor) -> Tensor:
        """The gate (N, 1, H, W) from the maps pooled over channels (N, H, W) each."""
        return torch.sigmoid(self.conv(torch.stack([mean, peak], dim=-1).permute(0, 3, 1, 2)))

    def forward(self, x: Tensor) -> Tensor:
        _, _, mean, peak = pooled_descriptors(x)
        return self.gate(mean, peak)


class CBAM(nn.Module):
    """Channel attention, then spatial attention, each multiplied onto the features."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)
