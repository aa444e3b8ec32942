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
     -> ``extra_layers=True``: one layer on top of the teacher's highest layer and one on top
     of the student's, which become a new highest level of each network; everything above
     then applies unchanged (the new teacher level is the cross-layer target).

What the student is for each teacher family (S3 copies the teacher's stages):

- ResNets (``wide_resnet50_2``, ``resnet18``): stem + layer1..layer3, random init (torchvision's
  scheme), a CBAM after each layer. Stage outputs are post-ReLU (non-negative), as the teacher's.
- EfficientNet-Lite (``tf_efficientnet_lite0``; layers 1-3 = ``blocks.1``, ``blocks.2``,
  ``blocks.4``: 24/40/112 channels at strides 4/8/16): the stem and MBConv blocks 0-4 (ReLU6,
  depthwise-separable, no squeeze-excitation), random init (timm's), a CBAM after blocks 1, 2
  and 4; blocks 5-6 and the head are not built. These stage outputs end in a linear projection
  conv + BN, hence *signed* (the pretrained teacher's are about half negative): CBAM rescales
  them by sigmoid gates (the sign survives), CBAM's pooled descriptors (mean, max) are defined
  for signed inputs, and every projector ends in a linear 1x1 conv with bias, so each student
  quantity compared with a teacher one can take either sign.

Where the paper is silent (its public text gives no layer tables, loss, optimiser or schedule),
kdad chooses, and every choice is a config key whose default is the signature's below
(``kdad-train model=hkt --cfg job`` lists them; the choices are the Enums of this module):

- ``alignment``: ``cross`` (S1; the default), ``same`` (S_l <-> T_l, STFPM-like) or ``both``
  (the union). Only the pairs used are built: ``same`` has no projector at all.
- ``cross_scale``: where a cross pair is compared. ``top`` brings each student level down to
  T_top's resolution (the map is then at T_top's stride); ``level`` keeps the level's
  resolution (the projector's conv steps at stride 1) and resizes T_top to it, bilinearly and
  parameter-free, so the map is multi-scale. No teacher-side part is trained in either form:
  the target cannot collapse.
- ``projectors``: S2's projectors. Cross pairs cannot exist without them (the levels differ in
  channels and resolution) and no parameter-free cross pairing is sound, so
  ``projectors=False`` is only valid with ``alignment="same"`` (which builds none anyway);
  with ``cross`` or ``both`` it is a :class:`KDADError`, never a silent change of pairing.
- Projector structure: stride-2 conv3x3-BN-ReLU steps down to the top resolution, then a linear
  1x1 conv to the top channels (see :class:`Projector`).
- CBAM: the standard module (:mod:`kdad.models.components.attention`), reduction 16, 7x7
  spatial kernel, after every returned stage (``cbam=False``: no CBAM parameters at all).
- Loss: the per-position ``loss`` distance (default ``1 - cos`` along channels) averaged over
  positions and images, summed over all pairs.
- Map: the per-pixel ``distance`` of every pair, fused by the shared AnomalyMapGenerator
  (default: sum, Gaussian sigma 4, score = max), as RD4AD.
- HKT+'s two layers (``extra_source``). A trainable teacher-side layer could make the target
  constant (zero loss, no detection), so the teacher's is always frozen.

  * ``next_conv``: the teacher's additional layer is its *next pretrained
    convolution layer*, the first conv + BN + activation of the stage after its highest
    layer, frozen with its ImageNet weights: ``layer4[0].conv1/bn1/act1`` for ResNets
    (wide_resnet50_2: 1x1, 1024 -> 1024, stride 1), ``blocks.5[0].conv_pw/bn1`` for
    EfficientNet-Lite0 (1x1 expansion, 112 -> 672, ReLU6, stride 1). The student's is a
    randomly initialised, trainable layer of the same shape (conv + BN + the same
    non-linearity). Teacher and student outputs are both post-activation (non-negative).
  * ``next_block``: the whole first block of that stage (ResNet: layer4's first bottleneck;
    Lite0: the first MBConv of blocks.5, 112 -> 192 at stride 32), frozen, pretrained; the
    student's a random trainable copy. Deeper, but a new level at half the resolution and,
    for ResNets, far more parameters (the projectors then target 2048 channels).
  * ``random``: a frozen 1x1 conv fixed at a seeded random init (``extra_seed``,
    N(0, 1/fan_in), no bias, no activation) on the teacher and a trainable linear 1x1 conv on
    the student: a re-parametrised copy of the existing top pair that adds no capacity (an
    ablation, not a reading of the paper).

  ``next_conv`` is the default: it adds capacity, as the paper says HKT+ does. The switches
  (``alignment``, ``cross_scale``, ``cbam``, ``extra_source``) are measured on data=photos in
  experiments/photos/README.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from enum import Enum

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from torch import Tensor, nn

from kdad.config import choice
from kdad.errors import KDADError
from kdad.models.anomaly_map import DISTANCES, Distance
from kdad.models.base import DistillationModel, FeaturePairs
from kdad.models.components.attention import CBAM
from kdad.models.components.backbone import Teacher, create_feature_extractor
from kdad.models.components.projector import Projector


class Alignment(str, Enum):
    """Which teacher/student pairs are compared (``model.alignment``)."""

    cross = "cross"  # S1: every student level -> the teacher's highest layer (the paper)
    same = "same"  # level l <-> teacher level l (STFPM-like; no projectors)
    both = "both"


class CrossScale(str, Enum):
    """Where a cross pair is compared (``model.cross_scale``)."""

    top = "top"  # at the top layer's resolution
    level = "level"  # the top layer resized to each level's


class ExtraSource(str, Enum):
    """Where HKT+'s two layers come from (``model.extra_source``)."""

    next_conv = "next_conv"  # the teacher's next pretrained conv layer (the default)
    next_block = "next_block"  # its next pretrained block
    random = "random"  # a frozen seeded linear conv: adds no capacity (an ablation)


ALIGNMENTS = tuple(m.value for m in Alignment)
CROSS_SCALES = tuple(m.value for m in CrossScale)
EXTRA_SOURCES = tuple(m.value for m in ExtraSource)


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
    """HKT+'s teacher-side layer with ``extra_source="random"``: a conv fixed at a seeded init.

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


class FrozenLayer(nn.Module):
    """A pretrained layer used as a fixed part of the teacher: no grad, always in eval mode
    (its BatchNorm statistics are part of the target, as the teacher's own)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenLayer:
        return super().train(False)

    @torch.no_grad()
    def forward(self, features: Tensor) -> Tensor:
        return self.layer(features)


def _next_block_path(teacher: Teacher) -> tuple[str, int]:
    """The module path of the stage after the teacher's highest layer (its first block is
    ``[0]``): ``layerN`` -> ``layer{N+1}`` (ResNets), ``blocks.K`` -> ``blocks.{K+1}``
    (EfficientNet, MobileNet)."""
    last = teacher.encoder.feature_info.module_name()[-1]
    for prefix in ("layer", "blocks."):
        if last.startswith(prefix) and last[len(prefix) :].isdigit():
            return f"{prefix}{int(last[len(prefix) :]) + 1}", 0
    raise KDADError(
        f"model.extra_source=next_conv|next_block: the stage after {last!r} of this teacher is not "
        "known (ResNet and EfficientNet/MobileNet teachers are); use model.extra_source=random"
    )


def _first_conv(block: nn.Module) -> nn.Sequential:
    """A block's first convolution with its BatchNorm and activation (ResNet basic/bottleneck
    blocks: conv1-bn1-act1; timm's MBConv: conv_pw-bn1, BatchNormAct2d holding the ReLU6;
    depthwise-separable blocks: conv_dw-bn1)."""
    for conv, norm, act in (
        ("conv1", "bn1", "act1"),
        ("conv_pw", "bn1", None),
        ("conv_dw", "bn1", None),
    ):
        if isinstance(getattr(block, conv, None), nn.Conv2d) and hasattr(block, norm):
            layers = [getattr(block, conv), getattr(block, norm)]
            if act is not None:
                layers.append(getattr(block, act))
            return nn.Sequential(*layers)
    raise KDADError(
        f"model.extra_source=next_conv: no first conv found in the teacher's {type(block).__name__}; "
        "use model.extra_source=next_block or random"
    )


def _next_stage_layer(
    teacher: Teacher,
    backbone: str,
    form: str,
    pretrained: bool,
    weights_path: str | None,
) -> nn.Module:
    """The teacher's next-stage block (``form="next_block"``) or its first conv (``next_conv``),
    from a network built with the teacher's weights (``pretrained``/``weights_path``) or with a
    random init (the student's copy)."""
    indices = tuple(teacher.encoder.feature_info.out_indices)
    path, index = _next_block_path(teacher)
    try:
        network = create_feature_extractor(
            backbone, (*indices, indices[-1] + 1), pretrained, weights_path
        )
        block = network.get_submodule(path)[index]
    except (AssertionError, AttributeError, IndexError, ValueError) as exc:
        raise KDADError(
            f"model.extra_source={form}: {backbone} has no stage after model.layers' last one "
            f"({type(exc).__name__}); use fewer/earlier layers or model.extra_source=random"
        ) from None
    return block if form == "next_block" else _first_conv(block)


@torch.no_grad()
def _output_shape(layer: nn.Module, channels: int, size: int = 32) -> tuple[int, int]:
    """(channels, stride) of ``layer`` on a ``channels``-channel map, probed in eval mode."""
    was_training = layer.training
    layer.eval()
    out = layer(torch.zeros(1, channels, size, size))
    layer.train(was_training)
    return out.shape[1], size // out.shape[-1]


class HKT(DistillationModel):
    """Frozen teacher, CBAM student, per-level projectors onto the teacher's highest layer.

    Args:
        backbone: timm name of teacher and student (default ``wide_resnet50_2.tv_in1k``).
        layers: teacher/student stages; the last is the "highest feature layer" (S1).
        pretrained, weights_path: teacher weights (see :class:`Teacher`).
        alignment: ``cross`` (every S_l -> P_l -> T_top), ``same`` (S_l <-> T_l) or ``both``.
        cross_scale: where a cross pair is compared: ``top`` (P_l brings S_l down to T_top's
            resolution) or ``level`` (P_l keeps S_l's resolution, its conv steps at stride 1,
            and T_top is resized to it, bilinearly, parameter-free: a multi-scale map).
        projectors: S2's projectors; ``False`` is valid only with ``alignment="same"``.
        cbam, cbam_reduction, cbam_kernel_size: CBAM in the student (S3).
        extra_layers: HKT+ (S4): a frozen layer on the teacher's top layer and a trainable one
            on the student's, forming a new highest level of each network.
        extra_source: where HKT+'s layers come from: ``random`` (a frozen seeded linear conv;
            the student's a linear conv), ``next_conv`` (the default: the teacher's
            next pretrained conv layer) or ``next_block`` (its next pretrained block).
        extra_kernel_size, extra_seed: kernel and seed of the ``random`` form's convolutions.
        loss: per-position distance of the training loss (``cosine``, ``normalized_l2``, ``l2``).
        distance, anomaly_map: see :class:`DistillationModel`.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[int | str] = (1, 2, 3),
        pretrained: bool = True,
        weights_path: str | None = None,
        alignment: Alignment | str = "cross",
        cross_scale: CrossScale | str = "top",
        projectors: bool = True,
        cbam: bool = True,
        cbam_reduction: int = 16,
        cbam_kernel_size: int = 7,
        extra_layers: bool = False,
        extra_source: ExtraSource | str = "next_conv",
        extra_kernel_size: int = 1,
        extra_seed: int = 0,
        loss: Distance | str = "cosine",
        distance: Distance | str = "cosine",
        anomaly_map: Mapping | None = None,
    ) -> None:
        super().__init__(distance, anomaly_map)
        alignment = choice(Alignment, alignment, "model.alignment")
        cross_scale = choice(CrossScale, cross_scale, "model.cross_scale")
        if not projectors and alignment != "same":
            raise KDADError(
                f"model.projectors=false with model.alignment={alignment}: cross-layer pairs need "
                "projectors; use model.alignment=same (which builds none) or model.projectors=true"
            )
        extra_source = choice(ExtraSource, extra_source, "model.extra_source")
        loss = choice(Distance, loss, "model.loss")
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
        self.extra_source = extra_source if extra_layers else None
        self.teacher_extra: nn.Module | None = None
        self.student_extra: nn.Module | None = None
        if extra_layers:
            if extra_source == "random":
                self.teacher_extra = FrozenRandomConv(top, extra_kernel_size, extra_seed)
                self.student_extra = nn.Conv2d(
                    top, top, extra_kernel_size, padding=extra_kernel_size // 2, bias=True
                )
                stride = 1
            else:
                self.teacher_extra = FrozenLayer(
                    _next_stage_layer(
                        self.teacher, backbone, extra_source, pretrained, weights_path
                    )
                )
                self.student_extra = _next_stage_layer(
                    self.teacher, backbone, extra_source, False, None
                )
                top, stride = _output_shape(self.student_extra, top)
            channels.append(top)
            reductions = [*reductions, reductions[-1] * stride]

        self.pairing, self.cross_scale = alignment, cross_scale
        # Only the pairs used are built: ``same`` has no projector (no dead parameters).
        # cross_scale=top: each projector brings its level down to the top layer's resolution;
        # level: the same projector with stride-1 steps keeps the level's resolution, and the
        # top layer is resized to it, parameter-free (the target has nothing to train).
        self.projectors = (
            nn.ModuleList(
                Projector(c, top, reductions[-1] // r, keep_resolution=cross_scale == "level")
                for c, r in zip(channels, reductions, strict=True)
            )
            if alignment in ("cross", "both")
            else None
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
            for project, level in zip(self.projectors, levels, strict=True):
                prediction = project(level)
                target = top
                if self.cross_scale == "level" and prediction.shape[-2:] != top.shape[-2:]:
                    target = F.interpolate(
                        top, size=prediction.shape[-2:], mode="bilinear", align_corners=False
                    )
                pairs.append((target, prediction))
        return pairs

    def loss(self, pairs: FeaturePairs) -> Tensor:
        """Sum over pairs of the mean per-position ``loss`` distance."""
        measure = DISTANCES[self.loss_distance]
        total = pairs[0][0].new_zeros(())
        for target, prediction in pairs:
            total = total + measure(target, prediction).mean()
        return total


__all__ = [
    "ALIGNMENTS",
    "CROSS_SCALES",
    "EXTRA_SOURCES",
    "HKT",
    "Alignment",
    "AttentionStudent",
    "CrossScale",
    "ExtraSource",
    "FrozenLayer",
    "FrozenRandomConv",
]
