"""The torch ``Dataset`` over a list of :class:`~kdad.data.layouts.Sample`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from kdad.data.layouts import Sample
from kdad.data.transforms import Preprocess, file_problem, image_size, load_image, load_mask
from kdad.errors import KDADError


class AnomalyDataset(Dataset):
    """Loads and preprocesses samples on access (picklable, so DataLoader workers can use it).

    Each item is a dict: ``image`` (3, S, S) float, ``mask`` (1, S, S) float of 0/1 (all zeros
    for normal images and anomalous images without a mask), ``label`` int64 scalar tensor,
    ``path`` str and ``defect_type`` str.
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self._cache: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def cache_bytes(self) -> int:
        """Memory the preprocessed items would take (image + mask, float32)."""
        return len(self.samples) * 4 * 4 * self.preprocess.output_size**2

    @property
    def preloaded(self) -> bool:
        return self._cache is not None

    def preload(self) -> None:
        """Decode and preprocess every item once and keep the tensors in memory.

        Items are bit-identical to uncached ones, so results do not change; epochs after the
        first skip image decoding and resizing. Call it in the main process: DataLoader
        workers forked afterwards share the tensors instead of copying them.
        """
        if self._cache is None:
            self._cache = [self._load(i) for i in range(len(self.samples))]

    def __getitem__(self, index: int) -> dict:
        if self._cache is not None:
            return self._cache[index]
        return self._load(index)

    def _load(self, index: int) -> dict:
        sample = self.samples[index]
        pixels = load_image(sample.image_path)
        image = self.preprocess(pixels)
        size = self.preprocess.output_size
        if sample.label == 1 and sample.mask_path is not None:
            raw = load_mask(sample.mask_path)
            _check_mask_shape(raw.shape, pixels.shape[:2], sample)
            mask = self.preprocess.transform_mask(raw)
        else:
            mask = torch.zeros(1, size, size)
        return {
            "image": image,
            "mask": mask,
            "label": torch.tensor(sample.label, dtype=torch.int64),
            # Position in this split: keys the training loop's teacher-feature cache.
            "index": torch.tensor(index, dtype=torch.int64),
            "path": str(sample.image_path),
            "defect_type": sample.defect_type,
        }

    @property
    def labels(self) -> list[int]:
        """Image labels in dataset order, without loading any image."""
        return [s.label for s in self.samples]


def _check_mask_shape(mask: tuple[int, ...], image: tuple[int, ...], sample: Sample) -> None:
    """A mask must have its image's shape, or at least its aspect ratio (a scaled mask);
    anything else is almost surely the mask of another image."""
    if mask != image and abs(mask[0] * image[1] - mask[1] * image[0]) > 0.02 * mask[1] * image[1]:
        raise KDADError(
            f"mask {sample.mask_path} is {mask[1]}x{mask[0]} but its image {sample.image_path}"
            f" is {image[1]}x{image[0]}"
        )


def verify_files(datasets: Iterable[AnomalyDataset | None]) -> int:
    """Check every image and mask file the datasets will read (:func:`file_problem`) and that
    each mask has its image's size or aspect ratio, before any work is spent on them; one line
    naming the first bad file(s). Returns the count."""
    problems: list[str] = []
    count = 0
    for dataset in datasets:
        for sample in dataset.samples if dataset is not None else ():
            readable = True
            for path in (sample.image_path, sample.mask_path):
                if path is None:
                    continue
                count += 1
                reason = file_problem(path)
                if reason is not None:
                    problems.append(f"{path}: {reason}")
                    readable = False
            if readable and sample.label == 1 and sample.mask_path is not None:
                # A mask of the wrong size, from the headers (nothing decoded).
                try:
                    _check_mask_shape(
                        image_size(sample.mask_path), image_size(sample.image_path), sample
                    )
                except KDADError as exc:
                    problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more, e.g. {problems[1]})" if len(problems) > 1 else ""
        raise KDADError(
            f"{len(problems)} of {count} image/mask files cannot be used: {problems[0]}{more}; "
            "fix or remove them (nothing was trained)"
        )
    return count
