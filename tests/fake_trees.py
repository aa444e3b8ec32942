"""Small fake dataset trees on disk, for tests (tiny images, written with PIL).

Every anomalous image is a grey square with one white box, and its mask is exactly that box;
the box position is unique per image (see :func:`defect_box`), so a mask attached to the wrong
image is detectable: the mask pixels would not land on white pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND, BOX_VALUE, BOX = 60, 255, 6


def write_image(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8 HxW or HxWx3) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def defect_box(k: int, size: int) -> tuple[slice, slice]:
    """Rows and columns of the white box of the ``k``-th anomalous image."""
    top, left = (k * 7) % (size - BOX), (k * 11 + 3) % (size - BOX)
    return slice(top, top + BOX), slice(left, left + BOX)


def normal_image(i: int, size: int) -> np.ndarray:
    """A flat grey RGB image, a little different per index."""
    return np.full((size, size, 3), BACKGROUND + i % 20, dtype=np.uint8)


def anomalous_pair(k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image with a white box, uint8 mask of 0/255 covering exactly that box)."""
    image = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    rows, cols = defect_box(k, size)
    image[rows, cols] = BOX_VALUE
    mask[rows, cols] = 255
    return image, mask


def make_mvtec_tree(
    root: Path,
    category: str = "bottle",
    num_train: int = 6,
    num_test_good: int = 2,
    defects: tuple[str, ...] = ("crack", "scratch"),
    num_per_defect: int = 2,
    size: int = 32,
) -> Path:
    """``root/category/{train/good, test/good, test/<defect>, ground_truth/<defect>}``."""
    base = root / category
    for i in range(num_train):
        write_image(base / "train" / "good" / f"{i:03d}.png", normal_image(i, size))
    for i in range(num_test_good):
        write_image(base / "test" / "good" / f"{i:03d}.png", normal_image(i, size))
    k = 0
    for defect in defects:
        for i in range(num_per_defect):
            image, mask = anomalous_pair(k, size)
            write_image(base / "test" / defect / f"{i:03d}.png", image)
            write_image(base / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
            k += 1
    return root


def make_btad_tree(
    root: Path,
    product: str = "01",
    image_ext: str = ".bmp",
    mask_ext: str = ".png",
    num_train: int = 5,
    num_test_ok: int = 2,
    num_test_ko: int = 3,
    size: int = 32,
) -> Path:
    """Raw BTAD: ``root/product/{train/ok, test/ok, test/ko, ground_truth/ko/<stem><mask_ext>}``."""
    base = root / product
    for i in range(num_train):
        write_image(base / "train" / "ok" / f"{i:04d}{image_ext}", normal_image(i, size))
    for i in range(num_test_ok):
        write_image(base / "test" / "ok" / f"{i:04d}{image_ext}", normal_image(i, size))
    for k in range(num_test_ko):
        image, mask = anomalous_pair(k, size)
        write_image(base / "test" / "ko" / f"{k:04d}{image_ext}", image)
        write_image(base / "ground_truth" / "ko" / f"{k:04d}{mask_ext}", mask)
    return root


def make_folder_tree(
    root: Path,
    num_normal: int = 10,
    num_abnormal: int = 3,
    with_masks: bool = True,
    mask_suffix: str = "_mask",
    num_normal_test: int = 0,
    size: int = 32,
) -> Path:
    """``root/{normal, abnormal, masks, normal_test}`` of flat image folders."""
    for i in range(num_normal):
        write_image(root / "normal" / f"n{i:03d}.png", normal_image(i, size))
    for i in range(num_normal_test):
        write_image(root / "normal_test" / f"t{i:03d}.png", normal_image(i, size))
    for k in range(num_abnormal):
        image, mask = anomalous_pair(k, size)
        write_image(root / "abnormal" / f"a{k:03d}.png", image)
        if with_masks:
            write_image(root / "masks" / f"a{k:03d}{mask_suffix}.png", mask)
    return root
