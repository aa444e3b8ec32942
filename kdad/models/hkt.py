"""HKT / HKT+: Hierarchical Knowledge Transfer, cross-layer distillation for anomaly detection.

Xu & Jiang, "Hierarchical Knowledge Transfer: Cross-Layer Distillation for Industrial Anomaly
Detection", J. Imaging 2025, 11(4):102. The public text (abstract and introduction) states the
method in four sentences, each implemented here:

(S1) "HKT utilizes the deep knowledge of the highest feature layer in the teacher's network to
     guide student learning at every level, thus enabling cross-layer interactions."
     -> ``alignment="cross"``: every student level l is compared with the teacher's highest
     layer T_top (the last of ``layers``).
(S2) "Multiple projectors are built inside the model to facilitate the teacher in transferring
     knowledge to each layer of the student."
     -> one trainable :class:`~kdad.models.components.projector.Projector` P_l per student
     level, mapping S_l to the shape of T_top; the cross pairs are (T_top, P_l(S_l)). The
     projectors sit on the student side, so the frozen target cannot move toward the student.
(S3) "the teacher-student structural symmetry is decoupled by embedding Convolutional Block
     Attention Modules (CBAM) in the student network."
     -> :class:`AttentionStudent`: the teacher's architecture, randomly initialised, with a
     CBAM after every returned stage; the attended features are both the level's output and
     the next stage's input.
(S4) "By adding two additional convolutional layers to the teacher and student networks of HKT,
     HKT+ achieves enhanced detection capabilities at the cost of a relatively small increase in
     model parameters."
     -> ``extra_layers=True``: one convolution on top of the teacher's highest layer and one on
     top of the student's, which become a new highest level of each network; everything above
     then applies unchanged (the new teacher level is the cross-layer target).

Where the paper is silent (its public text gives no layer tables, loss, optimiser or schedule),
kdad chooses, and every choice is a config key (conf/model/hkt.yaml):

- ``alignment``: ``cross`` (S1; the default), ``same`` (S_l <-> T_l, STFPM-like) or ``both``
  (the union). ``cross`` is the faithful reading and won kdad's equal-budget comparison on the
  synthetic data (resnet18, random weights, 64 px, 10 epochs, 2 categories x 2 seeds) on image
  AUROC: 85 % against 65 % (same) and 70 % (both). Same-layer pairs localise better (pixel
  AUROC 78 % against 74 %), their maps keeping the finer levels' resolution (README, HKT).
- ``projectors=False`` removes every projector parameter. Cross pairs cannot exist without them
  (the levels differ in channels and resolution), so only the same-layer pairs remain whatever
  ``alignment`` says; this is logged once and exposed as :attr:`HKT.pairing`, so a sweep over
  ``model.projectors=true,false`` runs every job.
- Projector structure: stride-2 conv3x3-BN-ReLU steps down to the top resolution, then a 1x1
  conv to the top channels (see :class:`Projector`).
- CBAM: the standard module (:mod:`kdad.models.components.attention`), reduction 16, 7x7
  spatial kernel, after every returned stage (``cbam=False``: no CBAM parameters at all).
- Loss: the per-position ``loss`` distance (default ``1 - cos`` along channels) averaged over
  positions and images, summed over all pairs.
- Map: the per-pixel ``distance`` of every pair, fused by the shared AnomalyMapGenerator
  (default: sum, Gaussian sigma 4, score = max), as RD4AD.
- HKT+ layers: ``extra_kernel_size`` 1 by default. S4 promises "a relatively small increase in
  model parameters": 1x1 layers add 5 % to HKT's trainable parameters with wide_resnet50_2,
  3x3 layers 27 %, and 3x3 was not clearly better in kdad's runs.
- HKT+ teacher-side layer: a trainable layer on the teacher side could make the target constant
  (zero loss, no detection). kdad's is *frozen* at a seeded init (``extra_seed``, a private
  generator): weights ~ N(0, 1/fan_in), no bias, no activation, i.e. a fixed random projection
  of T_top that cannot collapse, since it never trains, and keeps every channel alive (a ReLU
  would silence the channels whose response is negative on every image: a quarter of them with
  a random-weight resnet18). The student-side layer is a trainable conv with bias and no
  activation (the target is signed).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import timm
import torch
from timm.models import FeatureListNet
from torch import Tensor, nn

from kdad.anomaly_map import DISTANCES
from kdad.errors import KDADError
from kdad.models.base import DistillationModel, FeaturePairs
from kdad.models.components.attention import CBAM
from kdad.models.components.backbone import Teacher, create_feature_extractor
from kdad.models.components.projector import Projector

log = logging.getLogger("kdad")

ALIGNMENTS = ("cross", "same", "both")


def _sequential_features(
    backbone: str, layers: Sequence[int | str], like: nn.Module
) -> FeatureListNet:
    """A randomly initialised copy of the teacher's feature network whose stages run in sequence.

    timm's ``features_only`` model is a ``FeatureListNet`` for most CNNs (ResNets, ConvNeXt,
    RegNet): its children run one after another and ``return_layers`` names the output stages.
    Some families (EfficientNet, MobileNet) have their own feature classes (``like``, the
    teacher's encoder, tells); they are rebuilt as a ``FeatureListNet`` over the classification
    model, cut after the last returned stage.
    """
    if isinstance(like, FeatureListNet):
        return create_feature_extractor(backbone, layers, pretrained=False)
    try:
        model = timm.create_model(backbone, pretrained=False)
        return FeatureListNet(model, like.feature_info.out_indices, flatten_sequential=True)
    except (AssertionError, AttributeError, RuntimeError, TypeError) as exc:
        raise KDADError(
            f"model.backbone={backbone}: HKT needs a CNN whose stages timm can run one by one "
            f"(ResNet, ConvNeXt, RegNet, EfficientNet, MobileNet, ...); {type(exc).__name__}: {exc}"
        ) from None


class AttentionStudent(nn.Module):
    """The teacher's stages, randomly initialised, with a CBAM after every returned stage (S3).

    Args:
        backbone, layers: as the teacher's.
        like: the teacher's encoder (its feature class and out_indices are copied).
        cbam: embed CBAM; ``False`` gives the plain backbone (no attention parameters).
        cbam_reduction, cbam_kernel_size: CBAM's channel reduction and spatial kernel.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[int | str],
        like: nn.Module,
        cbam: bool = True,
        cbam_reduction: int = 16,
        cbam_kernel_size: int = 7,
    ) -> None:
        super().__init__()
        self.body = _sequential_features(backbone, layers, like)
        self.channels = list(self.body.feature_info.channels())
        self.attention = (
            nn.ModuleList(CBAM(c, cbam_reduction, cbam_kernel_size) for c in self.channels)
            if cbam
            else None
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        x, levels = images, []
        for name, stage in self.body.items():
            x = stage(x)
            if name in self.body.return_layers:
                if self.attention is not None:
                    # Attended features are both this level's output and the next stage's input.
                    x = self.attention[len(levels)](x)
                levels.append(x)
        return levels


class FrozenRandomConv(nn.Conv2d):
    """HKT+'s teacher-side layer: a convolution fixed at a seeded random init.

    Weights ~ N(0, 1 / (in_channels k^2)) (variance preserving, no activation), drawn from a
    private generator seeded with ``seed`` so the global RNG is untouched and every run of a
    config gets the same target. No parameter requires grad and the module stays in eval mode:
    the target can neither collapse nor drift toward the student.
    """

    def __init__(self, channels: int, kernel_size: int = 1, seed: int = 0) -> None:
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, bias=False)
        generator = torch.Generator().manual_seed(int(seed))
        std = (channels * kernel_size * kernel_size) ** -0.5
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenRandomConv:
        return super().train(False)

    @torch.no_grad()
    def forward(self, features: Tensor) -> Tensor:
        return super().forward(features)


