"""Position-major rows of feature maps, the layout the bank, HAFM and CBAM work in.

A channels-last (N, C, H, W) map *is* an (N, H*W, C) array of rows in memory: each position's
C-vector contiguous. :func:`positions` views a map that way (a copy only for NCHW memory) and
:func:`maps` views rows back as a map in channels-last memory, so that products and reductions
along channels or positions run on contiguous rows and their results keep the decoder's layout.
"""

from __future__ import annotations

from torch import Tensor


def positions(maps: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H*W, C): each position's C-vector contiguous (a view of
    channels-last memory, else one copy)."""
    n, c, h, w = maps.shape
    return maps.permute(0, 2, 3, 1).reshape(n, h * w, c)


def maps(rows: Tensor, h: int, w: int) -> Tensor:
    """(N, H*W, C) -> (N, C, H, W), a view in channels-last memory (inverse of :func:`positions`)."""
    return rows.view(-1, h, w, rows.shape[2]).permute(0, 3, 1, 2)  # -1: a dynamic batch


__all__ = ["maps", "positions"]
