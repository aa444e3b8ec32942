"""data=photos: real photographs from pip packages with planted defects, in the MVTec layout."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

import kdad.data.photos as photos
from kdad.data import AnomalyDataModule, mvtec_samples
from kdad.errors import KDADError

SMALL = {"resolution": 64, "num_train": 4, "num_test_good": 2, "num_test_per_defect": 1}


def test_categories_textures_and_objects_from_packaged_photographs() -> None:
    assert len(photos.PHOTO_CATEGORIES) >= 5
    kinds = {source.kind for source in photos.PHOTO_SOURCES.values()}
    assert kinds == {"texture", "object"}
    for source in photos.PHOTO_SOURCES.values():
        assert source.package.split(".")[0] in ("skimage", "sklearn")
        assert source.description


def test_reserved_images_are_never_used() -> None:
    """brick, grass, gravel and immunohistochemistry are kept for an independent check."""
    files = {source.file for source in photos.PHOTO_SOURCES.values()}
    assert not files & {"brick.png", "grass.png", "gravel.png", "ihc.png"}
    assert set(photos.RESERVED) == {"brick.png", "grass.png", "gravel.png", "ihc.png"}
    code = inspect.getsource(photos)
    for call in ("data.brick(", "data.grass(", "data.gravel(", "data.immunohistochemistry("):
        assert call not in code


@pytest.mark.parametrize("category", photos.PHOTO_CATEGORIES)
def test_defects_change_the_image_where_their_mask_is(category: str) -> None:
    normal, no_mask, clean = photos.render_photo(category, "train", 0, resolution=96)
    assert normal.shape == (96, 96, 3) and normal.dtype == np.uint8 and not no_mask.any()
    assert np.array_equal(normal, clean)
    for defect in photos.DEFECT_TYPES:
        for index in range(3):
            image, mask, clean = photos.render_photo(category, "test", index, defect, 96)
            assert mask.any(), (defect, index)
            change = np.abs(image.astype(int) - clean).max(axis=2)
            # The mask holds the visible change: most of the changed signal lies inside it.
            assert change[mask].sum() > 0.5 * change.sum(), (defect, index)
            if defect != "paste":  # a pasted patch is whatever the photograph holds there
                # Realistic, not unmistakable: on average a fraction of the intensity range.
                assert change[mask].mean() < 100, (defect, index)


def test_generation_is_deterministic_and_defects_come_at_several_sizes() -> None:
    a = photos.render_photo("coffee", "test", 3, "stain", 64)
    b = photos.render_photo("coffee", "test", 3, "stain", 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    areas = [photos.render_photo("moon", "test", i, "colour", 64)[1].mean() for i in range(12)]
    assert max(areas) > 3 * min(areas)


def test_tree_in_the_mvtec_layout_and_the_data_module(tmp_path: Path) -> None:
    base = photos.ensure_photos(tmp_path, "flower", **SMALL)
    train, test = mvtec_samples(base, "flower")
    assert len(train) == 4 and len(test) == 2 + len(photos.DEFECT_TYPES)
    assert {s.defect_type for s in test} == {"good", *photos.DEFECT_TYPES}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in test if s.label == 1)
    again = photos.ensure_photos(tmp_path, "flower", **SMALL)  # reused, not regenerated
    assert again == base
    dm = AnomalyDataModule(
        "photos", str(tmp_path), "flower", image_size=32, val_fraction=0.25, photos=SMALL
    )
    dm.setup()
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1  # held-out normal crops
    item = dm.test_dataset[len(dm.test_dataset) - 1]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda root: photos.ensure_photos(root, "marble", **SMALL), "unknown photos category"),
        (lambda root: photos.ensure_photos(root, "moon", size=3), "unknown photos parameter"),
        (lambda root: photos.ensure_photos(root, "moon", resolution=8), "resolution"),
        (
            lambda root: AnomalyDataModule("photos", str(root), "moon", synthetic={}),
            "synthetic parameters are only for layout 'synthetic'",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path: Path, call, words: str) -> None:
    with pytest.raises(KDADError, match=words):
        call(tmp_path)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(package: str):
        raise ModuleNotFoundError(package)

    photos._photo.cache_clear()
    monkeypatch.setattr(photos.importlib.resources, "files", missing)
    try:
        with pytest.raises(KDADError, match=r"pip install 'kdad\[photos\]'"):
            photos.render_photo("moon", "train", 0, resolution=32)
    finally:
        photos._photo.cache_clear()
