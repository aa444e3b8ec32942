"""Data: dataset layouts, the synthetic and photos generators, preprocessing and the Lightning data module.

The data module (``AnomalyDataModule``, ``LAYOUTS``) is imported on first use, so that
``kdad-download`` and other users of the layouts do not pay for importing Lightning.
"""

from typing import Any

from kdad.data.dataset import AnomalyDataset
from kdad.data.layouts import (
    BTAD_CATEGORIES,
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    Sample,
    btad_samples,
    folder_samples,
    mvtec_samples,
)
from kdad.data.photos import PHOTO_CATEGORIES, ensure_photos
from kdad.data.synthetic import (
    DEFECT_TYPES,
    SUBTLE_DEFECTS,
    SYNTHETIC_CATEGORIES,
    VISIBLE_DEFECTS,
    ensure_synthetic,
)
from kdad.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    denormalize,
    load_image,
    load_mask,
)

_LAZY = {"AnomalyDataModule", "LAYOUTS"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from kdad.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'kdad.data' has no attribute {name!r}")


__all__ = [
    "BTAD_CATEGORIES",
    "DEFECT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MVTEC_CATEGORIES",
    "PHOTO_CATEGORIES",
    "SUBTLE_DEFECTS",
    "SYNTHETIC_CATEGORIES",
    "VISIBLE_DEFECTS",
    "AnomalyDataModule",
    "AnomalyDataset",
    "Preprocess",
    "Sample",
    "btad_samples",
    "denormalize",
    "ensure_photos",
    "ensure_synthetic",
    "folder_samples",
    "load_image",
    "load_mask",
    "mvtec_samples",
]
