"""NFERD's normal feature bank (NFB): teacher features of normal training images, recalled by similarity.

Electronics 2024, 13(20):4125: the method "Normal Feature-Enhanced Reverse teacher–student
Distillation" (NFERD); title and authors are not stated in the text available to kdad.
Section 3: before training, ``N`` randomly chosen
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
- ``recall``: ``flattened`` is the paper's reading (one similarity per whole map, the same
  mixture at every position); ``per_position`` compares the C-vectors at each position with
  the entries' at the same position, so each position recalls its own top-K and ``w``.
- ``w``: ``softmax`` of the K similarities divided by ``temperature`` ("a softmax of their
  similarities"; ``learn_temperature`` trains the inverse temperature), ``uniform`` (the mean
  of the K maps) or ``linear`` (similarities normalised to sum to one, clamped at zero).
- ``similarity_grad``: whether gradients flow through ``S`` (the paper's reading; without,
  as in ``model=nferd_plus``, ``S`` is only a retrieval key).
- Everything is batched tensor work on the bank's device: one matmul (flattened) or one
  small matmul per position for all similarities of a batch, ``topk``, and one matmul
  (flattened) or a gather of the K entries (per position) for the weighted sums. Flattened,
  the 1x1 convolution goes on whichever side is smaller: with ``N <= B`` (the default bank
  of 16 beside a batch of 16) the N entries are projected once per step and compared and
  mixed as they are; with more entries than images the B student maps are pulled back
  through it instead and the stored maps mixed, then the B mixtures projected (the same
  ``v``, since the convolution is affine and ``w`` sums to one), so a large bank is never
  projected (:meth:`NormalFeatureBank.similarities`).

The stored maps are a persistent buffer, so they travel with every checkpoint. Their shape is
only known once the bank is built; :meth:`NormalFeatureBank._load_from_state_dict` resizes the
empty buffer of a freshly constructed model to the checkpoint's, so loading always works.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.config import choice
from kdad.errors import KDADError
from kdad.models.components.layout import maps, positions


class Weighting(str, Enum):
    """The form of ``w`` over the K recalled entries (``model.nfb.weighting``)."""

    softmax = "softmax"  # softmax(S / temperature)
    uniform = "uniform"  # the mean of the K maps
    linear = "linear"  # S_k / sum of the K (clamped at 0): the similarities as they are


class Recall(str, Enum):
    """What is compared and recalled (``model.nfb.recall``)."""

    flattened = "flattened"  # section 3: whole maps as vectors, one top-K per image
    per_position = "per_position"  # the C-vectors at each position, one top-K per position


WEIGHTINGS = tuple(m.value for m in Weighting)
RECALLS = tuple(m.value for m in Recall)


class _FlatCosines(torch.autograd.Function):
    """``S = (q . g) / (|q| |g|)`` for B query rows ``q`` (B, D) and N entry rows ``g`` (N, D),
    with the entries' norms ``|g|`` (N,) given (so that they can come from the bank's moments).

    Autograd would take ``|q|``'s gradient through three full-size passes over ``q`` (norm
    backward) and add it to the product's; this backward writes ``q``'s gradient once, from
    ``dS_bn/dq_b = g_n / (|q_b| |g_n|) - S_bn q_b / |q_b|^2``: with upstream ``G`` (B, N),
    ``A @ g - (sum_n G S / |q|^2) q`` where ``A = G / (|q| |g|)``. Norms below 1e-12 are
    clamped there and pass no gradient, as autograd's ``clamp_min`` does.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, entries: Tensor, entry_norms: Tensor):  # type: ignore[override]
        q_norms = queries.norm(dim=1)
        scale = q_norms.clamp_min(1e-12)[:, None] * entry_norms.clamp_min(1e-12)[None]
        sim = (queries @ entries.T) / scale
        ctx.save_for_backward(queries, entries, q_norms, entry_norms, sim, scale)
        return sim

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        queries, entries, q_norms, e_norms, sim, scale = ctx.saved_tensors
        weighted = grad / scale  # (B, N)
        along = grad * sim
        grad_q = grad_e = grad_norms = None
        if ctx.needs_input_grad[0]:
            radial = along.sum(dim=1) / q_norms.square().clamp_min(1e-24)
            radial = radial.masked_fill(q_norms < 1e-12, 0.0)[:, None].to(queries.dtype)
            grad_q = torch.addcmul(weighted.to(entries.dtype) @ entries, queries, radial, value=-1)
        if ctx.needs_input_grad[1]:
            grad_e = weighted.T.to(queries.dtype) @ queries
        if ctx.needs_input_grad[2]:
            grad_norms = -along.sum(dim=0) / e_norms.clamp_min(1e-12)
            grad_norms = grad_norms.masked_fill(e_norms < 1e-12, 0.0)
        return grad_q, grad_e, grad_norms


