"""The teacher-feature cache: filled once, reused, within its budget, and results unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from inprocess import load, train

from kdad.errors import KDADError
from kdad.lightning.module import DistillationModule
from kdad.lightning.teacher_cache import TeacherFeatureCache

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


def features(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 8, 4, 4, generator=g)]


def test_lookup_misses_until_every_index_is_stored_then_returns_the_stored_rows() -> None:
    cache = TeacherFeatureCache(capacity=6, max_bytes=float("inf"))
    assert cache.lookup(torch.tensor([0, 1])) is None
    first = features(3, seed=0)
    cache.store(torch.tensor([4, 0, 2]), first)
    assert cache.lookup(torch.tensor([0, 1])) is None  # 1 is not cached yet
    got = cache.lookup(torch.tensor([2, 4, 0]))
    assert got is not None
    for level, stored in zip(got, first, strict=True):
        assert torch.equal(level, stored[[2, 0, 1]])
    assert cache.nbytes == 6 * (4 * 8 * 8 + 8 * 4 * 4) * 4


def test_channels_last_features_come_back_channels_last() -> None:
    cache = TeacherFeatureCache(capacity=2, max_bytes=float("inf"))
    given = [f.contiguous(memory_format=torch.channels_last) for f in features(2, seed=1)]
    cache.store(torch.tensor([0, 1]), given)
    got = cache.lookup(torch.tensor([1, 0]))
    assert got is not None
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in got)
    assert torch.equal(got[0], given[0][[1, 0]])


def test_over_budget_turns_itself_off(caplog: pytest.LogCaptureFixture) -> None:
    per_sample = (4 * 8 * 8 + 8 * 4 * 4) * 4
    cache = TeacherFeatureCache(capacity=100, max_bytes=per_sample * 99)
    with caplog.at_level(logging.INFO, logger="kdad"):
        cache.store(torch.tensor([0, 1]), features(2, seed=0))
    assert not cache.enabled and cache.levels is None
    assert cache.lookup(torch.tensor([0])) is None
    assert "teacher cache off" in caplog.text and "teacher_cache_max_gb" in caplog.text


def test_training_step_runs_the_teacher_only_for_unseen_images() -> None:
    model = {
        "_target_": "kdad.models.rd4ad.RD4AD",
        "backbone": "resnet18",
        "pretrained": False,
    }
    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.005}
    module = DistillationModule(model, optimizer, teacher_cache=True)
    module._teacher_cache = TeacherFeatureCache(4, float("inf"))
    calls = []
    original = module.net.teacher_features

    def counting(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(images))
        return original(images)

    module.net.teacher_features = counting  # type: ignore[method-assign]
    images = torch.randn(4, 3, 64, 64)
    batches = [{"image": images[:2], "index": torch.tensor([0, 1])}]
    batches.append({"image": images[2:], "index": torch.tensor([2, 3])})
    for batch in batches + batches[::-1]:  # epoch 1 computes, epoch 2 only looks up
        module._teacher_targets(batch, batch["image"])
    assert calls == [2, 2]
    cached = module._teacher_targets(batches[1], batches[1]["image"])
    assert cached is not None
    for got, expected in zip(cached, original(images[2:]), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_bad_setting_is_a_one_line_error() -> None:
    model = {"_target_": "kdad.models.stfpm.STFPM", "backbone": "resnet18", "pretrained": False}
    optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}
    with pytest.raises(KDADError, match="teacher_cache='sometimes': expected auto, true or false"):
        DistillationModule(model, optimizer, teacher_cache="sometimes")


@pytest.mark.parametrize("model", ["rd4ad", "hkt_plus"])
def test_training_with_and_without_the_cache_ends_with_the_same_weights(
    model: str, inprocess_data_cache: None, tmp_path: Path
) -> None:
    """2 epochs of 4 batches: epoch 2 reads the cache; the weights must not move beyond
    float rounding (a teacher forward in another batch may round differently)."""
    runs = {}
    for cached in ("true", "false"):
        out = tmp_path / cached
        train([f"model={model}", "trainer.max_epochs=2", f"teacher_cache={cached}"], out)
        runs[cached] = load(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert runs["true"].keys() == runs["false"].keys()
    for key, value in runs["true"].items():
        torch.testing.assert_close(value, runs["false"][key], rtol=1e-4, atol=1e-5, msg=key)
