"""Teacher-feature cache: the frozen teacher's features of each training image, computed once.

Every variant's teacher is frozen, in eval mode and fed the same preprocessed image every
epoch (kdad's training transform is deterministic: resize, optional centre crop, ImageNet
normalisation; no augmentation), so its features for training image *i* are the same tensor
in every epoch. The cache keeps them, keyed by the sample's position in the training split
(the ``index`` the dataset returns), on the model's device in the dtype the teacher produced
them in (bf16 under bf16 autocast). From the second epoch on, a training step runs only the
student: the teacher forward (about a fifth of an RD4AD step, experiments/benchmark) is gone.

What it does not change: the loss, the gradients and the weights, up to float rounding (a
teacher forward of an image within another batch can round differently in the last bit);
validation and test steps always run the teacher. The cache is not stored in checkpoints: a
resumed run refills it in its first epoch.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger("kdad")


class TeacherFeatureCache:
    """Per-level tensors ``(capacity, C, H, W)`` filled on first sight of each index.

    Args:
        capacity: number of training samples (indices run over ``0 .. capacity-1``).
        max_bytes: memory budget; if one epoch's features would need more, the cache turns
            itself off (and says so once) instead of filling memory.
    """

    def __init__(self, capacity: int, max_bytes: float) -> None:
        self.capacity = int(capacity)
        self.max_bytes = float(max_bytes)
        self.levels: list[Tensor] | None = None
        self.filled: Tensor | None = None
        self.memory_format = torch.contiguous_format
        self.enabled = self.capacity > 0

    @property
    def nbytes(self) -> int:
        return sum(level.numel() * level.element_size() for level in self.levels or [])

    def lookup(self, index: Tensor, host_index: Tensor | None = None) -> list[Tensor] | None:
        """The cached features of these samples, or None if any of them is not cached yet.

        ``host_index``: the same indices in CPU memory, when ``index`` lives on a GPU: whether
        they are all cached is then answered on the host, without waiting for the device.
        """
        if not self.enabled or self.levels is None or self.filled is None:
            return None
        if not bool(self.filled[_on_host(index, host_index)].all()):
            return None
        index = index.to(self.levels[0].device)
        return [
            level.index_select(0, index).contiguous(memory_format=self.memory_format)
            for level in self.levels
        ]

    def store(
        self, index: Tensor, features: list[Tensor], host_index: Tensor | None = None
    ) -> None:
        """Keep ``features`` (one tensor per level, batch first) of the samples ``index``."""
        if not self.enabled:
            return
        if self.levels is None:
            per_sample = sum(f[0].numel() * f.element_size() for f in features)
            need = per_sample * self.capacity
            if need > self.max_bytes:
                self.enabled = False
                log.info(
                    "teacher cache off: %d training images x %.1f MB = %.2f GB exceeds "
                    "teacher_cache_max_gb=%.2f",
                    self.capacity,
                    per_sample / 2**20,
                    need / 2**30,
                    self.max_bytes / 2**30,
                )
                return
            device = features[0].device
            first = features[0]
            if first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
                self.memory_format = torch.channels_last  # hand batches back as they came
            self.levels = [
                torch.empty((self.capacity, *f.shape[1:]), dtype=f.dtype, device=device)
                for f in features
            ]
            # On the host: checking it must not synchronise with the device every step.
            self.filled = torch.zeros(self.capacity, dtype=torch.bool)
            log.info("teacher cache: %.2f GB for %d training images", need / 2**30, self.capacity)
        assert self.filled is not None
        self.filled[_on_host(index, host_index)] = True
        index = index.to(self.levels[0].device)
        for level, feature in zip(self.levels, features, strict=True):
            level.index_copy_(0, index, feature.detach().to(level.dtype))


def _on_host(index: Tensor, host_index: Tensor | None) -> Tensor:
    return host_index if host_index is not None else index.cpu()