def flat_cosines(queries: Tensor, entries: Tensor, entry_norms: Tensor) -> Tensor:
    """Cosines (B, N) of query rows (B, D) with entry rows (N, D) whose norms (N,) are given
    (:class:`_FlatCosines`; the plain operators where no gradient is taken, e.g. export)."""
    if torch.is_grad_enabled() and (
        queries.requires_grad or entries.requires_grad or entry_norms.requires_grad
    ):
        return _FlatCosines.apply(queries, entries, entry_norms)
    scale = queries.norm(dim=1).clamp_min(1e-12)[:, None] * entry_norms.clamp_min(1e-12)[None]
    return (queries @ entries.T) / scale


class NormalFeatureBank(nn.Module):
    """The bank of one student stage: ``N`` stored maps (C_t, H, W) and their 1x1 projection.

    Args:
        teacher_channels: channels of the teacher stage whose maps are stored.
        student_channels: channels of the student (decoder) stage they are recalled into.
        top_k: ``K``, the number of most similar entries mixed into the recalled map.
        weighting: form of ``w`` over the K entries (see :data:`WEIGHTINGS`).
        temperature: softmax temperature (``weighting="softmax"`` only); with
            ``learn_temperature`` its starting value.
        recall: ``flattened`` (the paper's reading: one cosine per whole map, one top-K per
            image) or ``per_position`` (one cosine along channels per position, one top-K and
            one ``w`` per position; see the module doc).
        learn_temperature: the softmax's inverse temperature is a trained parameter
            (``log_scale``, one per bank) instead of a constant.
        similarity_grad: gradients flow through ``S`` into the student and the projection
            (``False``: ``S`` only selects and weights; see the module doc).
    """

    features: Tensor
    gram: Tensor
    total: Tensor

    def __init__(
        self,
        teacher_channels: int,
        student_channels: int,
        top_k: int = 3,
        weighting: Weighting | str = "softmax",
        temperature: float = 1.0,
        recall: Recall | str = "flattened",
        learn_temperature: bool = False,
        similarity_grad: bool = True,
    ) -> None:
        super().__init__()
        weighting = choice(Weighting, weighting, "model.nfb.weighting")
        recall = choice(Recall, recall, "model.nfb.recall")
        if not temperature > 0:
            raise KDADError(f"model.nfb.temperature={temperature!r}: must be > 0")
        self.top_k, self.weighting, self.temperature = int(top_k), weighting, float(temperature)
        self.recall, self.similarity_grad = recall, bool(similarity_grad)
        self.log_scale: nn.Parameter | None = None
        if learn_temperature:  # softmax(sim * exp(log_scale)), starting at 1 / temperature
            self.log_scale = nn.Parameter(torch.tensor(-math.log(self.temperature)))
        self.proj = nn.Conv2d(teacher_channels, student_channels, 1)
        with torch.no_grad():  # identity start: the first recalls are the teacher's features
            self.proj.weight.zero_()
            eye = torch.eye(min(teacher_channels, student_channels))
            self.proj.weight[: eye.shape[0], : eye.shape[1], 0, 0] = eye
            self.proj.bias.zero_()
        self.register_buffer("features", torch.zeros(0, teacher_channels, 0, 0), persistent=True)
        c = teacher_channels
        self.register_buffer("gram", torch.zeros(0, c, c), persistent=False)
        self.register_buffer("total", torch.zeros(0, c), persistent=False)

    @property
    def size(self) -> int:
        """Number of stored maps (0 until the bank is built or loaded)."""
        return int(self.features.shape[0])

    def extra_repr(self) -> str:
        learned = ", learned" if self.log_scale is not None else ""
        return (
            f"size={self.size}, top_k={self.top_k}, recall={self.recall}, "
            f"weighting={self.weighting}, temperature={self.temperature}{learned}"
        )

    @torch.no_grad()
    def store(self, teacher_maps: Tensor, size: tuple[int, int]) -> None:
        """Keep ``teacher_maps`` (N, C_t, h, w), bilinearly resized to the student stage's ``size``."""
        if tuple(teacher_maps.shape[-2:]) != tuple(size):
            teacher_maps = F.interpolate(
                teacher_maps, size=size, mode="bilinear", align_corners=False
            )
        # Channels-last memory: the 1x1 projection and the per-position reads are faster.
        self.features = teacher_maps.detach().float().contiguous(memory_format=torch.channels_last)
        self._store_moments()

    @torch.no_grad()
    def _store_moments(self) -> None:
        """Each entry's second and first moments over positions, ``sum_p f f^T`` (N, C_t, C_t)
        and ``sum_p f`` (N, C_t): with them a projected entry's norm needs no projected map
        (:meth:`_entry_norms`). Derived from ``features``, so never saved in checkpoints."""
        rows = positions(self.features)  # (N, P, C_t)
        self.gram = rows.transpose(1, 2) @ rows
        self.total = rows.sum(dim=1)

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
        self._store_moments()

    def _project(self, rows: Tensor) -> Tensor:
        """The trainable 1x1 convolution on position-major rows (..., C_t) -> (..., C)."""
        return F.linear(rows, self.proj.weight.flatten(1), self.proj.bias)

    def _check_built(self, student: Tensor) -> None:
        if self.size == 0:
            raise KDADError(
                "the normal feature bank is empty: build it with before_fit(train_loader) "
                "(kdad-train does) or load a checkpoint that holds it"
            )
        expected = (self.proj.out_channels, *self.features.shape[-2:])
        if tuple(student.shape[1:]) != expected:
            raise KDADError(
                f"normal feature bank maps {expected} do not match the student's "
                f"{tuple(student.shape[1:])}: the bank was built for another input size"
            )

    def projected_positions(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The stored maps through the 1x1 convolution, position-major: (N, H*W, C).

        The maps are stored channels-last, so their position-major view needs no copy and the
        projection is one matrix product on it (the 1x1 convolution's values)."""
        return self._project(positions(self.features.to(dtype)))

    def _entry_norms(self) -> Tensor:
        """The norm of each projected entry as one vector (N,), from the stored moments:
        ``sum_p |W f_p + b|^2 = <W^T W, sum_p f_p f_p^T> + 2 b . W sum_p f_p + P |b|^2``.
        In float32 whatever the autocast (a sum of squares)."""
        with torch.autocast(self.gram.device.type, enabled=False):
            weight, bias = self.proj.weight.flatten(1).float(), self.proj.bias.float()
            count = self.features.shape[-2] * self.features.shape[-1]  # P
            squared = (
                (self.gram.float() * (weight.T @ weight)).sum(dim=(1, 2))
                + 2.0 * (self.total.float() @ (weight.T @ bias))
                + count * bias.square().sum()
            )
            return squared.clamp_min(0.0).sqrt()

    def _projects_entries(self, batch: int) -> bool:
        """Flattened recall: project the N entries (``N <= B``), else pull the B maps back."""
        return self.recall == "flattened" and self.size <= batch

    def _flat_entries(self, dtype: torch.dtype) -> Tensor:
        """The projected entries as whole-map rows (N, H*W*C), in position-major order."""
        return self.projected_positions(dtype).reshape(self.size, -1)

    def similarities(self, student: Tensor, entries: Tensor | None = None) -> Tensor:
        """Cosine similarities ``S`` of the student maps (B, C, H, W) with the projected entries.

        ``flattened``: (B, N), whole maps as vectors (section 3). With ``N <= B`` the entries
        are projected (``entries``: those rows, if the caller has them) and compared by
        :func:`flat_cosines`. With more entries than images they are never projected:
        ``q . (W f + b)`` summed over positions is ``(W^T q) . f + (sum_p q) . b``, so the
        passes touch the B student maps and ``W``, never the N projected maps. Either way
        ``|W f + b|`` comes from the stored moments (:meth:`_entry_norms`); both give the
        plain formula's values and gradients (tests/models/test_nferd.py).
        ``per_position``: (B, N, H, W), the C-vectors at each position against the projected
        entries' at that position. All of it works on position-major rows: a view of
        channels-last maps, no copy. The order in which a whole map is flattened does not
        change its cosine.
        """
        self._check_built(student)
        b, _, h, w = student.shape
        queries = positions(student)  # (B, P, C)
        if self._projects_entries(b):
            if entries is None:
                entries = self._flat_entries(student.dtype)
            return flat_cosines(queries.reshape(b, -1), entries, self._entry_norms())
        if self.recall == "flattened":
            weight = self.proj.weight.flatten(1).to(student.dtype)  # (C, C_t)
            pulled = (queries @ weight).reshape(b, -1)  # W^T q at each position: (B, P*C_t)
            entries = positions(self.features.to(student.dtype)).reshape(self.size, -1)
            bias = self.proj.bias.to(student.dtype)
            dots = pulled @ entries.T + (queries.sum(dim=1) @ bias)[:, None]
            q_norms = queries.reshape(b, -1).norm(dim=1).clamp_min(1e-12)
            return dots / (q_norms[:, None] * self._entry_norms().clamp_min(1e-12))
        # One small matrix product per position: (P, B, C) @ (P, C, N) -> (P, B, N), on
        # position-major rows, so the batched GEMM reads contiguous C-vectors; returned as a
        # (B, N, H, W) view. A GEMM over NCHW-strided views, or a broadcast product, costs
        # far more (experiments/benchmark/README.md, NFERD against RD4AD).
        queries = F.normalize(queries, dim=2)
        keys = F.normalize(self.projected_positions(student.dtype), dim=2)  # (N, P, C)
        sim = torch.matmul(queries.transpose(0, 1), keys.permute(1, 2, 0))  # (P, B, N)
        return sim.permute(1, 2, 0).unflatten(2, (h, w))

    @property
    def scale(self) -> Tensor | float:
        """The softmax's inverse temperature: ``exp(log_scale)`` if learned, else ``1 / temperature``."""
        return self.log_scale.exp() if self.log_scale is not None else 1.0 / self.temperature

    def weights(self, top_sim: Tensor) -> Tensor:
        """``w`` from the K largest similarities (B, K[, H, W]); sums to one over K (dim 1)."""
        if self.weighting == "softmax":
            return torch.softmax(top_sim * self.scale, dim=1)
        if self.weighting == "uniform":
            return torch.full_like(top_sim, 1.0 / top_sim.shape[1])
        positive = top_sim.clamp_min(0) + 1e-8
        return positive / positive.sum(dim=1, keepdim=True)

    def select(
        self, student: Tensor, exclude: Tensor | None = None, entries: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The top-K of ``S``: weights ``w`` and entry indices (B, K[, H, W]). ``exclude``
        (B, N) bool marks entries a row may not recall (leave-one-out training); ``entries``:
        see :meth:`similarities`. Without ``similarity_grad``, ``S`` is computed without
        gradient (a retrieval key): ``w`` then learns only through the learned scale."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.similarity_grad):
            sim = self.similarities(student, entries)
        if exclude is not None:
            mask = exclude if sim.dim() == 2 else exclude[:, :, None, None]
            sim = sim.masked_fill(mask, float("-inf"))
        k = min(
            self.top_k, self.size - (int(exclude.sum(dim=1).max()) if exclude is not None else 0)
        )
        if k < 1:
            raise KDADError(
                "model.nfb: no bank entry left to recall after excluding the image itself"
            )
        top_sim, top_idx = sim.topk(k, dim=1)
        return self.weights(top_sim), top_idx

    def _dense(self, weights: Tensor, index: Tensor) -> Tensor:
        """(B, N[, H, W]): ``w_k`` (B, K[, H, W]) on the recalled entries ``index``, 0 elsewhere."""
        shape = (weights.shape[0], self.size, *weights.shape[2:])
        return weights.new_zeros(shape).scatter(1, index, weights)

    def mixture(self, student: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Dense mixing weights (B, N[, H, W]): ``w_k`` on the recalled entries, 0 elsewhere."""
        return self._dense(*self.select(student, exclude))

    def forward(self, student: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Recall ``v`` (B, C, H, W) for the student maps (B, C, H, W): ``v = sum_k w_k f_k``,
        per position with ``recall="per_position"``; ``exclude``: see :meth:`select`."""
        self._check_built(student)
        b, _, h, w = student.shape
        if self._projects_entries(b):  # N <= B: the projected entries, compared and mixed
            entries = self._flat_entries(student.dtype)  # (N, P*C), one projection per step
            mix = self._dense(*self.select(student, exclude, entries))
            return maps((mix @ entries).view(b, h * w, -1), h, w)
        weights, index = self.select(student, exclude)
        # The stored maps are mixed first and the B recalled maps projected: the same v as
        # mixing projected entries (the 1x1 conv is affine and w sums to one over K), with
        # the same gradients, but the work is on B maps instead of the N entries.
        source = positions(self.features.to(student.dtype))  # (N, P, C_t)
        n, p, c = source.shape
        if self.recall == "flattened":
            mix = self._dense(weights, index)  # (B, N)
            mixed = (mix @ source.reshape(n, -1)).view(-1, p, c)  # (B, P, C_t)
        else:
            # Gather the K entries' vectors at each position: K/N of a dense mix's work. One
            # batched product per position on dense weights instead made this bank's stage 0
            # about 2x slower, forward + backward (experiments/benchmark/README.md).
            table = source.reshape(n * p, c)  # row n*P + p: entry n at p
            rows = index.flatten(2) * p + torch.arange(p, device=student.device)
            picked = F.embedding(rows, table)  # (B, K, P, C_t), one row lookup per entry
            mixed = (weights.flatten(2).unsqueeze(-1) * picked).sum(1)  # (B, P, C_t)
        return maps(self._project(mixed), h, w)  # channels-last memory, like the decoder's maps


def select_bank_images(num_images: int, size: int, seed: int) -> list[int]:
    """Indices of the ``size`` training images stored in the bank (all of them if fewer).

    A seeded permutation of the dataset's own order (kdad sorts training images by path), so
    every DDP rank, every resumed run and any loader shuffling pick the same images.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(num_images, generator=generator)[:size].tolist())


__all__ = [
    "RECALLS",
    "WEIGHTINGS",
    "NormalFeatureBank",
    "Recall",
    "Weighting",
    "select_bank_images",
]
