"""The shared anomaly-map code against scipy and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from kdad.models.anomaly_map import (
    AnomalyMapGenerator,
    GaussianBlur2d,
    cosine_distance,
    gaussian_kernel_size,
    normalized_l2_distance,
)


def _composed_anomaly_map(model: str) -> dict:
    """``model.anomaly_map`` of ``model=<model>`` as kdad-train composes it (schema + YAML)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kdad.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    return OmegaConf.to_container(cfg.model.anomaly_map, enum_to_str=True)


@pytest.mark.parametrize(
    ("sigma", "size"), [(4.0, (64, 64)), (4.0, (20, 9)), (1.5, (33, 47)), (2.0, (3, 3))]
)
def test_gaussian_blur_equals_scipy_reflect(sigma: float, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((2, 1, *size)).astype(np.float64)
    ours = GaussianBlur2d(sigma)(torch.from_numpy(maps).float()).double().numpy()
    for i in range(2):
        reference = gaussian_filter(maps[i, 0], sigma=sigma)  # scipy default: truncate 4, reflect
        np.testing.assert_allclose(ours[i, 0], reference, atol=1e-6)


def test_kernel_size_is_scipys() -> None:
    assert gaussian_kernel_size(4.0) == 33  # RD4AD's sigma=4
    assert GaussianBlur2d(4.0).kernel.numel() == 33


def test_distances() -> None:
    t, s = torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5)
    cos = cosine_distance(t, s)
    expected = 1 - (t * s).sum(1) / (t.norm(dim=1) * s.norm(dim=1))
    torch.testing.assert_close(cos[:, 0], expected, atol=1e-5, rtol=1e-5)
    # STFPM's normalised squared distance is twice the cosine distance.
    torch.testing.assert_close(normalized_l2_distance(t, s), 2 * cos, atol=1e-5, rtol=1e-5)


def test_fusion_modes_and_score() -> None:
    a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8)
    size = (16, 16)
    up = [F.interpolate(x, size=size, mode="bilinear", align_corners=True) for x in (a, b)]
    add = AnomalyMapGenerator("add", sigma=0, align_corners=True)([a, b], size)
    torch.testing.assert_close(add, up[0] + up[1])
    prod = AnomalyMapGenerator("product", sigma=0, align_corners=True)([a, b], size)
    torch.testing.assert_close(prod, up[0] * up[1])
    mean = AnomalyMapGenerator("mean", sigma=0, align_corners=True)([a, b], size)
    torch.testing.assert_close(mean, (up[0] + up[1]) / 2)
    gen = AnomalyMapGenerator("add", sigma=0)
    assert torch.equal(gen.image_score(add), add.flatten(1).amax(1))


@pytest.mark.parametrize(("sigma", "size"), [(4.0, (48, 40)), (1.5, (16, 16))])
def test_generator_smooths_the_fused_map_as_scipy_does(sigma: float, size: tuple[int, int]) -> None:
    """With sigma > 0 the map is scipy's gaussian_filter of the unsmoothed fused map (RD4AD's
    cal_anomaly_map), and the score is that map's maximum: a skipped blur fails here."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 8, 8)
    up = [F.interpolate(x, size=size, mode="bilinear", align_corners=True) for x in (a, b)]
    unsmoothed = (up[0] + up[1]).double().numpy()  # by hand, not by the generator
    gen = AnomalyMapGenerator("add", sigma=sigma, align_corners=True)
    ours = gen([a, b], size)
    for i in range(2):
        reference = gaussian_filter(unsmoothed[i, 0], sigma=sigma)
        assert np.abs(reference - unsmoothed[i, 0]).max() > 1e-3  # the case discriminates
        np.testing.assert_allclose(ours[i, 0].double().numpy(), reference, atol=1e-6)
        assert gen.image_score(ours)[i].item() == pytest.approx(reference.max(), abs=1e-6)


def test_rd4ad_config_smooths_its_maps_with_sigma_4() -> None:
    """model=rd4ad's map: the sum of the per-layer 1 - cos maps, upsampled with
    align_corners=True, then scipy's gaussian_filter with the official sigma 4."""
    from kdad.models.rd4ad import RD4AD

    anomaly_map = _composed_anomaly_map("rd4ad")
    assert anomaly_map["sigma"] == 4.0  # hq-deng/RD4AD test.py: gaussian_filter(sigma=4)
    torch.manual_seed(0)
    model = RD4AD("resnet18", pretrained=False, anomaly_map=anomaly_map).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, scores = model.predict(images)
        pairs = model(images)
    for i in range(2):
        summed = sum(
            F.interpolate(
                cosine_distance(t[i : i + 1].double(), s[i : i + 1].double()),
                size=(64, 64),
                mode="bilinear",
                align_corners=True,
            )[0, 0].numpy()
            for t, s in pairs
        )
        reference = gaussian_filter(summed, sigma=4.0)
        np.testing.assert_allclose(maps[i, 0].double().numpy(), reference, rtol=1e-4, atol=1e-6)
        assert scores[i].item() == pytest.approx(reference.max(), rel=1e-4)


