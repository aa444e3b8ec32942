"""Dataset layouts on disk, turned into lists of :class:`Sample`.

Every layout function returns ``(train_samples, test_samples)``. Training samples are always
normal images (the models learn from normal data only); test samples mix normal (label 0,
defect type ``"good"``) and anomalous images (label 1) with their ground-truth masks.
Masks are matched to images by file stem, whatever the extension, so ``000.bmp`` finds
``000.png`` or ``000_mask.png``. Layout mistakes raise :class:`~kdad.errors.KDADError` with a
one-line message that names the offending path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdad.errors import KDADError

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
BTAD_CATEGORIES = ("01", "02", "03")

_MVTEC_HINT = "<root>/<category>/train/good/*.png (MVTec AD layout)"
_BTAD_HINT = "<root>/<01|02|03>/train/ok/*.bmp|png (BTAD layout)"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split."""

    image_path: Path
    mask_path: Path | None
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files (``._x.png``) are skipped."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _train_images(folder: Path, hint: str) -> list[Path]:
    if not folder.is_dir():
        raise KDADError(f"missing training folder {folder}; expected {hint}")
    images = list_images(folder)
    if not images:
        raise KDADError(
            f"no training images in {folder} (expected {'/'.join(IMAGE_EXTENSIONS)} files)"
        )
    return images


def _category_dir(
    root: Path, category: str | None, marker: str, hint: str, known: Sequence[str]
) -> Path:
    """``root/category`` after checking that both exist; ``marker`` is the train sub-folder."""
    if not root.is_dir():
        raise KDADError(f"dataset root {root} does not exist; expected {hint}")
    if not category:
        raise KDADError(f"no category given for dataset root {root}; expected {hint}")
    folder = root / str(category)
    if not folder.is_dir():
        # Any folder with the right layout is a valid category (e.g. synthetic data).
        found = sorted(
            d.name for d in root.iterdir() if (d / marker).is_dir() and not d.name.startswith(".")
        )
        if found:
            raise KDADError(f"unknown category '{category}' in {root}; found: {', '.join(found)}")
        raise KDADError(
            f"unknown category '{category}': no category folders in {root}; expected {hint}"
            f" (known categories: {', '.join(known)})"
        )
    return folder


def _index_masks(mask_dir: Path) -> dict[str, Path]:
    """Map image stem -> mask file, for masks named ``<stem>.<ext>`` or ``<stem>_mask.<ext>``."""
    index: dict[str, Path] = {}
    for mask in list_images(mask_dir) if mask_dir.is_dir() else []:
        stem = mask.stem.removesuffix("_mask")
        if stem in index:
            raise KDADError(
                f"two masks for image '{stem}' in {mask_dir}: {index[stem].name}, {mask.name}"
            )
        index[stem] = mask
    return index


def _anomalous(
    image_dir: Path, mask_dir: Path, defect: str, mask_name: str, others: Sequence[Path] = ()
) -> list[Sample]:
    """Anomalous samples of ``image_dir``, each with its mask from ``mask_dir``.

    Every image needs a mask, and every mask an image (in ``image_dir`` or among ``others``,
    e.g. empty masks of normal images): a stray mask usually means misnamed files.
    """
    images = list_images(image_dir) if image_dir.is_dir() else []
    masks = _index_masks(mask_dir)
    stems = {p.stem for p in [*images, *others]}
    for stem, mask in sorted(masks.items()):
        if stem not in stems:
            raise KDADError(f"mask {mask} has no matching image in {image_dir}")
    samples = []
    for image in images:
        if image.stem not in masks:
            expected = mask_dir / mask_name.format(stem=image.stem)
            raise KDADError(f"anomalous image {image} has no mask; expected {expected}")
        samples.append(Sample(image, masks[image.stem], 1, defect))
    return samples


def _normals(images: list[Path]) -> list[Sample]:
    return [Sample(p, None, 0, "good") for p in images]


