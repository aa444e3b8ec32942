"""HKT / HKT+: shapes, the ablation switches (each changes one thing, builds only what it uses),
frozen teachers, HKT+'s layers from the teacher's next pretrained stage, a non-collapsing HKT+
target, configs, and short CLI runs (random resnet18 and pretrained tf_efficientnet_lite0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kdad.config import CONFIG_DIR
from kdad.errors import KDADError
from kdad.lightning.module import build_net
from kdad.models.components.attention import CBAM
from kdad.models.components.backbone import create_feature_extractor
from kdad.models.components.projector import Projector
from kdad.models.hkt import HKT, FrozenLayer, FrozenRandomConv


def small(**kwargs) -> HKT:
    return HKT(**{"backbone": "resnet18", "pretrained": False, **kwargs})


def count(module: torch.nn.Module | None, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def instances(model: torch.nn.Module, cls: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "channels", "top_size"),
    [
        ("resnet18", (64, 128, 256), 4),
        ("wide_resnet50_2", (256, 512, 1024), 4),
        ("efficientnet_b0", (24, 40, 112), 4),  # not a FeatureListNet in timm: rebuilt as one
    ],
)
def test_shapes_for_several_backbones(
    backbone: str, channels: tuple[int, ...], top_size: int
) -> None:
    model = HKT(backbone, pretrained=False, alignment="both").eval()
    images = torch.randn(2, 3, 64, 64)
    targets, levels = model.teacher_features(images), model.student_features(images)
    assert [t.shape[1] for t in targets] == list(channels)
    assert [s.shape for s in levels] == [t.shape for t in targets]
    pairs = model(images)
    assert len(pairs) == 6
    for target, prediction in pairs:
        assert target.shape == prediction.shape
    # Cross pairs: every student level projected to the teacher's highest layer.
    for target, _ in pairs[3:]:
        assert target.shape == (2, channels[-1], top_size, top_size)
    maps, scores = model.predict(images)
    assert maps.shape == (2, 1, 64, 64) and scores.shape == (2,)
    assert torch.isfinite(maps).all()


def test_projector_structure() -> None:
    projector = Projector(64, 256, downsample=4)
    strided = [m for m in projector if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [(c.in_channels, c.out_channels) for c in strided] == [(64, 128), (128, 256)]
    assert isinstance(projector[-1], torch.nn.Conv2d) and projector[-1].kernel_size == (1, 1)
    assert projector(torch.randn(2, 64, 16, 16)).shape == (2, 256, 4, 4)
    assert len(Projector(256, 256, downsample=1)) == 1  # same shape: the 1x1 conv only
    with pytest.raises(KDADError, match="power of two"):
        Projector(64, 256, downsample=3)


# --- the switches -------------------------------------------------------------------------


def test_cbam_switch() -> None:
    with_cbam, without = small(cbam=True), small(cbam=False)
    assert len(instances(with_cbam.student, CBAM)) == 3
    assert not instances(without, CBAM) and without.student.attention is None
    cbam_params = sum(count(m) for m in instances(with_cbam, CBAM))
    assert cbam_params > 0
    assert (
        with_cbam.num_parameters(trainable=True) - without.num_parameters(trainable=True)
        == cbam_params
    )


def test_cbam_output_feeds_the_next_stage() -> None:
    model = small().eval()
    images = torch.randn(2, 3, 64, 64)
    before = model.student_features(images)
    with torch.no_grad():
        model.student.attention[0].spatial.conv.weight.mul_(-3.0)
    after = model.student_features(images)
    assert not torch.allclose(before[0], after[0])
    assert not torch.allclose(before[1], after[1])  # level 2 sees level 1's attended features


def test_projectors_false_is_an_error_with_cross_pairs_and_a_no_op_with_same() -> None:
    for alignment in ("cross", "both"):
        with pytest.raises(
            KDADError, match=r"model\.projectors=false with model\.alignment"
        ) as info:
            small(projectors=False, alignment=alignment)
        assert "\n" not in str(info.value)
    same, same_without = small(alignment="same"), small(alignment="same", projectors=False)
    assert same.pair_names == same_without.pair_names == ["same:1", "same:2", "same:3"]
    assert same.num_parameters(True) == same_without.num_parameters(True)


@pytest.mark.parametrize("extra_layers", [False, True])
def test_same_alignment_builds_no_projectors(extra_layers: bool) -> None:
    cross = small(alignment="cross", extra_layers=extra_layers)
    same = small(alignment="same", extra_layers=extra_layers)
    assert same.projectors is None and not instances(same, Projector)
    levels = 3 + extra_layers
    assert len(instances(cross, Projector)) == levels
    projector_params = sum(count(p) for p in instances(cross, Projector))
    assert cross.num_parameters(True) - same.num_parameters(True) == projector_params


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alignment": "cross"},
        {"alignment": "same"},
        {"alignment": "both"},
        {"alignment": "same", "extra_layers": True},
        {"extra_layers": True, "extra_source": "next_conv"},
        {"extra_layers": True, "extra_source": "random"},
        {"extra_layers": True, "extra_source": "next_block", "cbam": False},
    ],
)
def test_every_trainable_parameter_is_used(kwargs: dict) -> None:
    """No dead trainable parameters (they would inflate params_trainable): one backward pass
    reaches every parameter that requires grad."""
    model = small(**kwargs)
    model.train()
    model.loss(model(torch.randn(2, 3, 64, 64))).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, dead


@pytest.mark.parametrize(
    ("alignment", "names"),
    [
        ("cross", ["cross:1->3", "cross:2->3", "cross:3->3"]),
        ("same", ["same:1", "same:2", "same:3"]),
        ("both", ["same:1", "same:2", "same:3", "cross:1->3", "cross:2->3", "cross:3->3"]),
    ],
)
def test_pairs_per_alignment_mode(alignment: str, names: list[str]) -> None:
    model = small(alignment=alignment).eval()
    assert model.pair_names == names
    images = torch.randn(2, 3, 64, 64)
    pairs = model(images)
    assert len(pairs) == len(names)
    targets = model.teacher_features(images)
    for name, (target, _) in zip(names, pairs, strict=True):
        level = name.split(":")[1]
        expected = targets[-1] if name.startswith("cross") else targets[int(level) - 1]
        torch.testing.assert_close(target, expected)


def test_extra_layers_only_with_hkt_plus() -> None:
    hkt, plus = small(), small(extra_layers=True)
    assert hkt.teacher_extra is None and hkt.student_extra is None and hkt.extra_source is None
    # The default reading adds capacity: the teacher's next pretrained conv, a trainable
    # non-linear student copy (not the linear re-parametrisation "random").
    assert plus.extra_source == "next_conv"
    assert isinstance(plus.teacher_extra, FrozenLayer)
    assert any(isinstance(m, torch.nn.ReLU) for m in plus.student_extra.modules())
    assert plus.pair_names == [
        "cross:1->extra",
        "cross:2->extra",
        "cross:3->extra",
        "cross:extra->extra",
    ]


def test_random_extra_layers_are_the_old_linear_pair() -> None:
    hkt, plus = small(), small(extra_layers=True, extra_source="random")
    assert isinstance(plus.teacher_extra, FrozenRandomConv)
    assert isinstance(plus.student_extra, torch.nn.Conv2d)
    c, k = 256, 1
    # Trainable: the student-side conv (with bias) and the extra level's 1x1 projector.
    assert plus.num_parameters(True) - hkt.num_parameters(True) == (c * c * k * k + c) + (c * c + c)
    # Frozen: the teacher-side conv.
    assert plus.num_parameters(False) - hkt.num_parameters(False) == c * c * k * k
    # The teacher-side init is fixed by the seed.
    again = small(extra_layers=True, extra_source="random")
    torch.testing.assert_close(plus.teacher_extra.weight, again.teacher_extra.weight)
    other = small(extra_layers=True, extra_source="random", extra_seed=1)
    assert not torch.equal(plus.teacher_extra.weight, other.teacher_extra.weight)


@pytest.mark.parametrize(
    ("source", "channels", "top_size"),
    [("next_conv", 512, 2), ("next_block", 512, 2)],  # resnet18 layer4[0]: 3x3 stride 2
)
def test_next_stage_extra_layers_for_resnet(source: str, channels: int, top_size: int) -> None:
    model = small(extra_layers=True, extra_source=source, alignment="both").eval()
    images = torch.randn(2, 3, 64, 64)
    targets, levels = model.teacher_features(images), model.student_features(images)
    assert targets[-1].shape == levels[-1].shape == (2, channels, top_size, top_size)
    for target, prediction in model(images):
        assert target.shape == prediction.shape
    assert (targets[-1] >= 0).all()  # after layer4's ReLU, as the student's (both non-negative)


def _lite0_plus(**kwargs) -> HKT:
    return HKT(
        "tf_efficientnet_lite0", pretrained=True, extra_layers=True, alignment="both", **kwargs
    )


def test_next_conv_extra_layers_for_pretrained_efficientnet_lite() -> None:
    """Teacher side: blocks.5[0]'s expansion conv + BN + ReLU6, with the ImageNet weights,
    frozen; student side: the same layer randomly initialised, trainable, non-linear."""
    model = _lite0_plus(extra_source="next_conv")
    assert isinstance(model.teacher_extra, FrozenLayer)
    pretrained = create_feature_extractor("tf_efficientnet_lite0", (1, 2, 3, 4), pretrained=True)
    reference = pretrained.blocks[5][0]
    conv, bn = model.teacher_extra.layer[0], model.teacher_extra.layer[1]
    torch.testing.assert_close(conv.weight, reference.conv_pw.weight, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, reference.bn1.running_var, rtol=0, atol=0)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (112, 672, (1, 1))
    assert not any(p.requires_grad for p in model.teacher_extra.parameters())
    model.train()
    assert not any(m.training for m in model.teacher_extra.modules())
    student = model.student_extra
    assert all(p.requires_grad for p in student.parameters()) and student.training
    assert not torch.equal(student[0].weight, conv.weight)
    assert any(isinstance(m, torch.nn.ReLU6) for m in student.modules())  # non-linear
    images = torch.randn(2, 3, 64, 64)
    targets, levels = model.teacher_features(images), model.student_features(images)
    assert targets[-1].shape == levels[-1].shape == (2, 672, 4, 4)
    # Signed teacher stages (EfficientNet: linear stage outputs) below a ReLU6 extra level.
    assert (targets[2] < 0).float().mean() > 0.2 and (targets[-1] >= 0).all()
    model.loss(model(images)).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in model.teacher_extra.parameters())


def test_next_block_extra_layers_for_pretrained_efficientnet_lite() -> None:
    model = _lite0_plus(extra_source="next_block")
    pretrained = create_feature_extractor("tf_efficientnet_lite0", (1, 2, 3, 4), pretrained=True)
    teacher_block = model.teacher_extra.layer
    torch.testing.assert_close(
        teacher_block.conv_pwl.weight, pretrained.blocks[5][0].conv_pwl.weight, rtol=0, atol=0
    )
    assert all(p.requires_grad for p in model.student_extra.parameters())
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    targets, levels = model.teacher_features(images), model.student_features(images)
    assert targets[-1].shape == levels[-1].shape == (2, 192, 2, 2)  # MBConv stride 2
    assert (targets[-1] < 0).any()  # linear block output: signed, as the student's
    assert (levels[-1] < 0).any()


def test_user_errors() -> None:
    with pytest.raises(KDADError, match=r"model\.alignment"):
        small(alignment="diagonal")
    with pytest.raises(KDADError, match=r"model\.loss"):
        small(loss="huber")
    with pytest.raises(KDADError, match="fine to coarse"):
        small(layers=[3, 2, 1])
    with pytest.raises(KDADError, match=r"model\.extra_source"):
        small(extra_layers=True, extra_source="previous")
    with pytest.raises(KDADError, match="no stage after"):
        small(
            layers=[2, 3, 4], extra_layers=True, extra_source="next_conv"
        )  # layer4 is resnet18's last stage


# --- frozen teacher -----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [None, "random", "next_conv", "next_block"])
def test_teacher_gets_no_gradient_and_stays_in_eval(extra: str | None) -> None:
    extra_layers = extra is not None
    model = small(extra_layers=extra_layers, extra_source=extra or "next_conv", alignment="both")
    model.train()
    frozen = [model.teacher] + ([model.teacher_extra] if extra_layers else [])
    assert all(not m.training for part in frozen for m in part.modules())
    assert model.student.training
    norms = [m for part in frozen for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    running_means = [bn.running_mean.clone() for bn in norms]
    model.loss(model(torch.randn(4, 3, 64, 64))).backward()
    assert all(p.grad is None and not p.requires_grad for part in frozen for p in part.parameters())
    for bn, running_mean in zip(norms, running_means, strict=True):
        assert torch.equal(bn.running_mean, running_mean)
    trainable = [model.student, model.projectors, *([model.student_extra] if extra_layers else [])]
    for part in trainable:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is not None for m in instances(model.student, CBAM) for p in m.parameters())


@pytest.mark.parametrize("source", ["random", "next_conv"])
def test_hkt_plus_target_does_not_collapse_during_training(source: str) -> None:
    torch.manual_seed(0)
    model = small(extra_layers=True, extra_source=source)
    images = torch.rand(4, 3, 64, 64)

    def target_channel_std() -> torch.Tensor:
        with torch.no_grad():
            return model.teacher_features(images)[-1].std(dim=(0, 2, 3))

    frozen = [p.clone() for p in model.teacher_extra.parameters()]
    std_before = target_channel_std()
    # The optimiser gets what DistillationModule.configure_optimizers gives it.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model.loss(model(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    std_after = target_channel_std()
    assert losses[-1] < 0.7 * losses[0]  # the student does learn...
    for p, before in zip(model.teacher_extra.parameters(), frozen, strict=True):
        assert torch.equal(p, before)  # ...but the target cannot move
    torch.testing.assert_close(std_after, std_before)
    if source == "random":
        # Every channel of the target varies over the batch (a fixed random projection, no ReLU).
        assert std_after.min() > 0.1 * std_after.mean() > 0
    else:
        assert std_after.mean() > 0


# --- configs ------------------------------------------------------------------------------


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_model_configs_build_hkt_and_hkt_plus() -> None:
    from omegaconf import OmegaConf

    for name, extra in (("hkt", False), ("hkt_plus", True)):
        cfg = _compose([f"model={name}", "model.backbone=resnet18", "model.pretrained=false"])
        assert cfg.model_name == name and cfg.model.extra_layers is extra
        assert cfg.model.alignment == "cross" and cfg.model.projectors and cfg.model.cbam
        assert cfg.model.extra_source == "next_conv" and cfg.model.cross_scale == "top"
        net = build_net(OmegaConf.to_container(cfg.model, resolve=True))
        assert isinstance(net, HKT) and (net.teacher_extra is not None) is extra


def test_hkt_both_is_hkt_with_both_pair_sets_and_nothing_else() -> None:
    """kdad's variant model=hkt_both is what the photos study runs under its name at the
    pinned commit (study.py's spelling: model=hkt model.alignment=both, and the name), and
    what the switch study measured as model=hkt model.alignment=both."""
    import importlib.util

    from omegaconf import OmegaConf

    path = Path(__file__).parents[2] / "experiments" / "photos" / "study.py"
    spec = importlib.util.spec_from_file_location("photos_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    spelled = study.SPELLED["hkt_both"]
    assert [o for o in spelled if not o.startswith("model_name=")] == [
        "model=hkt",
        "model.alignment=both",
    ]
    both, as_run = (
        OmegaConf.to_container(_compose(overrides), resolve=False)
        for overrides in (["model=hkt_both"], spelled)
    )
    del both["hydra"], as_run["hydra"]
    assert both == as_run and both["model_name"] == "hkt_both"
    assert both["model"]["alignment"] == "both" and both["model"]["projectors"]


def test_ablation_experiment_is_a_multirun_grid() -> None:
    cfg = _compose(["experiment=hkt_ablation"])
    assert cfg.model_name == "hkt"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    # Each axis changes one thing: an explicit alignment axis, no projectors axis (projectors
    # off is only valid with alignment=same, where none are built).
    assert "model.projectors" not in params
    assert sorted(params["model.alignment"].split(",")) == ["both", "cross", "same"]
    for key in ("model.cbam", "model.extra_layers"):
        assert sorted(params[key].split(",")) == ["false", "true"]
    assert len(str(params["data.category"]).split(",")) >= 2


# --- learning on synthetic data -----------------------------------------------------------


@pytest.fixture(scope="session")
def kdad_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kdad_cache")


RANDOM_RESNET18 = ("model.backbone=resnet18", "model.pretrained=false")
PRETRAINED_LITE0 = ("model.backbone=tf_efficientnet_lite0", "model.pretrained=true")


def train_cli(
    run_dir: Path, cache: Path, *overrides: str, teacher: tuple[str, ...] = RANDOM_RESNET18
) -> dict:
    command = [
        sys.executable,
        "-m",
        "kdad.cli.train",
        *teacher,
        "data.category=checker",
        "data.image_size=64",
        "data.synthetic.resolution=64",
        "data.num_workers=0",
        "trainer.max_epochs=6",
        "trainer.accelerator=cpu",
        "logger=none",
        "callbacks=none",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "KDAD_CACHE_DIR": str(cache)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


# Slow (make test-all): tests/models/test_learning.py trains HKT and HKT+ through the same
# command on every run of the default suite; this one adds the ResNet teacher.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["hkt", "hkt_plus"])
def test_short_run_separates_anomalies(model: str, tmp_path: Path, kdad_cache: Path) -> None:
    metrics = train_cli(tmp_path, kdad_cache, f"model={model}")
    assert metrics["model"] == model
    # Measured (6 epochs, seeds 111 and 1): image AUROC 0.77-0.79 (HKT), 0.78 (HKT+);
    # pixel AUROC 0.57-0.73. Chance is 0.5.
    assert metrics["image_auroc"] > 0.7, metrics
    assert metrics["pixel_auroc"] > 0.55, metrics


def test_short_hkt_plus_run_with_the_pretrained_lite0_teacher(
    tmp_path: Path, kdad_cache: Path
) -> None:
    """HKT+ (extra layers from the teacher's next pretrained conv) with the packaged ImageNet
    tf_efficientnet_lite0 teacher, offline."""
    metrics = train_cli(
        tmp_path,
        kdad_cache,
        "model=hkt_plus",
        "model.extra_source=next_conv",
        "trainer.max_epochs=3",
        teacher=PRETRAINED_LITE0,
    )
    assert metrics["model"] == "hkt_plus"
    # Measured (checker, 64 px, 3 epochs, seeds 111 and 1): image AUROC 0.80 / 0.78, pixel
    # AUROC 0.79 / 0.77; ~20 s of training on 2 CPU cores.
    assert metrics["image_auroc"] > 0.7, metrics
    assert metrics["pixel_auroc"] > 0.7, metrics


# --- the cross pairs at every scale (model.cross_scale) --------------------------------------


def test_cross_scale_level_compares_the_top_layer_at_every_levels_resolution() -> None:
    top, level = small(cross_scale="top"), small(cross_scale="level")
    images = torch.randn(2, 3, 64, 64)
    assert [t.shape[-1] for t, _ in top(images)] == [4, 4, 4]
    pairs = level(images)
    assert [(t.shape[-1], p.shape[-1]) for t, p in pairs] == [(16, 16), (8, 8), (4, 4)]
    assert all(t.shape[1] == 256 for t, _ in pairs)  # the top layer's channels at each level
    # The same projector steps at stride 1: the same parameters, nothing on the teacher side.
    assert level.num_parameters(True) == top.num_parameters(True)
    assert level.num_parameters(False) == top.num_parameters(False)
    with pytest.raises(KDADError, match="cross_scale"):
        small(cross_scale="bottom")


def test_cross_scale_level_target_cannot_collapse_and_a_planted_defect_is_found() -> None:
    """Training cannot move the multi-scale target (the top layer resized, parameter-free,
    from the frozen teacher): its variance stays at its floor, and after a short training on
    normal textures a planted defect scores above its surroundings."""
    from kdad.data import synthetic as synth

    torch.manual_seed(0)
    model = HKT("tf_efficientnet_lite0", pretrained=True, cross_scale="level")

    def tensor(array) -> torch.Tensor:
        x = torch.from_numpy(array).permute(2, 0, 1).float() / 255
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        return (x - mean[:, None, None]) / std[:, None, None]

    normal = torch.stack(
        [tensor(synth.render_sample("stripes", "train", i, resolution=64)[0]) for i in range(16)]
    )

    def target_std() -> list[float]:
        with torch.no_grad():
            return [float(t.std(dim=(0, 2, 3)).mean()) for t, _ in model.eval()(normal)]

    floor = target_std()
    assert min(floor) > 0.05
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for step in range(60):
        model.train()
        batch = normal[(step * 8) % 16 : (step * 8) % 16 + 8]
        loss = model.loss(model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if step % 20 == 19:
            assert target_std() == pytest.approx(floor)  # the target never moves
    assert losses[-1] < 0.7 * losses[0]
    image, mask, _ = synth.render_sample("stripes", "test", 0, "color_spot", resolution=64)
    model.eval()
    with torch.no_grad():
        anomaly_map = model.predict(tensor(image)[None])[0][0, 0]
    inside, outside = anomaly_map[torch.from_numpy(mask)], anomaly_map[~torch.from_numpy(mask)]
    assert inside.mean() > 1.5 * outside.mean()