def test_scores_are_raw_not_squashed() -> None:
    maps = torch.full((1, 1, 4, 4), 7.5)
    assert AnomalyMapGenerator("add", sigma=0).image_score(maps).item() == 7.5


def test_bad_fusion_rejected() -> None:
    with pytest.raises(ValueError, match="fusion"):
        AnomalyMapGenerator("median")


def _bilinear_half_pixel(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Straightforward bilinear resize with half-pixel centres and clamped edges, the rule of
    ``cv2.resize(INTER_LINEAR)`` and of ``F.interpolate(align_corners=False)``."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(image.shape[0], size[0])
    x0, x1, wx = axis(image.shape[1], size[1])
    rows = image[y0] * (1 - wy)[:, None] + image[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]


def _stfpm_official_order(layer_maps: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """gdwang08/STFPM ``test()``: every layer to the first layer's size, product, then resize."""
    first = layer_maps[0].shape
    product = np.ones(first)
    for layer_map in layer_maps:
        product = product * _bilinear_half_pixel(layer_map, first)
    return _bilinear_half_pixel(product, size)


def test_bilinear_reference_is_torchs_half_pixel_rule() -> None:
    x = torch.rand(1, 1, 8, 5, dtype=torch.float64)
    for size in [(32, 20), (8, 5), (3, 2)]:
        ours = F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(ours, _bilinear_half_pixel(x[0, 0].numpy(), size), atol=1e-12)


def test_fuse_at_first_layer_is_stfpms_official_order() -> None:
    torch.manual_seed(0)
    layers = [torch.rand(2, 1, 16, 16), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)]
    size = (64, 64)
    gen = AnomalyMapGenerator("product", sigma=0, align_corners=False, fuse_at="first_layer")
    ours = gen(layers, size)
    for i in range(2):
        reference = _stfpm_official_order([m[i, 0].double().numpy() for m in layers], size)
        np.testing.assert_allclose(ours[i, 0].double().numpy(), reference, rtol=1e-5, atol=1e-7)
    # The other order is a different map (the switch fuse_at=image keeps it available).
    other = AnomalyMapGenerator("product", sigma=0, align_corners=False, fuse_at="image")
    assert (other(layers, size) - ours).abs().max() > 1e-3


def test_stfpm_config_uses_the_official_order() -> None:
    from kdad.models.stfpm import STFPM

    anomaly_map = _composed_anomaly_map("stfpm")
    assert anomaly_map["fuse_at"] == "first_layer"
    torch.manual_seed(0)
    model = STFPM("resnet18", pretrained=False, anomaly_map=anomaly_map).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, scores = model.predict(images)
        pairs = model(images)
    for i in range(2):
        layer_maps = [
            normalized_l2_distance(t[i : i + 1].double(), s[i : i + 1].double())[0, 0].numpy()
            for t, s in pairs
        ]
        reference = _stfpm_official_order(layer_maps, (64, 64))
        np.testing.assert_allclose(maps[i, 0].double().numpy(), reference, rtol=1e-4, atol=1e-7)
        assert scores[i].item() == pytest.approx(reference.max(), rel=1e-4)


def test_bad_fuse_at_rejected() -> None:
    with pytest.raises(ValueError, match="fuse_at"):
        AnomalyMapGenerator("product", fuse_at="middle")
