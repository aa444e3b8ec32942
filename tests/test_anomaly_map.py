"""The shared anomaly-map code against scipy and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from kdad.anomaly_map import (
    AnomalyMapGenerator,
    GaussianBlur2d,
    cosine_distance,
    gaussian_kernel_size,
    normalized_l2_distance,
)


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


def test_scores_are_raw_not_squashed() -> None:
    maps = torch.full((1, 1, 4, 4), 7.5)
    assert AnomalyMapGenerator("add", sigma=0).image_score(maps).item() == 7.5


def test_bad_fusion_rejected() -> None:
    with pytest.raises(ValueError, match="fusion"):
        AnomalyMapGenerator("median")
