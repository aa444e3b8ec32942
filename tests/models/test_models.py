"""RD4AD and STFPM as plain nn.Modules: shapes, frozen teachers, gradients, parameter counts."""

from __future__ import annotations

import pytest
import torch

from kdad.errors import KDADError
from kdad.models.rd4ad import RD4AD, reverse_distillation_loss
from kdad.models.stfpm import STFPM, pyramid_matching_loss


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("backbone", "bottleneck", "decoder"),
    [
        ("wide_resnet50_2", 67_277_824, 24_917_504),  # the official code's counts
        ("resnet18", 12_205_312, 3_703_168),
    ],
)
def test_rd4ad_trainable_parameters_match_official_code(
    backbone: str, bottleneck: int, decoder: int
) -> None:
    model = RD4AD(backbone, pretrained=False)
    assert _count(model.bn) == bottleneck
    assert _count(model.decoder) == decoder
    assert model.num_parameters(trainable=True) == bottleneck + decoder
    assert _count(model.teacher) == 0


@pytest.mark.parametrize(
    ("backbone", "size", "channels"),
    [
        ("resnet18", 64, (64, 128, 256)),
        ("wide_resnet50_2", 64, (256, 512, 1024)),
        ("efficientnet_b0", 64, (24, 40, 112)),
    ],
)
def test_rd4ad_shapes(backbone: str, size: int, channels: tuple[int, ...]) -> None:
    model = RD4AD(backbone, pretrained=False).eval()
    images = torch.randn(2, 3, size, size)
    pairs = model(images)
    assert [t.shape[1] for t, _ in pairs] == list(channels)
    for target, prediction in pairs:
        assert target.shape == prediction.shape
    maps, scores = model.predict(images)
    assert maps.shape == (2, 1, size, size)
    assert scores.shape == (2,)


def test_stfpm_shapes() -> None:
    model = STFPM("resnet18", pretrained=False).eval()
    images = torch.randn(3, 3, 64, 64)
    pairs = model(images)
    assert [t.shape for t, _ in pairs] == [s.shape for _, s in pairs]
    maps, scores = model.predict(images)
    assert maps.shape == (3, 1, 64, 64) and scores.shape == (3,)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RD4AD("resnet18", pretrained=False),
        lambda: STFPM("resnet18", pretrained=False),
    ],
)
def test_only_student_gets_gradients_and_teacher_stays_eval(make) -> None:
    model = make()
    model.train()
    assert not model.teacher.training
    assert all(not m.training for m in model.teacher.modules())
    teacher_bn = next(m for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    running_mean = teacher_bn.running_mean.clone()
    loss = model.loss(model(torch.randn(4, 3, 64, 64)))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    student = [p for p in model.parameters() if p.requires_grad]
    assert student and any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    # The teacher's BatchNorm statistics did not move in train mode.
    assert torch.equal(teacher_bn.running_mean, running_mean)


def test_rd_loss_is_official_formula() -> None:
    t = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    s = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    expected = sum(
        (1 - torch.nn.functional.cosine_similarity(a.view(2, -1), b.view(2, -1))).mean()
        for a, b in zip(t, s, strict=True)
    )
    torch.testing.assert_close(reverse_distillation_loss(list(zip(t, s, strict=True))), expected)


def test_stfpm_loss_matches_eq2() -> None:
    t, s = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    tn, sn = t / t.norm(dim=1, keepdim=True), s / s.norm(dim=1, keepdim=True)
    per_image = 0.5 * ((tn - sn) ** 2).sum(dim=(1, 2, 3)) / (3 * 5)
    torch.testing.assert_close(pyramid_matching_loss([(t, s)], 0.5), per_image.mean())


def test_rd_needs_three_layers() -> None:
    with pytest.raises(KDADError, match="exactly 3"):
        RD4AD("resnet18", layers=[1, 2], pretrained=False)


def test_unknown_backbone_is_a_user_error() -> None:
    with pytest.raises(KDADError, match="not a timm model"):
        STFPM("resnet_nonexistent", pretrained=False)


def test_layers_by_module_name() -> None:
    model = STFPM("resnet18", layers=["layer1", "layer2", "layer3"], pretrained=False)
    assert model.teacher.channels == [64, 128, 256]


def test_pretrained_without_network_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KDADError) as info:
        STFPM("resnet18.tv_in1k", pretrained=True)
    message = str(info.value)
    assert "model.pretrained=false" in message and "model.weights_path" in message
    assert "\n" not in message


def test_local_weights_file_is_loaded(tmp_path) -> None:
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = STFPM("resnet18", pretrained=True, weights_path=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(model.teacher.encoder.conv1.weight, source.conv1.weight)
    with pytest.raises(KDADError, match="no such file"):
        STFPM("resnet18", weights_path=str(tmp_path / "missing.pth"))


def test_stfpm_student_residual_branches_start_switched_on() -> None:
    """The official student is a torchvision resnet18: every BatchNorm scale starts at 1.

    timm's default ``zero_init_last=True`` would set the last BatchNorm of every residual
    block (``bn2`` of a BasicBlock) to 0, i.e. each block would start as the identity.
    """
    model = STFPM("resnet18", pretrained=False)
    blocks = [
        block for name in ("layer1", "layer2", "layer3") for block in getattr(model.student, name)
    ]
    assert len(blocks) == 6
    for block in blocks:
        assert torch.equal(block.bn2.weight, torch.ones_like(block.bn2.weight))
    for module in model.student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


def test_attention_pools_equal_cbams_formulas_in_value_and_gradient() -> None:
    """CBAM's four descriptors (mean/max over positions, mean/max over channels) come from one
    fused pass with a hand-written backward: the same values and gradients as autograd's."""
    from kdad.models.components.attention import (
        ChannelAttention,
        SpatialAttention,
        pooled_descriptors,
    )

    torch.manual_seed(0)
    for memory in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 5, 4, 6, dtype=torch.float64).contiguous(memory_format=memory)
        x.requires_grad_()
        reference = (
            x.mean(dim=(2, 3)),
            x.flatten(2).max(dim=2).values,
            x.mean(dim=1),
            x.max(dim=1).values,
        )
        fused = pooled_descriptors(x)
        weights = [torch.randn_like(r) for r in reference]
        for a, b in zip(fused, reference, strict=True):
            torch.testing.assert_close(a, b)
        grads = [
            torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights, strict=True)), x)[0]
            for out in (fused, reference)
        ]
        torch.testing.assert_close(grads[0], grads[1])
    channel, spatial = ChannelAttention(8, reduction=2), SpatialAttention(7)
    x = torch.randn(2, 8, 5, 5)
    mlp = channel.mlp
    expected_c = torch.sigmoid(
        mlp(x.mean(dim=(2, 3), keepdim=True)) + mlp(x.amax(dim=(2, 3), keepdim=True))
    )
    torch.testing.assert_close(channel(x), expected_c)
    pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    torch.testing.assert_close(spatial(x), torch.sigmoid(spatial.conv(pooled)))