class HKT(DistillationModel):
    """Frozen teacher, CBAM student, per-level projectors onto the teacher's highest layer.

    Args:
        backbone: timm name of teacher and student (default ``wide_resnet50_2.tv_in1k``).
        layers: teacher/student stages; the last is the "highest feature layer" (S1).
        pretrained, weights_path: teacher weights (see :class:`Teacher`).
        alignment: ``cross`` (every S_l -> P_l -> T_top), ``same`` (S_l <-> T_l) or ``both``.
        projectors: build the projectors; ``False`` leaves only same-layer pairs (logged).
        cbam, cbam_reduction, cbam_kernel_size: CBAM in the student (S3).
        extra_layers: HKT+ (S4): a frozen seeded conv on the teacher's top layer and a
            trainable conv on the student's, forming a new highest level of each network.
        extra_kernel_size: kernel of both extra convolutions.
        extra_seed: seed of the teacher-side conv's fixed init.
        loss: per-position distance of the training loss (``cosine``, ``normalized_l2``, ``l2``).
        distance, anomaly_map: see :class:`DistillationModel`.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | None = None,
        alignment: str = "cross",
        projectors: bool = True,
        cbam: bool = True,
        cbam_reduction: int = 16,
        cbam_kernel_size: int = 7,
        extra_layers: bool = False,
        extra_kernel_size: int = 1,
        extra_seed: int = 0,
        loss: str = "cosine",
        distance: str = "cosine",
        anomaly_map: Mapping | None = None,
    ) -> None:
        super().__init__(distance, anomaly_map)
        if alignment not in ALIGNMENTS:
            raise KDADError(f"model.alignment={alignment!r}: expected one of {list(ALIGNMENTS)}")
        if loss not in DISTANCES:
            raise KDADError(f"model.loss={loss!r}: expected one of {sorted(DISTANCES)}")
        self.teacher = Teacher(backbone, layers, pretrained, weights_path)
        reductions = self.teacher.reductions
        if any(b <= a for a, b in itertools.pairwise(reductions)):
            raise KDADError(
                f"model.layers={list(layers)}: HKT needs stages from fine to coarse (strides {reductions}); "
                "the last one is the teacher's highest layer"
            )
        self.student = AttentionStudent(
            backbone, layers, self.teacher.encoder, cbam, cbam_reduction, cbam_kernel_size
        )

        channels, top = list(self.teacher.channels), self.teacher.channels[-1]
        self.teacher_extra: FrozenRandomConv | None = None
        self.student_extra: nn.Conv2d | None = None
        if extra_layers:
            self.teacher_extra = FrozenRandomConv(top, extra_kernel_size, extra_seed)
            self.student_extra = nn.Conv2d(
                top, top, extra_kernel_size, padding=extra_kernel_size // 2, bias=True
            )
            channels.append(top)
            reductions = [*reductions, reductions[-1]]

        self.projectors = (
            nn.ModuleList(
                Projector(c, top, reductions[-1] // r)
                for c, r in zip(channels, reductions, strict=True)
            )
            if projectors
            else None
        )
        self.pairing = alignment if projectors else "same"
        if self.pairing != alignment:
            log.warning(
                "hkt: model.projectors=false leaves no cross-layer pairs (they need projectors); "
                "model.alignment=%s runs as 'same' (student level l <-> teacher level l)",
                alignment,
            )
        self.loss_distance = loss
        level_names = [str(layer) for layer in layers] + (["extra"] if extra_layers else [])
        top_name = level_names[-1]
        self.pair_names: list[str] = []
        if self.pairing in ("same", "both"):
            self.pair_names += [f"same:{name}" for name in level_names]
        if self.pairing in ("cross", "both"):
            self.pair_names += [f"cross:{name}->{top_name}" for name in level_names]

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        """T_1..T_L (+ HKT+'s extra level), all without gradient."""
        targets = self.teacher(images)
        if self.teacher_extra is not None:
            targets.append(self.teacher_extra(targets[-1]))
        return targets

    def student_features(self, images: Tensor) -> list[Tensor]:
        """S_1..S_L after CBAM (+ HKT+'s extra level)."""
        levels = self.student(images)
        if self.student_extra is not None:
            levels.append(self.student_extra(levels[-1]))
        return levels

    def forward(self, images: Tensor, targets: list[Tensor] | None = None) -> FeaturePairs:
        """Pairs in :attr:`pair_names` order: same-layer pairs, then cross-layer pairs."""
        if targets is None:
            targets = self.teacher_features(images)
        levels = self.student_features(images)
        pairs: FeaturePairs = []
        if self.pairing in ("same", "both"):
            pairs += list(zip(targets, levels, strict=True))
        if self.pairing in ("cross", "both"):
            top = targets[-1]
            pairs += [
                (top, project(level))
                for project, level in zip(self.projectors, levels, strict=True)
            ]
        return pairs

    def loss(self, pairs: FeaturePairs) -> Tensor:
        """Sum over pairs of the mean per-position ``loss`` distance."""
        measure = DISTANCES[self.loss_distance]
        total = pairs[0][0].new_zeros(())
        for target, prediction in pairs:
            total = total + measure(target, prediction).mean()
        return total


__all__ = ["ALIGNMENTS", "HKT", "AttentionStudent", "FrozenRandomConv"]
