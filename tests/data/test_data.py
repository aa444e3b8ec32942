"""Tests of kdad.data: layouts, transforms, the dataset, the data module and synthetic data."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from fake_trees import (
    BOX,
    BOX_VALUE,
    make_btad_tree,
    make_folder_tree,
    make_mvtec_tree,
    write_image,
)
from PIL import Image

from kdad.data import (
    SUBTLE_DEFECTS,
    SYNTHETIC_CATEGORIES,
    VISIBLE_DEFECTS,
    AnomalyDataModule,
    AnomalyDataset,
    Preprocess,
    Sample,
    btad_samples,
    ensure_synthetic,
    folder_samples,
    load_image,
    load_mask,
    mvtec_samples,
)
from kdad.data import synthetic as synth
from kdad.errors import KDADError

SMALL = {"resolution": 32, "num_train": 3, "num_test_good": 2, "num_test_per_defect": 1}


def raises_one_line(match_parts: list[str], func, *args, **kwargs) -> str:
    """Call ``func``; it must raise a one-line KDADError containing every part."""
    with pytest.raises(KDADError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for part in match_parts:
        assert str(part) in message, (part, message)
    return message


def assert_masks_land(dataset: AnomalyDataset) -> int:
    """Every anomalous item's mask covers exactly its image's white box; returns their count."""
    count = 0
    for item in (dataset[i] for i in range(len(dataset))):
        mask = item["mask"][0].bool()
        if item["label"] == 0:
            assert not mask.any()
            continue
        pixels = torch.from_numpy(dataset.preprocess.denormalize(item["image"])[..., 0].copy())
        assert int(mask.sum()) == BOX * BOX, item["path"]
        assert bool((pixels[mask] >= BOX_VALUE - 2).all()), item["path"]
        assert bool((pixels[~mask] < 100).all()), item["path"]
        count += 1
    return count


# ----------------------------------------------------------------------------- layouts


def test_mvtec_layout(tmp_path):
    make_mvtec_tree(tmp_path, "bottle", num_train=6, num_test_good=2, num_per_defect=2)
    train, test = mvtec_samples(tmp_path, "bottle")
    assert len(train) == 6 and all(s.label == 0 and s.defect_type == "good" for s in train)
    assert all(s.mask_path is None for s in train)
    assert sorted({s.defect_type for s in test}) == ["crack", "good", "scratch"]
    for s in test:
        if s.label == 1:
            gt_dir = tmp_path / "bottle" / "ground_truth" / s.defect_type
            assert s.mask_path == gt_dir / f"{s.image_path.stem}_mask.png"
        else:
            assert s.defect_type == "good" and s.mask_path is None
    assert sum(s.label for s in test) == 4
    # The normal test images are test/good's, none of them a training image.
    normal_test = [s.image_path for s in test if s.label == 0]
    assert sorted(normal_test) == sorted((tmp_path / "bottle" / "test" / "good").glob("*.png"))
    assert not {p.resolve() for p in normal_test} & {s.image_path.resolve() for s in train}
    assert assert_masks_land(AnomalyDataset(test, Preprocess(32))) == 4


def test_mvtec_accepts_any_category_folder(tmp_path):
    make_mvtec_tree(tmp_path, "my_part")
    train, _ = mvtec_samples(str(tmp_path), "my_part")
    assert len(train) == 6


def test_mvtec_errors(tmp_path):
    missing = tmp_path / "nowhere"
    raises_one_line([missing, "train/good", "MVTec AD"], mvtec_samples, missing, "bottle")
    for category in ("bottle", "cable", "grid"):
        make_mvtec_tree(tmp_path, category)
    raises_one_line(["'pill'", "bottle, cable, grid"], mvtec_samples, tmp_path, "pill")
    raises_one_line(["no category"], mvtec_samples, tmp_path, None)
    # an anomalous image without its mask: the image and the expected mask are named
    (tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    raises_one_line(
        ["bottle/test/crack/001.png", "001_mask.png"], mvtec_samples, tmp_path, "bottle"
    )
    # a mask without its image
    (tmp_path / "cable" / "test" / "scratch" / "000.png").unlink()
    raises_one_line(
        ["cable/ground_truth/scratch/000_mask.png", "no matching image"],
        mvtec_samples,
        tmp_path,
        "cable",
    )
    # an empty training folder
    for path in (tmp_path / "grid" / "train" / "good").iterdir():
        path.unlink()
    raises_one_line(
        ["no training images", tmp_path / "grid" / "train" / "good"],
        mvtec_samples,
        tmp_path,
        "grid",
    )


def test_mvtec_masks_of_a_defect_without_test_folder(tmp_path):
    make_mvtec_tree(tmp_path, "bottle")
    write_image(
        tmp_path / "bottle" / "ground_truth" / "hole" / "000_mask.png", np.zeros((32, 32), np.uint8)
    )
    raises_one_line(["hole/000_mask.png", "no matching image"], mvtec_samples, tmp_path, "bottle")


@pytest.mark.parametrize(
    ("image_ext", "mask_ext"),
    [(".bmp", ".png"), (".bmp", ".bmp"), (".png", ".png"), (".BMP", ".PNG")],
)
def test_btad_layout(tmp_path, image_ext, mask_ext):
    make_btad_tree(tmp_path, "03", image_ext, mask_ext, num_train=5, num_test_ok=2, num_test_ko=3)
    train, test = btad_samples(tmp_path, "03")
    assert len(train) == 5 and all(s.image_path.suffix == image_ext for s in train)
    ko = [s for s in test if s.label == 1]
    assert len(ko) == 3 and len(test) == 5
    for s in ko:  # matched by stem, whatever the extension
        assert s.defect_type == "ko" and s.mask_path.stem == s.image_path.stem
        assert s.mask_path.suffix == mask_ext
    assert {s.defect_type for s in test if s.label == 0} == {"good"}
    assert assert_masks_land(AnomalyDataset(test, Preprocess(32))) == 3


def test_btad_category_as_integer_and_errors(tmp_path):
    make_btad_tree(tmp_path, "01")
    assert len(btad_samples(tmp_path, 1)[0]) == 5  # YAML reads 01 as the integer 1
    raises_one_line(["'02'", "01"], btad_samples, tmp_path, "02")
    raises_one_line([tmp_path / "x", "train/ok", "BTAD"], btad_samples, tmp_path / "x", "01")
    (tmp_path / "01" / "ground_truth" / "ko" / "0002.png").unlink()
    raises_one_line(["test/ko/0002.bmp", "has no mask"], btad_samples, tmp_path, "01")


@pytest.mark.parametrize("mask_suffix", ["_mask", ""])
def test_folder_layout_with_masks(tmp_path, mask_suffix):
    make_folder_tree(tmp_path, num_normal=10, num_abnormal=3, mask_suffix=mask_suffix)
    train, test = folder_samples(tmp_path, "normal", "abnormal", "masks", test_fraction=0.2, seed=0)
    assert len(train) == 8 and [s.label for s in test].count(0) == 2
    assert not {s.image_path for s in train} & {s.image_path for s in test}
    abnormal = [s for s in test if s.label == 1]
    assert len(abnormal) == 3 and all(s.defect_type == "abnormal" for s in abnormal)
    assert all(s.mask_path.name == f"{s.image_path.stem}{mask_suffix}.png" for s in abnormal)
    assert assert_masks_land(AnomalyDataset(test, Preprocess(32))) == 3
    # the held-out normals are seeded: same seed, same split; absolute dirs work too
    again = folder_samples(tmp_path, tmp_path / "normal", tmp_path / "abnormal", "masks", seed=0)
    assert again == (train, test)
    other_seeds = {
        tuple(s.image_path.name for s in folder_samples(tmp_path, "normal", seed=seed)[1])
        for seed in range(5)
    }
    assert len(other_seeds) > 1


def test_folder_layout_without_masks_and_with_normal_test_dir(tmp_path):
    make_folder_tree(tmp_path, num_normal=5, num_abnormal=2, with_masks=False, num_normal_test=3)
    train, test = folder_samples(tmp_path, "normal", "abnormal", normal_test_dir="normal_test")
    assert len(train) == 5  # all of normal_dir trains
    assert sorted(s.image_path.parent.name for s in test) == ["abnormal"] * 2 + ["normal_test"] * 3
    assert all(s.mask_path is None for s in test)
    dataset = AnomalyDataset(test, Preprocess(16))
    assert all(not dataset[i]["mask"].any() for i in range(len(dataset)))
    # only normal images: the held-out fraction is still the test set
    train, test = folder_samples(tmp_path, "normal", test_fraction=0.4)
    assert (len(train), len(test)) == (3, 2)


def test_folder_errors(tmp_path):
    make_folder_tree(tmp_path, num_normal=4, num_abnormal=2)
    raises_one_line([tmp_path / "nope", "normal_dir"], folder_samples, tmp_path, "nope")
    raises_one_line([tmp_path / "missing"], folder_samples, tmp_path / "missing", "normal")
    raises_one_line(["abnormal_dir", tmp_path / "bad"], folder_samples, tmp_path, "normal", "bad")
    raises_one_line(["mask_dir"], folder_samples, tmp_path, "normal", mask_dir="masks")
    raises_one_line(["test_fraction"], folder_samples, tmp_path, "normal", test_fraction=1.0)
    raises_one_line(
        ["normal_test_dir", "test_fraction"], folder_samples, tmp_path, "normal",
        normal_test_dir="normal", test_fraction=0.1,
    )  # fmt: skip
    write_image(tmp_path / "masks" / "zzz_mask.png", np.zeros((32, 32), np.uint8))
    raises_one_line(
        ["zzz_mask.png", "no matching image"],
        folder_samples,
        tmp_path,
        "normal",
        "abnormal",
        "masks",
    )
    (tmp_path / "masks" / "zzz_mask.png").unlink()
    (tmp_path / "masks" / "a001_mask.png").unlink()
    raises_one_line(
        ["abnormal/a001.png", "has no mask"],
        folder_samples,
        tmp_path,
        "normal",
        "abnormal",
        "masks",
    )
    (tmp_path / "empty").mkdir()
    raises_one_line(["no images", tmp_path / "empty"], folder_samples, tmp_path, "empty")


# ----------------------------------------------------------------------------- transforms


def save(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def test_load_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    cases = {
        "L.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, 2)),
        "RGBA.png": (Image.fromarray(np.dstack([rgb, np.zeros_like(gray)])), rgb),
        "LA.png": (Image.fromarray(np.dstack([gray, gray])), np.repeat(gray[..., None], 3, 2)),
        "P.png": (Image.fromarray(rgb).quantize(8), None),
        "CMYK.tif": (Image.fromarray(rgb).convert("CMYK"), None),
        "1.png": (Image.fromarray(gray > 127), np.repeat(((gray > 127) * 255)[..., None], 3, 2)),
    }
    for name, (image, expected) in cases.items():
        loaded = load_image(save(tmp_path / name, image))
        assert loaded.shape == (5, 4, 3) and loaded.dtype == np.uint8, name
        if expected is not None:
            np.testing.assert_array_equal(loaded, expected, err_msg=name)
    palette = Image.fromarray(rgb).quantize(8)
    np.testing.assert_array_equal(
        load_image(tmp_path / "P.png"), np.asarray(palette.convert("RGB"))
    )


def test_load_image_wide_data_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    expected = np.array([0, 1, 128, 255], dtype=np.uint8)
    for name, image in {
        "i16.png": Image.fromarray(values),  # opens as "I;16"
        "i16b.tif": Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes()),
        "i32.tif": Image.fromarray(values.astype(np.int32)),  # mode "I"
    }.items():
        loaded = load_image(save(tmp_path / name, image))
        assert loaded.shape == (1, 4, 3)
        np.testing.assert_array_equal(loaded[0, :, 1], expected, err_msg=name)
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(
        load_image(save(tmp_path / "f.tif", floats))[0, :, 0], [0, 128, 255]
    )


def test_unreadable_images_name_the_file(tmp_path):
    garbage = tmp_path / "broken.png"
    garbage.write_bytes(b"not an image at all")
    raises_one_line([garbage, "cannot read"], load_image, garbage)
    raises_one_line([garbage], load_mask, garbage)
    truncated = tmp_path / "truncated.png"
    write_image(
        tmp_path / "whole.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    )
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    raises_one_line([truncated], load_image, truncated)
    raises_one_line([tmp_path / "absent.png"], load_image, tmp_path / "absent.png")
    # ... and through the dataset, as the training loop would see it
    dataset = AnomalyDataset([Sample(garbage, None, 0, "good")], Preprocess(8))
    raises_one_line([garbage], dataset.__getitem__, 0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (40, 24)])
def test_preprocess_shapes(shape):
    image = np.full((*shape, 3), 200, dtype=np.uint8)
    pre = Preprocess(16)
    out = pre(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    np.testing.assert_array_equal(pre.denormalize(out), np.full((16, 16, 3), 200, np.uint8))
    assert Preprocess(16, crop_size=12)(image).shape == (3, 12, 12)
    assert Preprocess(16, crop_size=12).output_size == 12


def test_preprocess_normalises_and_round_trips():
    pre = Preprocess(8)
    out = pre(np.zeros((8, 8, 3), np.uint8))
    torch.testing.assert_close(out[:, 0, 0], -torch.tensor(pre.mean) / torch.tensor(pre.std))
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pre.denormalize(pre(image)), image)


def test_mask_transform_is_nearest_and_binary(tmp_path):
    mask = np.zeros((4, 4), bool)
    mask[1, 2] = True
    out = Preprocess(8).transform_mask(mask)
    assert out.shape == (1, 8, 8) and set(out.unique().tolist()) == {0.0, 1.0}
    expected = torch.zeros(8, 8)
    expected[2:4, 4:6] = 1  # one source pixel -> an exact 2x2 block
    torch.testing.assert_close(out[0], expected)
    big = np.zeros((64, 64), bool)
    big[16:48, 16:48] = True
    down = Preprocess(16).transform_mask(big)
    assert set(down.unique().tolist()) == {0.0, 1.0} and int(down.sum()) == 64
    cropped = Preprocess(16, crop_size=8).transform_mask(big)
    assert cropped.shape == (1, 8, 8) and bool(cropped.all())
    # mask files in other modes: any non-zero channel value is anomalous
    values = np.array([[0, 1], [300, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(
        load_mask(save(tmp_path / "m16.png", Image.fromarray(values))), values > 0
    )
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1, 2] = 5
    loaded = load_mask(save(tmp_path / "rgb.png", Image.fromarray(rgb)))
    np.testing.assert_array_equal(loaded, [[False, True], [False, False]])
    rgba = Image.fromarray(np.dstack([rgb, np.full((2, 2), 255, np.uint8)]))
    np.testing.assert_array_equal(load_mask(save(tmp_path / "rgba.png", rgba)), loaded)


def test_preprocess_argument_errors():
    for bad in (0, -3, 2.5, "256", True):
        raises_one_line(["image_size", repr(bad)], Preprocess, bad)
    raises_one_line(["crop_size"], Preprocess, 16, 32)


def test_mask_of_another_shape_is_an_error(tmp_path):
    image = write_image(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    wide = write_image(tmp_path / "a_mask.png", np.zeros((32, 64), np.uint8))
    half = write_image(tmp_path / "b_mask.png", np.zeros((16, 16), np.uint8))
    pre = Preprocess(16)
    raises_one_line(
        [wide, image], AnomalyDataset([Sample(image, wide, 1, "x")], pre).__getitem__, 0
    )
    assert AnomalyDataset([Sample(image, half, 1, "x")], pre)[0]["mask"].shape == (1, 16, 16)


# ----------------------------------------------------------------------------- data module


def mvtec_module(root: Path, **kwargs) -> AnomalyDataModule:
    defaults = dict(layout="mvtec", root=str(root), category="bottle", image_size=32, batch_size=4)
    return AnomalyDataModule(**{**defaults, **kwargs})


def test_datamodule_items_and_loaders(tmp_path):
    make_mvtec_tree(tmp_path, num_train=10)
    dm = mvtec_module(tmp_path, val_fraction=0.2, crop_size=28, eval_batch_size=3)
    assert (dm.dataset_name, dm.category_name, dm.output_size) == ("mvtec", "bottle", 28)
    assert dm.num_train_images == 8  # runs setup() on demand
    item = dm.test_dataset[2]
    assert set(item) == {"image", "mask", "label", "index", "path", "defect_type"}
    assert item["index"].item() == 2  # position in its split (keys the teacher-feature cache)
    assert item["image"].shape == (3, 28, 28) and item["mask"].shape == (1, 28, 28)
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    assert isinstance(item["path"], str) and isinstance(item["defect_type"], str)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, torch.utils.data.RandomSampler) and not train.drop_last
    assert train.batch_size == 4 and dm.test_dataloader().batch_size == 3
    paths = [p for batch in dm.test_dataloader() for p in batch["path"]]
    assert paths == sorted(paths) and len(paths) == 6
    assert paths == [p for batch in dm.test_dataloader() for p in batch["path"]]
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 28, 28) and batch["label"].tolist() == [0, 0]
    assert dm.has_masks


def test_validation_split(tmp_path):
    make_mvtec_tree(tmp_path, num_train=20)
    splits = []
    for seed in (0, 0, 1):
        dm = mvtec_module(tmp_path, val_fraction=0.25, split_seed=seed)
        dm.setup()
        train = [s.image_path for s in dm.train_dataset.samples]
        val = [s.image_path for s in dm.val_dataset.samples]
        assert len(val) == 5 and len(train) == 15 and not set(train) & set(val)
        assert all(p.parent == tmp_path / "bottle" / "train" / "good" for p in train + val)
        assert all(s.label == 0 for s in dm.val_dataset.samples)
        assert len(dm.test_dataset) == 6  # test images never move into validation
        assert not {s.image_path for s in dm.test_dataset.samples} & set(train + val)
        splits.append(val)
    assert splits[0] == splits[1] and splits[0] != splits[2]


def test_no_validation_set(tmp_path):
    make_mvtec_tree(tmp_path)
    dm = mvtec_module(tmp_path, val_fraction=0)
    dm.setup()
    assert dm.val_dataset is None and dm.val_dataloader() == [] and dm.num_train_images == 6


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv2d(3, 1, 1)
        self.validation_batches = 0

    def training_step(self, batch, _):
        return self.layer(batch["image"]).mean()

    def validation_step(self, batch, _):
        self.validation_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("val_fraction", "validates"), [(0.0, False), (0.5, True)])
def test_lightning_runs_validation_only_with_a_val_set(tmp_path, val_fraction, validates):
    make_mvtec_tree(tmp_path / "data", num_train=4)
    dm = mvtec_module(tmp_path / "data", val_fraction=val_fraction, image_size=8)
    model = _Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert (model.validation_batches > 0) == validates


def test_dataset_is_picklable_and_works_in_workers(tmp_path):
    make_mvtec_tree(tmp_path)
    dm = mvtec_module(tmp_path, num_workers=1, val_fraction=0)
    dm.setup()
    clone = pickle.loads(pickle.dumps(dm.test_dataset))
    torch.testing.assert_close(clone[0]["image"], dm.test_dataset[0]["image"])
    assert dm.test_dataloader().persistent_workers  # not iterated: its workers outlive the test
    loader = torch.utils.data.DataLoader(dm.test_dataset, batch_size=4, num_workers=1)
    assert sum(len(b["path"]) for b in loader) == 6


def test_datamodule_folder_and_btad(tmp_path):
    make_folder_tree(tmp_path / "parts", num_normal=10, num_abnormal=3)
    dm = AnomalyDataModule(
        "folder", str(tmp_path / "parts"), normal_dir="normal", abnormal_dir="abnormal",
        mask_dir="masks", image_size=32, val_fraction=0.25, test_fraction=0.2,
    )  # fmt: skip
    dm.setup()
    assert (dm.dataset_name, dm.category_name) == ("folder", "parts")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (6, 2, 5)
    held_out = {s.image_path for s in dm.test_dataset.samples}
    assert not held_out & {s.image_path for s in dm.val_dataset.samples + dm.train_dataset.samples}
    assert assert_masks_land(dm.test_dataset) == 3 and dm.has_masks
    make_btad_tree(tmp_path / "btad", "02", ".png", ".bmp")
    dm = AnomalyDataModule(
        "btad", str(tmp_path / "btad"), category=2, image_size=32, val_fraction=0
    )
    dm.setup()
    assert dm.category_name == "02" and assert_masks_land(dm.test_dataset) == 3


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({"layout": "coco"}, ["coco", "mvtec, btad, folder, synthetic"]),
        ({"image_size": 0}, ["image_size"]),
        ({"image_size": "256"}, ["image_size"]),
        ({"crop_size": 64}, ["crop_size"]),
        ({"val_fraction": 1.0}, ["val_fraction"]),
        ({"val_fraction": -0.1}, ["val_fraction"]),
        ({"batch_size": 0}, ["batch_size"]),
        ({"normal_dir": "good"}, ["normal_dir", "folder"]),
        ({"test_fraction": 0.3}, ["test_fraction", "folder"]),
        ({"synthetic": {"seed": 1}}, ["synthetic"]),
        ({"category": None}, ["category"]),
        ({"layout": "folder"}, ["normal_dir"]),
        ({"layout": "synthetic", "category": "bottle"}, ["bottle", "stripes"]),
    ],
)
def test_datamodule_argument_errors(tmp_path, kwargs, parts):
    raises_one_line(parts, mvtec_module, tmp_path, **kwargs)


def test_datamodule_data_errors(tmp_path):
    make_mvtec_tree(tmp_path, num_train=1)
    dm = mvtec_module(tmp_path, val_fraction=0.5)
    raises_one_line(["val_fraction", "no training image"], dm.setup)
    raises_one_line(["'pill'", "bottle"], mvtec_module(tmp_path, category="pill").setup)


# ----------------------------------------------------------------------------- synthetic


def tree_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_and_mvtec_shaped(tmp_path):
    one = ensure_synthetic(tmp_path / "a", "stripes", **SMALL)
    two = ensure_synthetic(tmp_path / "b", "stripes", **SMALL)
    files_one, files_two = tree_files(one), tree_files(two)
    assert files_one.keys() == files_two.keys() and len(files_one) == 3 + 2 + 2 * 6 + 1
    assert all(files_one[k].read_bytes() == files_two[k].read_bytes() for k in files_one)
    train, test = mvtec_samples(one, "stripes")
    assert len(train) == 3 and {s.defect_type for s in test} == {
        "good",
        *VISIBLE_DEFECTS,
        *SUBTLE_DEFECTS,
    }
    for s in test:
        assert load_image(s.image_path).shape == (32, 32, 3)
        if s.label:
            assert load_mask(s.mask_path).any(), s.mask_path  # every defect has a non-empty mask
    other = ensure_synthetic(tmp_path / "a", "stripes", **{**SMALL, "seed": 1})
    assert other != one and (one / "stripes").is_dir()  # other parameters, own folder
    assert (
        files_one["stripes/train/good/000.png"].read_bytes()
        != (other / "stripes/train/good/000.png").read_bytes()
    )


def test_synthetic_is_idempotent(tmp_path, monkeypatch):
    base = ensure_synthetic(tmp_path, "dots", **SMALL)
    mtimes = {k: p.stat().st_mtime_ns for k, p in tree_files(base).items()}

    def fail(*args):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synth, "_generate", fail)
    assert ensure_synthetic(tmp_path, "dots", **SMALL) == base
    assert {k: p.stat().st_mtime_ns for k, p in tree_files(base).items()} == mtimes


def test_synthetic_regenerates_a_tree_with_a_bad_marker(tmp_path):
    base = ensure_synthetic(tmp_path, "dots", **SMALL)
    marker = base / "dots" / synth.MARKER
    content = json.loads(marker.read_text())
    marker.write_text(json.dumps({**content, "generator_version": -1}))
    (base / "dots" / "train" / "good" / "000.png").unlink()
    assert ensure_synthetic(tmp_path, "dots", **SMALL) == base
    assert json.loads(marker.read_text()) == content
    assert (base / "dots" / "train" / "good" / "000.png").is_file()
    assert [p.name for p in base.iterdir()] == ["dots"]  # no temp or trash folders left


def test_synthetic_removes_stale_temporary_trees(tmp_path):
    base = ensure_synthetic(tmp_path, "dots", **SMALL)
    stale, fresh = base / ".weave.tmp-dead", base / ".weave.tmp-live"
    (stale / "train").mkdir(parents=True)
    fresh.mkdir()
    os.utime(stale, (0, 0))  # left by a process killed long ago
    ensure_synthetic(tmp_path, "weave", **SMALL)
    assert sorted(p.name for p in base.iterdir()) == [".weave.tmp-live", "dots", "weave"]


def test_synthetic_crash_leaves_no_partial_category(tmp_path, monkeypatch):
    written = []
    real_write = synth._write_png

    def crash_after_five(path, array):
        if len(written) == 5:
            raise RuntimeError("simulated crash")
        written.append(path)
        real_write(path, array)

    monkeypatch.setattr(synth, "_write_png", crash_after_five)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_synthetic(tmp_path, "checker", **SMALL)
    assert all(p.parent.parent.parent.name.startswith(".checker.tmp-") for p in written)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_dir() and "checker" in p.name]
    assert leftovers == []  # neither the category nor its temporary folder
    monkeypatch.setattr(synth, "_write_png", real_write)
    base = ensure_synthetic(tmp_path, "checker", **SMALL)
    assert len(mvtec_samples(base, "checker")[0]) == 3


def test_synthetic_concurrent_generation_loser_uses_winner(tmp_path, monkeypatch):
    """Another process finishes the same category while this one is still generating."""
    real_write = synth._write_png
    state = {"nested": False}

    def write_and_race(path, array):
        if not state["nested"]:
            state["nested"] = True
            monkeypatch.setattr(synth, "_write_png", real_write)
            ensure_synthetic(tmp_path, "wood", **SMALL)  # the "other process" wins
        real_write(path, array)

    monkeypatch.setattr(synth, "_write_png", write_and_race)
    base = ensure_synthetic(tmp_path, "wood", **SMALL)
    assert [p.name for p in base.iterdir()] == ["wood"]  # the loser's temp tree is gone
    assert len(mvtec_samples(base, "wood")[1]) == 2 + 6


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_synthetic_defects_are_masked_and_visible_ones_obvious(category):
    for defect in (*VISIBLE_DEFECTS, *SUBTLE_DEFECTS):
        for index in range(2):
            image, mask, clean = synth.render_sample(category, "test", index, defect, resolution=64)
            changed = (image != clean).any(axis=2)
            assert mask.any() and changed.any(), (defect, index)
            assert not (changed & ~mask).any(), (defect, index)  # the mask covers every change
            difference = np.abs(image.astype(int) - clean)[mask].mean()
            if defect in VISIBLE_DEFECTS:
                assert difference > 60, (defect, difference)
            else:
                assert difference < 40, (defect, difference)
    normal, no_mask, _ = synth.render_sample(category, "train", 0, resolution=64)
    assert normal.shape == (64, 64, 3) and not no_mask.any()


def test_synthetic_errors(tmp_path):
    raises_one_line(["'bottle'", "stripes"], ensure_synthetic, tmp_path, "bottle")
    raises_one_line(["size", "resolution"], ensure_synthetic, tmp_path, "dots", size=3)
    raises_one_line(["resolution"], ensure_synthetic, tmp_path, "dots", resolution=4)
    raises_one_line(["num_train"], ensure_synthetic, tmp_path, "dots", num_train=0)


def test_synthetic_datamodule(tmp_path):
    dm = AnomalyDataModule(
        "synthetic", str(tmp_path), category="cells", image_size=32, val_fraction=0.34,
        synthetic=SMALL,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup()
    assert (dm.dataset_name, dm.category_name) == ("synthetic", "cells")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (2, 1, 8)
    assert dm.has_masks and sum(dm.test_dataset.labels) == 6
    masks = [dm.test_dataset[i]["mask"] for i in range(len(dm.test_dataset))]
    assert all(
        bool(m.any()) == bool(label) for m, label in zip(masks, dm.test_dataset.labels, strict=True)
    )
    assert os.listdir(tmp_path) == [next(iter(os.listdir(tmp_path)))]  # one parameter folder


def test_cache_preloads_identical_items_within_its_budget_and_reads_them_in_process(tmp_path):
    make_mvtec_tree(tmp_path, num_train=10)
    plain = mvtec_module(tmp_path, cache=False, num_workers=1)
    cached = mvtec_module(tmp_path, cache=True, num_workers=1)
    plain.setup()
    cached.setup()
    assert cached.train_dataset.preloaded and not plain.train_dataset.preloaded
    assert not cached.test_dataset.preloaded  # read once: never cached
    for a, b in zip(plain.train_dataset, cached.train_dataset, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["path"] == b["path"]
    # Preloaded tensors are read in this process; the test loader keeps its workers.
    assert cached.train_dataloader().num_workers == 0
    assert plain.train_dataloader().num_workers == 1 == cached.test_dataloader().num_workers
    tiny_budget = mvtec_module(tmp_path, cache="auto", cache_max_gb=1e-9)
    tiny_budget.setup()
    assert not tiny_budget.train_dataset.preloaded
    roomy = mvtec_module(tmp_path, cache="auto")
    roomy.setup()
    assert roomy.train_dataset.preloaded
    with pytest.raises(KDADError, match=r"data.cache='yes': expected true, false or auto"):
        mvtec_module(tmp_path, cache="yes")


def _blob_mask(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(6):
        cy, cx = rng.integers(0, size, 2)
        r = rng.integers(3, size // 6)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    mask[size // 2 : size // 2 + 2, :] = True  # thin structures are where the rules differ
    mask[:, size // 3 : size // 3 + 3] = True
    return mask


def _rd4ad_official_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """hq-deng/RD4AD: PIL bilinear resize of the 8-bit mask image, ToTensor, ``> 0.5``."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.BILINEAR)) / 255.0 > 0.5