def mvtec_samples(root: str | Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """MVTec AD: ``<root>/<category>/{train/good, test/good, test/<defect>}`` and
    ``ground_truth/<defect>/<stem>_mask.png``. Any category folder with this layout is accepted.
    """
    root = Path(root).expanduser()
    folder = _category_dir(root, category, "train/good", _MVTEC_HINT, MVTEC_CATEGORIES)
    train = _normals(_train_images(folder / "train" / "good", _MVTEC_HINT))
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise KDADError(f"missing test folder {test_dir}; expected test/good and test/<defect>")
    gt_dir = folder / "ground_truth"
    defects = {d.name for d in test_dir.iterdir() if d.is_dir() and d.name != "good"}
    if gt_dir.is_dir():  # also catch masks of a defect type that has no test folder
        defects |= {d.name for d in gt_dir.iterdir() if d.is_dir() and d.name != "good"}
    good = test_dir / "good"
    test = _normals(list_images(good)) if good.is_dir() else []
    for defect in sorted(defects):
        test += _anomalous(test_dir / defect, gt_dir / defect, defect, "{stem}_mask.png")
    if not test:
        raise KDADError(
            f"no test images in {test_dir}; expected test/good/*.png, test/<defect>/*.png"
        )
    return train, test


def btad_samples(root: str | Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """BTAD (raw layout): ``<root>/<01|02|03>/{train/ok, test/ok, test/ko}`` and
    ``ground_truth/ko/<stem>.<bmp|png>``; masks are matched by stem, whatever the extension.
    """
    root = Path(root).expanduser()
    category = str(category)
    if category.isdigit():
        category = category.zfill(2)  # Hydra turns "01" into the int 1.
    folder = _category_dir(root, category, "train/ok", _BTAD_HINT, BTAD_CATEGORIES)
    train = _normals(_train_images(folder / "train" / "ok", _BTAD_HINT))
    test_dir = folder / "test"
    ok, ko = test_dir / "ok", test_dir / "ko"
    if not ok.is_dir() and not ko.is_dir():
        raise KDADError(f"missing test folders in {test_dir}; expected test/ok and test/ko")
    test = _normals(list_images(ok)) if ok.is_dir() else []
    if ko.is_dir():
        test += _anomalous(ko, folder / "ground_truth" / "ko", "ko", "{stem}.png")
    if not test:
        raise KDADError(f"no test images in {test_dir}; expected test/ok/*, test/ko/*")
    return train, test


def _split_off(images: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded random ``fraction`` of ``images`` (at least one if fraction > 0): (kept, taken)."""
    if fraction <= 0:
        return images, []
    count = max(1, round(fraction * len(images)))
    taken = set(np.random.default_rng(seed).permutation(len(images))[:count].tolist())
    return (
        [p for i, p in enumerate(images) if i not in taken],
        [p for i, p in enumerate(images) if i in taken],
    )


def folder_samples(
    root: str | Path,
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    normal_test_dir: str | Path | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[Sample], list[Sample]]:
    """A user's own data: flat folders of images; relative folders resolve against ``root``.

    Test split rule: with ``normal_test_dir`` all of ``normal_dir`` trains and the normal test
    images come from ``normal_test_dir``; without it a seeded random ``test_fraction``
    (default 0.2, at least one image) of ``normal_dir`` is held out as normal test images, so
    the test set has both classes. The two options exclude each other. All of
    ``abnormal_dir`` is test data (defect type = its folder name). With ``mask_dir``, every
    abnormal image needs a mask named ``<stem>.<ext>`` or ``<stem>_mask.<ext>``; without it
    the abnormal images have no pixel ground truth.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KDADError(
            f"dataset root {root} does not exist; expected a folder holding {normal_dir}"
        )
    if normal_test_dir is not None and test_fraction is not None:
        raise KDADError("give either normal_test_dir or test_fraction (folder layout), not both")
    test_fraction = 0.2 if test_fraction is None else test_fraction
    if not 0 <= test_fraction < 1:
        raise KDADError(f"test_fraction must be in [0, 1), got {test_fraction}")

    def images_in(key: str, folder: str | Path) -> list[Path]:
        path = root / Path(folder).expanduser()
        if not path.is_dir():
            raise KDADError(f"{key} {path} does not exist; expected a folder of images")
        images = list_images(path)
        if not images:
            raise KDADError(
                f"no images in {key} {path} (expected {'/'.join(IMAGE_EXTENSIONS)} files)"
            )
        return images

    normals = images_in("normal_dir", normal_dir)
    if normal_test_dir is not None:
        train, normal_test = normals, images_in("normal_test_dir", normal_test_dir)
    else:
        train, normal_test = _split_off(normals, test_fraction, seed)
        if not train:
            raise KDADError(
                f"test_fraction={test_fraction} leaves no training image in {normal_dir}"
            )
    test = _normals(normal_test)
    if abnormal_dir is not None:
        abnormal = images_in("abnormal_dir", abnormal_dir)
        folder, defect = abnormal[0].parent, abnormal[0].parent.name
        if mask_dir is None:
            test += [Sample(p, None, 1, defect) for p in abnormal]
        else:
            masks = root / Path(mask_dir).expanduser()
            if not masks.is_dir():
                raise KDADError(f"mask_dir {masks} does not exist; expected masks named <stem>.png")
            # Empty masks of normal images may sit beside the real ones: allowed, unused.
            test += _anomalous(folder, masks, defect, "{stem}.png", others=[*normals, *normal_test])
    elif mask_dir is not None:
        raise KDADError(
            f"mask_dir {mask_dir} given without abnormal_dir; masks belong to abnormal images"
        )
    return _normals(train), test
