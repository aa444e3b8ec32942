"""NFERD's normal feature bank (NFB): teacher features of normal training images, recalled by similarity.

Wang et al., "Unsupervised Anomaly Detection via Normal Feature-Enhanced Reverse Teacher-Student
Distillation", Electronics 2024, 13(20):4125, section 3: before training, ``N`` randomly chosen
normal training images go through the frozen teacher; one bank per teacher stage stores their
feature maps, bilinearly resized to the matching student stage and brought to its channel
count by a 1x1 convolution. At a student stage, the student map ``s`` and the ``N`` bank maps
are flattened to vectors; their cosine similarities form the set ``S``; the ``K`` most similar
entries are kept and weighted, and the recalled map is

    v = sum_k  w_k * f_k      (k over the top-K of S, reshaped to a C x H x W map).

Choices the text leaves open (documented in the README, switchable in the config):

- What is stored: the teacher's maps after the bilinear resize, *before* the 1x1 convolution.
  The convolution is trainable, so it is applied to the bank at recall time, and the
  similarities are measured in its output space (the space the student map lives in). It
  starts as the identity, so the first recalls are the teacher's own normal features.
- ``w``: ``softmax`` of the K similarities divided by ``temperature`` (default 1: "a softmax of
  their similarities"), ``uniform`` (the mean of the K maps) or ``linear`` (similarities
  normalised to sum to one, clamped at zero).
- Everything is batched tensor work on the bank's device: one matmul for all similarities of a
  batch, ``topk``, and one (batch x N) @ (N x D) matmul for the weighted sums.

The stored maps are a persistent buffer, so they travel with every checkpoint. Their shape is
only known once the bank is built; :meth:`NormalFeatureBank._load_from_state_dict` resizes the
empty buffer of a freshly constructed model to the checkpoint's, so loading always works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.errors import KDADError

WEIGHTINGS = ("softmax", "uniform", "linear")


class NormalFeatureBank(nn.Module):
    """The bank of one student stage: ``N`` stored maps (C_t, H, W) and their 1x1 projection.

    Args:
        teacher_channels: channels of the teacher stage whose maps are stored.
        student_channels: channels of the student (decoder) stage they are recalled into.
        top_k: ``K``, the number of most similar entries mixed into the recalled map.
        weighting: form of ``w`` over the K entries (see :data:`WEIGHTINGS`).
        temperature: softmax temperature (``weighting="softmax"`` only).
    """

    features: Tensor

    def __init__(
        self,
        teacher_channels: int,
        student_channels: int,
        top_k: int = 3,
        weighting: str = "softmax",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise KDADError(
                f"model.nfb.weighting={weighting!r}: expected one of {list(WEIGHTINGS)}"
            )
        if not temperature > 0:
            raise KDADError(f"model.nfb.temperature={temperature!r}: must be > 0")
        self.top_k, self.weighting, self.temperature = int(top_k), weighting, float(temperature)
        self.proj = nn.Conv2d(teacher_channels, student_channels, 1)
        with torch.no_grad():  # identity start: the first recalls are the teacher's features
            self.proj.weight.zero_()
            eye = torch.eye(min(teacher_channels, student_channels))
            self.proj.weight[: eye.shape[0], : eye.shape[1], 0, 0] = eye
            self.proj.bias.zero_()
        self.register_buffer("features", torch.zeros(0, teacher_channels, 0, 0), persistent=True)

    @property
    def size(self) -> int:
        """Number of stored maps (0 until the bank is built or loaded)."""
        return int(self.features.shape[0])

    def extra_repr(self) -> str:
        return f"size={self.size}, top_k={self.top_k}, weighting={self.weighting}, temperature={self.temperature}"

    @torch.no_grad()
    def store(self, teacher_maps: Tensor, size: tuple[int, int]) -> None:
        """Keep ``teacher_maps`` (N, C_t, h, w), bilinearly resized to the student stage's ``size``."""
        if tuple(teacher_maps.shape[-2:]) != tuple(size):
            teacher_maps = F.interpolate(
                teacher_maps, size=size, mode="bilinear", align_corners=False
            )
        self.features = teacher_maps.detach().float().contiguous()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The bank's shape is only known after building: take the checkpoint's.
        stored = state_dict.get(prefix + "features")
        if (
            isinstance(stored, Tensor)
            and stored.dim() == 4
            and stored.shape[1] == self.features.shape[1]
        ):
            self.features = torch.empty_like(
                stored, device=self.features.device, dtype=self.features.dtype
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def similarities(self, student: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine similarities ``S`` (B, N) of each flattened student map with each projected entry,
        and the projected bank (N, C, H, W)."""
        if self.size == 0:
            raise KDADError(
                "the normal feature bank is empty: build it with before_fit(train_loader) "
                "(kdad-train does) or load a checkpoint that holds it"
            )
        bank = self.proj(self.features.to(student.dtype))
        if bank.shape[1:] != student.shape[1:]:
            raise KDADError(
                f"normal feature bank maps {tuple(bank.shape[1:])} do not match the student's "
                f"{tuple(student.shape[1:])}: the bank was built for another input size"
            )
        sim = F.normalize(student.flatten(1), dim=1) @ F.normalize(bank.flatten(1), dim=1).T
        return sim, bank

    def weights(self, top_sim: Tensor) -> Tensor:
        """``w`` (B, K) from the K largest similarities (B, K); each row sums to one."""
        if self.weighting == "softmax":
            return torch.softmax(top_sim / self.temperature, dim=1)
        if self.weighting == "uniform":
            return torch.full_like(top_sim, 1.0 / top_sim.shape[1])
        positive = top_sim.clamp_min(0) + 1e-8
        return positive / positive.sum(dim=1, keepdim=True)

    def forward(self, student: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Recall ``v`` (B, C, H, W) for the student maps (B, C, H, W).

        ``exclude`` (B, N) bool marks entries a row may not recall (leave-one-out training).
        """
        sim, bank = self.similarities(student)
        if exclude is not None:
            sim = sim.masked_fill(exclude, float("-inf"))
        k = min(
            self.top_k, self.size - (int(exclude.sum(dim=1).max()) if exclude is not None else 0)
        )
        if k < 1:
            raise KDADError(
                "model.nfb: no bank entry left to recall after excluding the image itself"
            )
        top_sim, top_idx = sim.topk(k, dim=1)
        mix = torch.zeros_like(sim).scatter(1, top_idx, self.weights(top_sim))
        return (mix @ bank.flatten(1)).view_as(student)


def select_bank_images(num_images: int, size: int, seed: int) -> list[int]:
    """Indices of the ``size`` training images stored in the bank (all of them if fewer).

    A seeded permutation of the dataset's own order (kdad sorts training images by path), so
    every DDP rank, every resumed run and any loader shuffling pick the same images.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(num_images, generator=generator)[:size].tolist())


__all__ = ["WEIGHTINGS", "NormalFeatureBank", "select_bank_images"]