@pytest.mark.parametrize(("source", "seed"), [(1024, 0), (1024, 1), (900, 2)])
def test_bilinear_mask_resize_is_rd4ads(source: int, seed: int) -> None:
    mask = _blob_mask(source, seed)
    ours = Preprocess(256, mask_resize="bilinear").transform_mask(mask)
    assert set(ours.unique().tolist()) <= {0.0, 1.0}
    reference = _rd4ad_official_mask(mask, 256)
    np.testing.assert_array_equal(ours[0].numpy() > 0.5, reference)
    nearest = Preprocess(256).transform_mask(mask)[0].numpy() > 0.5
    assert (nearest != reference).sum() > 0  # the two choices really differ


def test_bilinear_mask_resize_non_integer_factor_within_a_pixel() -> None:
    # PIL's fixed-point filter weights vs float weights: at most a pixel or two of 65,536 flip.
    for source in (1000, 600):
        mask = _blob_mask(source, 3)
        ours = Preprocess(256, mask_resize="bilinear").transform_mask(mask)[0].numpy() > 0.5
        assert (ours != _rd4ad_official_mask(mask, 256)).sum() <= 2


def test_mask_resize_key() -> None:
    with pytest.raises(KDADError, match="mask_resize"):
        Preprocess(16, mask_resize="bicubic")
    dm = AnomalyDataModule("synthetic", "/nonexistent", "stripes", mask_resize="bilinear")
    assert dm.preprocess.mask_resize == "bilinear"
    assert AnomalyDataModule("synthetic", "/nonexistent", "stripes").preprocess.mask_resize == (
        "nearest"
    )
