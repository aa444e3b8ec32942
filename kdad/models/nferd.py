"""NFERD: Normal Feature-Enhanced Reverse teacher-student Distillation.

Electronics 2024, 13(20):4125: the method "Normal Feature-Enhanced Reverse teacher–student
Distillation" (NFERD); title and authors are not stated in the text available to kdad.
Section 3. RD4AD (:mod:`kdad.models.rd4ad`) with
two additions against its "feature leakage" (the student reproducing anomalous features, so
that normal regions get flagged):

- a normal feature bank (NFB, :mod:`kdad.models.components.feature_bank`): before training,
  ``N`` randomly chosen normal training images go through the frozen teacher and their stage
  1-3 maps are stored; at each decoder stage the ``K`` bank maps most similar to the student's
  map are recalled and mixed, ``v = sum_k w_k f_k``;
- a Hybrid Attention Fusion Module (HAFM, :mod:`kdad.models.components.hafm`) per stage that
  fuses the student map with ``v``: channel and spatial attention in parallel, then combined.

Teacher, OCBE bottleneck, decoder and anomaly map are RD4AD's own modules, unchanged. With
``nfb.enabled=false`` and ``fusion=none`` the model *is* RD4AD: the same parameters, buffers
and state-dict keys (and, with ``loss=flattened``, the same loss).

The defaults are section 3 as written (:class:`BankSettings`, :class:`HAFMSettings` and the
signature; conf/model/nferd.yaml's header reads them key by key): ``nfb.recall=flattened``
(whole maps as vectors), ``nfb.weighting=linear`` (w from the similarities as they are; the
text gives no formula for w), ``nfb.similarity_grad=true`` (gradients through S) and
``loss=per_position`` (section 3.4). kdad's variant ``model=nferd_plus`` recalls per position
with a learned softmax temperature and no gradient through S; both are measured on data=photos
in experiments/photos/README.md.

Where the fused map goes (``fused_to_decoder``, the text does not say): by default the fused
map of a stage is both that stage's prediction (compared with the teacher) and the input of the
next decoder stage, so recalled normal features steer the whole reconstruction; with
``false`` the fused map is only the prediction and the decoder continues from the unfused map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from kdad.config import choice, settings
from kdad.errors import KDADError
from kdad.models.anomaly_map import Distance, cosine_distance
from kdad.models.base import FeaturePairs, batch_images
from kdad.models.components.feature_bank import (
    NormalFeatureBank,
    Recall,
    Weighting,
    select_bank_images,
)
from kdad.models.components.hafm import Combine, Fusion, Merge, StageFusion
from kdad.models.rd4ad import RD4AD, DecoderOutput, reverse_distillation_loss

log = logging.getLogger("kdad")


class NFERDLoss(str, Enum):
    """The training loss (``model.loss``)."""

    flattened = "flattened"  # RD4AD's official loss: 1 - cos of the flattened maps
    per_position = "per_position"  # section 3.4: 1 - cos per position, mean over H x W


LOSSES = tuple(m.value for m in NFERDLoss)


@dataclass
class BankSettings:
    """``model.nfb``, the normal feature bank (:class:`NormalFeatureBank`). The defaults are
    section 3 as written; conf/model/nferd.yaml's header says which keys are the paper's and
    which are kdad's plainest choices, conf/model/nferd_plus.yaml the four that kdad's
    variant changes."""

    enabled: bool = True  # false (with fusion=none) = RD4AD exactly
    size: int = 16  # N: normal training images stored (a choice)
    top_k: int = 3  # K: most similar entries recalled per stage (a choice)
    seed: int = 0  # which N images (a seeded draw from the training split)
    recall: Recall | str = "flattened"  # section 3: whole maps as vectors
    # w over the K: S_k / sum of the K, the similarities as they are (the text gives no formula)
    weighting: Weighting | str = "linear"
    temperature: float = 1.0  # softmax only: softmax(S / temperature)
    learn_temperature: bool = False  # softmax only: train the inverse temperature
    similarity_grad: bool = True  # gradients through S (false: S only selects and weights)
    # training only: an image never recalls its own bank entry (not in the paper)
    exclude_self: bool = False


@dataclass
class HAFMSettings:
    """``model.hafm``: the Hybrid Attention Fusion Module (and ``fusion=cbam``'s CBAM)."""

    merge: Merge | str = "add"  # how s and v enter the attention: s + v, or a 1x1 mix (choice)
    combine: Combine | str = "add"  # parallel branches: x*Mc + x*Ms, or x*Mc*Ms (choice)
    reduction: int = 16  # channel-attention MLP reduction (CBAM's)
    kernel_size: int = 7  # spatial-attention conv (CBAM's)


class NFERD(RD4AD):
    """RD4AD whose decoder recalls and fuses normal features at each of its three stages.

    Args:
        backbone, layers, pretrained, weights_path, bottleneck_blocks, decoder_layers,
        official_unused_layer, decoder_output, distance, anomaly_map: as
        :class:`RD4AD`.
        nfb: the normal feature bank: ``enabled``; ``size`` (N, training images stored);
            ``top_k`` (K, entries recalled); ``seed`` (which images); ``recall``
            (``per_position`` or the paper's ``flattened``); ``weighting`` (form of ``w``:
            ``softmax``, ``uniform``, ``linear``), ``temperature`` and ``learn_temperature``
            (softmax); ``similarity_grad`` (gradient through ``S``); ``exclude_self`` (in
            training, an image never recalls its own bank entry). The paper's reading:
            ``recall=flattened, temperature=1, learn_temperature=false, similarity_grad=true``.
        fusion: ``hafm``, ``cbam``, ``add``, ``concat`` or ``none`` (see
            :mod:`kdad.models.components.hafm`).
        fused_to_decoder: the fused map also feeds the next decoder stage (see module doc).
        hafm: HAFM/CBAM settings: ``combine`` (``add`` or ``mul``), ``reduction``, ``kernel_size``.
        loss: ``per_position`` (section 3.4) or ``flattened`` (RD4AD's official loss).
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
        nfb: BankSettings | Mapping[str, Any] | None = None,
        fusion: Fusion | str = "hafm",
        fused_to_decoder: bool = True,
        hafm: HAFMSettings | Mapping[str, Any] | None = None,
        loss: NFERDLoss | str = "per_position",
        distance: Distance | str = "cosine",
        anomaly_map: Mapping | None = None,
    ) -> None:
        # Check the settings before building anything heavy.
        bank = settings(BankSettings, nfb, "model.nfb")
        attention = settings(HAFMSettings, hafm, "model.hafm")
        fusion = choice(Fusion, fusion, "model.fusion")
        merge = choice(Merge, attention.merge, "model.hafm.merge")
        combine = choice(Combine, attention.combine, "model.hafm.combine")
        weighting = choice(Weighting, bank.weighting, "model.nfb.weighting")
        recall = choice(Recall, bank.recall, "model.nfb.recall")
        loss = choice(NFERDLoss, loss, "model.loss")
        enabled, size, top_k = bool(bank.enabled), int(bank.size), int(bank.top_k)
        if not float(bank.temperature) > 0:
            raise KDADError(f"model.nfb.temperature={bank.temperature!r}: must be > 0")
        if enabled and (size < 1 or not 1 <= top_k <= size):
            raise KDADError(f"model.nfb: need 1 <= top_k <= size, got size={size}, top_k={top_k}")
        if enabled and fusion == "none":
            raise KDADError(
                "model.fusion=none with model.nfb.enabled=true would discard the recalled normal "
                "features: choose a fusion (hafm, cbam, add, concat) or set model.nfb.enabled=false"
            )
        super().__init__(
            backbone,
            layers,
            pretrained,
            weights_path,
            bottleneck_blocks,
            decoder_layers,
            official_unused_layer,
            decoder_output,
            distance,
            anomaly_map,
        )
        self.nfb_enabled, self.nfb_size, self.nfb_top_k = enabled, size, top_k
        self.nfb_seed, self.exclude_self = int(bank.seed), bool(bank.exclude_self)
        self.fused_to_decoder = bool(fused_to_decoder)
        self.loss_form = loss
        channels = tuple(self.teacher.channels)  # student stage i has teacher stage i's channels
        self.banks: nn.ModuleList | None = None
        if self.nfb_enabled:
            self.banks = nn.ModuleList(
                NormalFeatureBank(
                    c,
                    c,
                    self.nfb_top_k,
                    weighting,
                    float(bank.temperature),
                    recall,
                    bool(bank.learn_temperature),
                    bool(bank.similarity_grad),
                )
                for c in channels
            )
        self.fusions = nn.ModuleList(
            StageFusion(
                fusion,
                c,
                self.nfb_enabled,
                merge,
                int(attention.reduction),
                int(attention.kernel_size),
                combine,
            )
            for c in channels
        )
        if not self.nfb_enabled and fusion in ("add", "concat"):
            log.warning(
                "model.fusion=%s without the normal feature bank has nothing to fuse: this is RD4AD",
                fusion,
            )

    @property
    def decoder_stages(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The decoder's stages from the bottleneck outwards: they produce teacher stages 3, 2, 1."""
        return self.decoder.layer1, self.decoder.layer2, self.decoder.layer3

    # --- the normal feature bank ------------------------------------------------------------
    @torch.no_grad()
    def before_fit(self, train_loader: DataLoader) -> None:
        """Build the bank from ``N`` images of ``train_loader``'s dataset (the training split).

        The images are picked by :func:`select_bank_images` from ``nfb.seed`` and the dataset's
        own order, never from the loader's shuffled order, and read in a fixed order.
        """
        if self.banks is None:
            return
        dataset = getattr(train_loader, "dataset", None)
        try:
            num_images = len(dataset)
        except TypeError:
            raise KDADError(
                "model.nfb: the training loader's dataset must be indexable with a length"
            ) from None
        if num_images == 0:
            raise KDADError("model.nfb: no training images to build the normal feature bank from")
        indices = select_bank_images(num_images, self.nfb_size, self.nfb_seed)
        if len(indices) < self.nfb_size:
            log.warning(
                "model.nfb.size=%d but only %d training images: the bank holds all of them",
                self.nfb_size,
                num_images,
            )
        if len(indices) < self.nfb_top_k:
            log.warning(
                "model.nfb.top_k=%d > bank size %d: recalling all entries",
                self.nfb_top_k,
                len(indices),
            )
        loader = DataLoader(
            Subset(dataset, indices),
            batch_size=train_loader.batch_size or 16,
            shuffle=False,
            num_workers=train_loader.num_workers,
            collate_fn=train_loader.collate_fn,
        )
        device = next(self.teacher.parameters()).device
        per_stage: list[list[Tensor]] = [[] for _ in self.banks]
        for batch in loader:
            for stage, maps in enumerate(self.teacher(batch_images(batch).to(device))):
                per_stage[stage].append(maps)
        teacher_maps = [torch.cat(maps) for maps in per_stage]
        for bank, maps, size in zip(
            self.banks, teacher_maps, self._student_sizes(teacher_maps), strict=True
        ):
            bank.store(maps, size)
        samples = getattr(dataset, "samples", None)
        if samples is not None:
            names = [Path(str(getattr(samples[i], "image_path", i))).name for i in indices]
            log.info(
                "normal feature bank: %d training images (seed %d): %s",
                len(indices),
                self.nfb_seed,
                names,
            )

    def _student_sizes(self, teacher_maps: list[Tensor]) -> list[tuple[int, int]]:
        """Spatial size of each student stage, in teacher order, from one probe image."""
        modules = [*self.bn.modules(), *self.decoder.modules()]
        modes = [m.training for m in modules]
        self.bn.eval()  # no BatchNorm statistics update from the probe
        self.decoder.eval()
        try:
            x = self.bn([maps[:1] for maps in teacher_maps])
            sizes = []
            for layer in self.decoder_stages:
                x = layer(x)
                sizes.append(tuple(x.shape[-2:]))
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.training = mode
        return sizes[::-1]

    def _own_entries(self, targets: list[Tensor]) -> Tensor:
        """(B, N) bool: which bank entries are the batch's own images: the same deepest teacher
        map up to float rounding (squared distance within 1e-6 of the map's squared norm).

        Not a cosine threshold: crops of one photograph can have deepest maps with cosine above
        0.9999 without being the same image, and would all be excluded."""
        stored = self.banks[-1].features
        deepest = targets[-1]
        if deepest.shape[-2:] != stored.shape[-2:]:
            deepest = F.interpolate(
                deepest, size=stored.shape[-2:], mode="bilinear", align_corners=False
            )
        rows = deepest.detach().flatten(1).float()
        entries = stored.flatten(1).float()
        distance = torch.cdist(rows, entries, compute_mode="donot_use_mm_for_euclid_dist")
        return distance.square() <= 1e-6 * rows.square().sum(dim=1, keepdim=True)

    # --- the variant's interface -------------------------------------------------------------
    def forward(self, images: Tensor, targets: list[Tensor] | None = None) -> FeaturePairs:
        if targets is None:
            targets = self.teacher_features(images)
        x = self.bn(targets)
        exclude = None
        if self.banks is not None and self.exclude_self and self.training:
            exclude = self._own_entries(targets)
        predictions: list[Tensor | None] = [None, None, None]
        for stage, layer in zip((2, 1, 0), self.decoder_stages, strict=True):
            student = layer(x)
            recalled = self.banks[stage](student, exclude) if self.banks is not None else None
            fused = self.fusions[stage](student, recalled)
            predictions[stage] = fused
            x = fused if self.fused_to_decoder else student
        return list(zip(targets, predictions, strict=True))

    def loss(self, pairs: FeaturePairs) -> Tensor:
        """``flattened``: RD4AD's official loss; ``per_position``: section 3.4's (see module doc)."""
        if self.loss_form == "flattened":
            return reverse_distillation_loss(pairs)
        return per_position_cosine_loss(pairs)


def per_position_cosine_loss(pairs: FeaturePairs) -> Tensor:
    """Section 3.4: sum over stages of ``1 - cos`` along channels, averaged over H_i x W_i
    (and over the batch)."""
    loss = pairs[0][0].new_zeros(())
    for target, prediction in pairs:
        loss = loss + cosine_distance(target, prediction).mean()
    return loss


__all__ = [
    "LOSSES",
    "NFERD",
    "BankSettings",
    "HAFMSettings",
    "NFERDLoss",
    "per_position_cosine_loss",
]
