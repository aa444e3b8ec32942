"""Data: dataset layouts, the synthetic generator, preprocessing and the Lightning data module."""

from kdad.data.datamodule import LAYOUTS, AnomalyDataModule
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

__all__ = [
    "BTAD_CATEGORIES",
    "DEFECT_TYPES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MVTEC_CATEGORIES",
    "SUBTLE_DEFECTS",
    "SYNTHETIC_CATEGORIES",
    "VISIBLE_DEFECTS",
    "AnomalyDataModule",
    "AnomalyDataset",
    "Preprocess",
    "Sample",
    "btad_samples",
    "denormalize",
    "ensure_synthetic",
    "folder_samples",
    "load_image",
    "load_mask",
    "mvtec_samples",
]
