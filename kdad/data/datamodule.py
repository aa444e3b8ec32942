"""The Lightning data module that every experiment uses, whatever the dataset layout."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import hydra.utils
import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kdad.config import choice
from kdad.data.dataset import AnomalyDataset
from kdad.data.download import dataset_spec, ensure_dataset
from kdad.data.layouts import Sample, btad_samples, folder_samples, mvtec_samples
from kdad.data.photos import PHOTO_CATEGORIES, ensure_photos
from kdad.data.synthetic import SYNTHETIC_CATEGORIES, ensure_synthetic
from kdad.data.transforms import Preprocess
from kdad.errors import KDADError


class Layout(str, Enum):
    """The dataset's folder layout (``data.layout``; README "Data")."""

    mvtec = "mvtec"
    btad = "btad"
    folder = "folder"
    synthetic = "synthetic"
    photos = "photos"


class MaskResize(str, Enum):
    """How test masks are resampled to the input size (``data.mask_resize``; see Preprocess)."""

    nearest = "nearest"  # pixel centres
    bilinear = "bilinear"  # then > 0.5: the official RD4AD code


LAYOUTS = tuple(m.value for m in Layout)
# Layouts generated on first use: their categories and generator.
GENERATED = {
    "synthetic": (SYNTHETIC_CATEGORIES, ensure_synthetic),
    "photos": (PHOTO_CATEGORIES, ensure_photos),
}
_FOLDER_ONLY = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "test_fraction")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ShardSampler(DistributedSampler):
    """Each index exactly once over all processes (rank r takes r, r + W, ...): no padding.

    Shards may differ in length by one; the metrics gather uneven shards correctly.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)
        self.indices = list(range(self.rank, len(dataset), self.num_replicas))
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KDADError(f"{name} must be an integer >= {minimum}, got {value!r}")


class AnomalyDataModule(L.LightningDataModule):
    """Train (normal images only), validation and test data for one dataset category.

    The validation set is a seeded random ``val_fraction`` of the normal training images
    (never test images); with ``val_fraction=0`` there is none and Lightning skips
    validation. ``layout="synthetic"`` and ``layout="photos"`` generate their data under ``root`` on first
    use (parameters: ``synthetic`` / ``photos``);
    ``test_fraction`` (folder layout) is the share of ``normal_dir`` held out as normal test
    images when no ``normal_test_dir`` is given (default 0.2). ``mask_resize``: how test masks
    are resampled to the input size, ``nearest`` (pixel centres) or ``bilinear`` then ``> 0.5``
    (the official RD4AD code; experiment=paper_mvtec/paper_btad use it), see
    :class:`~kdad.data.transforms.Preprocess`. ``pin_memory``: the loaders'
    page-locked batches (faster copies to a GPU), ``true``, ``false`` or ``auto`` (when the
    trainer runs on a CUDA device; without a trainer, when CUDA is available). ``cache``: keep
    the preprocessed training/validation tensors in memory (identical results, no re-decoding
    each epoch): ``true``, ``false`` or ``auto`` (when they fit in ``cache_max_gb``).

    The signature is the one home of the data keys' defaults: conf/data/*.yaml set only what a
    dataset's reference settings change (kdad.config builds the schema from it).
    """

    def __init__(
        self,
        layout: Layout | str,
        root: str,
        category: str | None = None,
        image_size: int = 256,
        crop_size: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        normal_dir: str | None = None,
        abnormal_dir: str | None = None,
        mask_dir: str | None = None,
        normal_test_dir: str | None = None,
        test_fraction: float | None = None,
        synthetic: Mapping[str, int] | None = None,
        photos: Mapping[str, int] | None = None,
        pin_memory: bool | str = "auto",
        cache: bool | str = "auto",
        cache_max_gb: float = 4.0,
        mask_resize: MaskResize | str = "nearest",
    ) -> None:
        super().__init__()
        layout = choice(Layout, layout, "data.layout")
        mask_resize = choice(MaskResize, mask_resize, "data.mask_resize")
        folder_args = dict(
            normal_dir=normal_dir,
            abnormal_dir=abnormal_dir,
            mask_dir=mask_dir,
            normal_test_dir=normal_test_dir,
            test_fraction=test_fraction,
        )
        if layout != "folder":
            given = [k for k in _FOLDER_ONLY if folder_args[k] is not None]
            if given:
                raise KDADError(f"{given[0]} is only for layout 'folder', not '{layout}'")
            if category is None:
                raise KDADError(f"layout '{layout}' needs a category (data.category=...)")
        elif normal_dir is None:
            raise KDADError("layout 'folder' needs normal_dir (a folder of normal images)")
        generator_params = {"synthetic": synthetic, "photos": photos}
        for name, given in generator_params.items():
            if given is not None and layout != name:
                raise KDADError(f"{name} parameters are only for layout '{name}', not '{layout}'")
        if layout in GENERATED and category not in GENERATED[layout][0]:
            raise KDADError(
                f"unknown {layout} category '{category}'; valid: {', '.join(GENERATED[layout][0])}"
            )
        _positive_int("batch_size", batch_size)
        _positive_int("eval_batch_size", batch_size if eval_batch_size is None else eval_batch_size)
        _positive_int("num_workers", num_workers, minimum=0)
        _positive_int("split_seed", split_seed, minimum=0)
        if not (isinstance(val_fraction, int | float) and 0 <= val_fraction < 1):
            raise KDADError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if not (test_fraction is None or isinstance(test_fraction, int | float)):
            raise KDADError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
        # No save_hyperparameters(): keys shared with the model's hparams (image_size, ...)
        # would make Lightning's hparam logging fail when their values differ.
        # validates the sizes and mask_resize (nearest | bilinear: official RD4AD)
        self.preprocess = Preprocess(image_size, crop_size, mask_resize=mask_resize)

        if layout == "btad" and str(category).isdigit():
            category = str(category).zfill(2)  # YAML reads 01 as the integer 1
        self.layout, self.root, self.category = layout, str(root), category
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        if pin_memory not in (True, False, "auto"):
            raise KDADError(f"data.pin_memory={pin_memory!r}: expected true, false or auto")
        self._pin_memory = pin_memory
        if cache not in (True, False, "auto"):
            raise KDADError(f"data.cache={cache!r}: expected true, false or auto")
        self.cache, self.cache_max_gb = cache, float(cache_max_gb)
        self.val_fraction, self.split_seed = float(val_fraction), split_seed
        self.folder_args = folder_args
        self.generator_params = dict(generator_params.get(layout) or {})

        self.dataset_name = layout
        if layout == "folder":
            self.category_name = category or Path(root).name or Path(normal_dir).name
        else:
            self.category_name = str(category)
        self.train_dataset: AnomalyDataset | None = None
        self.val_dataset: AnomalyDataset | None = None
        self.test_dataset: AnomalyDataset | None = None
        self.has_masks = False  # set by setup(): every anomalous test image has a mask

    @property
    def output_size(self) -> int:
        """Side of the square tensors the model sees."""
        return self.preprocess.output_size

    @property
    def num_train_images(self) -> int:
        """Number of training images (after the validation split); runs setup() if needed."""
        if self.train_dataset is None:
            self.setup()
        return len(self.train_dataset)

    @property
    def pin_memory(self) -> bool:
        """``data.pin_memory`` with ``auto`` decided: pinned only for a CUDA device."""
        if self._pin_memory != "auto":
            return bool(self._pin_memory)
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def prepare_data(self) -> None:
        """Generate synthetic or photos data once (Lightning calls this on one process only)."""
        if self.layout in GENERATED:
            GENERATED[self.layout][1](self.root, self.category, **self.generator_params)

    def _samples(self) -> tuple[list[Sample], list[Sample]]:
        if self.layout == "mvtec":
            return mvtec_samples(self.root, self.category)
        if self.layout == "btad":
            return btad_samples(self.root, self.category)
        if self.layout in GENERATED:
            # Safe to call again after prepare_data: a finished tree is just reused.
            ensure = GENERATED[self.layout][1]
            return mvtec_samples(
                ensure(self.root, self.category, **self.generator_params), self.category
            )
        args = {k: v for k, v in self.folder_args.items() if v is not None}
        return folder_samples(self.root, seed=self.split_seed, **args)

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val/test datasets (once; later calls are no-ops)."""
        if self.train_dataset is not None:
            return
        train, test = self._samples()
        train = sorted(train, key=lambda s: str(s.image_path))
        val: list[Sample] = []
        if self.val_fraction > 0:
            count = max(1, round(self.val_fraction * len(train)))
            if count >= len(train):
                raise KDADError(
                    f"val_fraction={self.val_fraction} leaves no training image: only {len(train)}"
                    f" normal training image(s) under {self.root}"
                )
            chosen = set(
                np.random.default_rng(self.split_seed).permutation(len(train))[:count].tolist()
            )
            val = [s for i, s in enumerate(train) if i in chosen]
            train = [s for i, s in enumerate(train) if i not in chosen]
        test = sorted(test, key=lambda s: str(s.image_path))  # fixed order for reports
        anomalous = [s for s in test if s.label == 1]
        self.has_masks = bool(anomalous) and all(s.mask_path is not None for s in anomalous)
        self.train_dataset = AnomalyDataset(train, self.preprocess)
        self.val_dataset = AnomalyDataset(val, self.preprocess) if val else None
        self.test_dataset = AnomalyDataset(test, self.preprocess)
        self._maybe_cache()

    def _maybe_cache(self) -> None:
        """Keep the preprocessed training/validation tensors in memory (``data.cache``).

        They are read every epoch; the test set is read once and is never cached. ``auto``
        caches when they fit in ``data.cache_max_gb``.
        """
        datasets = [d for d in (self.train_dataset, self.val_dataset) if d is not None]
        size = sum(d.cache_bytes() for d in datasets)
        if self.cache is True or (self.cache == "auto" and size <= self.cache_max_gb * 2**30):
            for dataset in datasets:
                dataset.preload()

    def _loader(self, dataset: AnomalyDataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Preloaded tensors are read fastest in this process: worker processes would only add
        # the cost of sending them back (experiments/benchmark: 4,367 vs 1,090 img/s at 256 px).
        workers = 0 if dataset.preloaded else self.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_dataset is None:
            return []  # Lightning runs no validation for an empty list
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if not _distributed():
            return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)
        # Under DDP each test image goes to exactly one process: Lightning's default sampler
        # would pad the last shard with repeated images and count them twice in the metrics.
        return DataLoader(
            self.test_dataset,
            batch_size=self.eval_batch_size,
            sampler=ShardSampler(self.test_dataset),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )


def instantiate_data(data_cfg: DictConfig) -> Any:
    """The data module of ``cfg.data``; with ``data.download=true``, fetch the dataset first
    (:mod:`kdad.data.download`)."""
    container = OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True)
    download = bool(container.pop("download", False))
    if download:
        layout = str(container.get("layout"))
        ensure_dataset(layout, container["root"], dataset_spec(layout))
    return hydra.utils.instantiate(container, _convert_="all")
