"""Image/mask loading and the model-input preprocessing.

``load_image`` turns any PIL mode into 8-bit RGB, scaling 16-bit and float data into range
instead of clipping them; ``load_mask`` turns any mask file into a boolean array (> 0 is
anomalous). :class:`Preprocess` resizes, centre-crops and normalises both for the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from kdad.errors import KDADError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How ground-truth masks are resampled to the model's input size (see Preprocess).
MASK_RESIZE = ("nearest", "bilinear")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(path: str | Path) -> Image.Image:
    """The decoded image at ``path``; a missing or undecodable file is a user error."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not later
            return image
    except FileNotFoundError as exc:
        raise KDADError(f"image file {path} does not exist") from exc
    except UnidentifiedImageError as exc:
        raise KDADError(
            f"cannot read image file {path}: not an image format PIL can decode"
        ) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise KDADError(f"cannot read image file {path}: {exc}") from exc


def file_problem(path: str | Path) -> str | None:
    """Why the image or mask file at ``path`` cannot be read (its header and, for PNG, every
    chunk's checksum), or None. Cheap: nothing is decoded."""
    try:
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        return "does not exist"
    except UnidentifiedImageError:
        return "not an image format PIL can decode"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return " ".join(str(exc).split())[:160] or type(exc).__name__
    return None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image at ``path``, from its header."""
    with Image.open(path) as image:
        return image.height, image.width


def _to_uint8(image: Image.Image) -> np.ndarray:
    """An HxW or HxWxC uint8 array of ``image``, with wide integer/float data scaled to 0..255."""
    if image.mode in _SIXTEEN_BIT:
        # 16-bit data ("I" is how some Pillow versions open 16-bit PNGs): 65535 -> 255.
        data = np.asarray(image).astype(np.float64) / 257.0
    elif image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        # Float images are either in [0, 1] or already on the 8-bit scale.
        data = data * 255.0 if np.nanmax(data, initial=0.0) <= 1.0 else data
        data = np.nan_to_num(data)
    else:
        if image.mode not in ("L", "RGB"):
            # LA/RGBA lose alpha, P expands its palette, CMYK/YCbCr/1 convert to RGB.
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)  # a writable copy, unlike np.asarray
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def load_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as a uint8 RGB array of shape (H, W, 3)."""
    image = _open(path)
    try:
        data = _to_uint8(image)
    except ValueError as exc:  # a mode PIL cannot convert to RGB (e.g. HSV)
        raise KDADError(
            f"cannot convert image file {path} (mode {image.mode}) to RGB: {exc}"
        ) from exc
    if data.ndim == 2:
        data = np.repeat(data[:, :, None], 3, axis=2)
    return np.ascontiguousarray(data)


def load_mask(path: str | Path) -> np.ndarray:
    """The mask at ``path`` as a bool array (H, W): True where any colour channel is > 0."""
    image = _open(path)
    if image.mode in (*_SIXTEEN_BIT, "F", "L", "1"):
        data = np.asarray(image)
    else:
        try:  # alpha is ignored: an opaque black RGBA pixel is still "normal"
            data = np.asarray(image.convert("RGB"))
        except ValueError as exc:
            raise KDADError(f"cannot convert mask file {path} (mode {image.mode}): {exc}") from exc
    data = np.nan_to_num(data.astype(np.float64))
    return data.max(axis=2) > 0 if data.ndim == 3 else data > 0


def denormalize(
    tensor: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Undo the normalisation of a (3, H, W) tensor: a uint8 (H, W, 3) array for drawing."""
    tensor = torch.as_tensor(tensor).detach().cpu().float()
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (tensor * std_t + mean_t).clamp(0, 1).mul(255).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


class Preprocess:
    """Image -> normalised (3, S, S) tensor; mask -> binary (1, S, S) tensor, S = output_size.

    Images are resized (bilinear, antialiased) to ``image_size`` x ``image_size`` (aspect ratio
    is not kept, as in the RD4AD/STFPM reference code), then centre-cropped to ``crop_size``.
    Masks get the same geometry; ``mask_resize`` says how they are resampled:

    - ``nearest``: nearest neighbour at pixel centres (the mask stays binary as sampled);
    - ``bilinear``: bilinear, antialiased like PIL's resize, then ``> 0.5`` — the official
      RD4AD code (``transforms.Resize`` of the mask image, then ``gt > 0.5``).
    """

    def __init__(
        self,
        image_size: int,
        crop_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        mask_resize: str = "nearest",
    ) -> None:
        if mask_resize not in MASK_RESIZE:
            raise KDADError(
                f"mask_resize must be one of {', '.join(MASK_RESIZE)}, got {mask_resize!r}"
            )
        self.mask_resize = mask_resize
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise KDADError(f"image_size must be a positive integer, got {image_size!r}")
        if crop_size is not None and (
            isinstance(crop_size, bool)
            or not isinstance(crop_size, int)
            or not 0 < crop_size <= image_size
        ):
            raise KDADError(
                f"crop_size must be an integer in 1..image_size={image_size}, got {crop_size!r}"
            )
        self.image_size = image_size
        self.crop_size = crop_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def output_size(self) -> int:
        """Side length of the tensors this produces."""
        return self.crop_size or self.image_size

    def _geometry(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Resize a (1, C, H, W) tensor to image_size, then centre-crop; returns (C, S, S)."""
        size = self.image_size
        if x.shape[-2:] != (size, size):
            if mode == "bilinear":
                x = F.interpolate(x, (size, size), mode=mode, align_corners=False, antialias=True)
            else:
                x = F.interpolate(x, (size, size), mode=mode)
        if self.crop_size is not None:
            top = (size - self.crop_size) // 2
            x = x[..., top : top + self.crop_size, top : top + self.crop_size]
        return x[0]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) image -> normalised float (3, S, S) tensor."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
        x = self._geometry(x, "bilinear").clamp(0.0, 1.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def transform_mask(self, mask: np.ndarray) -> torch.Tensor:
        """bool/0-1 (H, W) mask -> float (1, S, S) tensor of exactly 0.0 and 1.0."""
        x = torch.from_numpy(np.ascontiguousarray(mask > 0)).float()[None, None]
        # "nearest-exact" samples pixel centres like PIL; plain "nearest" shifts by half a pixel.
        if self.mask_resize == "nearest":
            return (self._geometry(x, "nearest-exact") > 0.5).float().contiguous()
        # RD4AD resizes the 8-bit mask image with PIL, whose output is 8-bit again: round to
        # 1/255 steps as it does, so that half-covered pixels (0.5 -> 128/255) count as defect.
        resized = torch.round(self._geometry(x * 255.0, "bilinear")) / 255.0
        return (resized > 0.5).float().contiguous()

    def denormalize(self, tensor: torch.Tensor) -> np.ndarray:
        """Undo this normalisation: a (3, H, W) tensor -> uint8 (H, W, 3) array."""
        return denormalize(tensor, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"Preprocess(image_size={self.image_size}, crop_size={self.crop_size}, "
            f"mask_resize={self.mask_resize!r})"
        )
