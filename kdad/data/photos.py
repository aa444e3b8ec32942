"""``data=photos``: real photographs with planted, realistic defects, in the MVTec AD layout.

The team's benchmark for claims about the methods (claims are measured here, not on
procedural textures, where every variant looks alike). Each category is one
photograph that ships inside a pip package kdad depends on (scikit-image, scikit-learn), so
the benchmark needs no download. A normal image is a view of the photograph:

- ``texture`` categories: a window anywhere in the photograph (its surface is the product),
  with a small change of scale;
- ``object`` categories: the same object (or fixed-camera scene) in every image, as MVTec's
  aligned objects, with a small shift, rotation and scale, as a part placed on a fixture by
  hand;

then a small exposure and white-balance change and sensor noise. Test images carry one
defect each with its binary mask. The defects are meant to be realistic, not unmistakable:
thin scratches, low-contrast stains, small cuts, patches pasted from elsewhere in the same
photograph, and colour shifts, each drawn at several sizes (see :data:`DEFECT_TYPES`).

The masks cover the pixels a defect changed visibly (for soft-edged defects: where at least
half of its full strength is applied); the faint edge of a soft defect may lie outside.

scikit-image's brick, grass, gravel and immunohistochemistry images are never used: they are
reserved for an independent check of the project's claims.

Generation is deterministic (every random number derives from the seed and the image's
name) and atomic (:mod:`kdad.data.generated`).
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kdad.data.generated import ensure_generated, stable_rng, write_mvtec_tree
from kdad.errors import KDADError

GENERATOR_VERSION = 1  # bump when the images change, so old caches are not reused


@dataclass(frozen=True)
class PhotoSource:
    """Where a category's photograph comes from and how its normal views are cut."""

    package: str  # the importable package folder that holds the file
    file: str
    kind: str  # "texture" | "object"
    description: str
    window: float  # side of a view, in source pixels
    centre: tuple[float, float] | None = None  # object categories: the object's centre (x, y)
    jitter: float = 0.0  # object categories: shift, as a fraction of the window
    rotation: float = 0.0  # degrees, +/-
    scale: float = 0.05  # relative, +/-


PHOTO_SOURCES: dict[str, PhotoSource] = {
    "moon": PhotoSource(
        "skimage.data",
        "moon.png",
        "texture",
        "lunar surface (grey): craters and regolith under one light direction",
        window=192,
    ),
    "retina": PhotoSource(
        "skimage.data",
        "retina.jpg",
        "texture",
        "fundus photograph: orange retina with branching blood vessels (views inside the disc)",
        window=360,
    ),
    "coffee": PhotoSource(
        "skimage.data",
        "coffee.png",
        "object",
        "a cup of coffee with a spoon on its saucer, on a wooden table",
        window=370,
        centre=(268.0, 195.0),
        jitter=0.03,
        rotation=3.0,
        scale=0.03,
    ),
    "flower": PhotoSource(
        "sklearn.datasets.images",
        "flower.jpg",
        "object",
        "a dahlia flower head in front of blurred leaves",
        window=330,
        centre=(306.0, 214.0),
        jitter=0.03,
        rotation=3.0,
        scale=0.03,
    ),
    "coins": PhotoSource(
        "skimage.data",
        "coins.png",
        "object",
        "a tray of 24 old coins (grey) in four rows",
        window=276,
        centre=(192.0, 152.0),
        jitter=0.02,
        rotation=2.0,
        scale=0.02,
    ),
    "china": PhotoSource(
        "sklearn.datasets.images",
        "china.jpg",
        "object",
        "a fixed-camera scene: a pagoda among trees above a lake, hazy sky",
        window=400,
        centre=(320.0, 213.0),
        jitter=0.02,
        rotation=1.0,
        scale=0.02,
    ),
}
PHOTO_CATEGORIES = tuple(PHOTO_SOURCES)
# Never used by kdad: kept for an independent check of its claims.
RESERVED = ("brick.png", "grass.png", "gravel.png", "ihc.png")
DEFECT_TYPES = ("scratch", "stain", "cut", "paste", "colour")
DEFAULT_PARAMS = {
    "resolution": 256,
    "num_train": 100,
    "num_test_good": 30,
    "num_test_per_defect": 10,
    "seed": 0,
}
MARKER = ".kdad_photos.json"


# ----------------------------------------------------------------------------- sources


@functools.cache
def _photo(category: str) -> tuple[Image.Image, np.ndarray]:
    """The category's photograph (RGB) and where a view may lie (bool, source pixels)."""
    source = PHOTO_SOURCES[category]
    if source.file in RESERVED:  # pragma: no cover - a guard on the table above
        raise KDADError(f"{source.file} is reserved for an independent check")
    try:
        path = importlib.resources.files(source.package) / source.file
        with importlib.resources.as_file(path) as file, Image.open(file) as image:
            rgb = image.convert("RGB")
    except ModuleNotFoundError:
        raise KDADError(
            f"data=photos needs the {source.package.split('.')[0]} package: "
            "pip install 'kdad[photos]'"
        ) from None
    except (FileNotFoundError, OSError) as exc:
        raise KDADError(
            f"data=photos category {category}: cannot read {source.file} from the "
            f"{source.package.split('.')[0]} package ({type(exc).__name__}: {exc})"
        ) from None
    grey = np.asarray(rgb, dtype=np.float32).mean(axis=2)
    # The retina's fundus disc: views stay inside it (the corners must not be black).
    allowed = grey > 25 if category == "retina" else np.ones_like(grey, dtype=bool)
    return rgb, allowed


@dataclass
class _View:
    cx: float
    cy: float
    side: float  # source pixels covered by the view's width
    angle: float  # radians


def _random_view(category: str, rng: np.random.Generator) -> _View:
    source = PHOTO_SOURCES[category]
    image, allowed = _photo(category)
    width, height = image.size
    side = source.window * (1 + rng.uniform(-source.scale, source.scale))
    angle = math.radians(rng.uniform(-source.rotation, source.rotation))
    if source.kind == "object":
        cx, cy = source.centre  # type: ignore[misc]
        shift = rng.uniform(-source.jitter, source.jitter, 2) * source.window
        return _View(cx + shift[0], cy + shift[1], side, angle)
    half = side / 2 * math.sqrt(2)  # room for any rotation
    for _ in range(200):
        cx, cy = rng.uniform(half, width - half), rng.uniform(half, height - half)
        corners = [(cx + dx, cy + dy) for dx in (-half, half) for dy in (-half, half)]
        if all(allowed[int(y), int(x)] for x, y in corners):
            return _View(cx, cy, side, angle)
    raise AssertionError(f"no view fits inside the {category} photograph")  # pragma: no cover


def _render(category: str, view: _View, resolution: int) -> np.ndarray:
    """The view as float RGB (R, R, 3) in [0, 1] (bicubic resampling of the photograph)."""
    image, _ = _photo(category)
    step = view.side / resolution
    cos, sin = math.cos(view.angle) * step, math.sin(view.angle) * step
    half = resolution / 2
    # PIL's affine map sends output (x, y) to input (a x + b y + c, d x + e y + f).
    coeffs = (
        cos,
        -sin,
        view.cx - cos * half + sin * half,
        sin,
        cos,
        view.cy - sin * half - cos * half,
    )
    out = image.transform((resolution, resolution), Image.AFFINE, coeffs, Image.BICUBIC)
    return np.asarray(out, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- defects


class _Canvas:
    """One test image being drawn: pixel grids in image fractions and the category."""

    def __init__(self, category: str, resolution: int, view: _View) -> None:
        self.category, self.res, self.view = category, resolution, view
        grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
        self.x, self.y = np.meshgrid(grid, grid)

    def size(self, rng: np.random.Generator, small: float, large: float) -> float:
        """A defect size between ``small`` and ``large`` (image fractions), small ones as
        likely as large ones on a log scale: several sizes in every category."""
        return float(math.exp(rng.uniform(math.log(small), math.log(large))))

    def blob(self, rng: np.random.Generator, radius: float, softness: float) -> np.ndarray:
        """Strength in [0, 1] of an irregular round region with a soft edge."""
        cx, cy = rng.uniform(0.15, 0.85, 2)
        theta = np.arctan2(self.y - cy, self.x - cx)
        wobble = sum(
            rng.uniform(0, 0.15) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5)
        )
        r = np.hypot(self.x - cx, self.y - cy) / (radius * (1 + wobble))
        edge = np.clip((1 - r) / softness, 0, 1)
        return (edge * edge * (3 - 2 * edge)).astype(np.float32)  # smoothstep

    def curve_distance(self, points: np.ndarray) -> np.ndarray:
        """Distance (image fractions) of every pixel to the polyline ``points`` (M, 2)."""
        distance = np.full(self.x.shape, np.inf, dtype=np.float32)
        for p, q in itertools.pairwise(points):
            d = q - p
            h = np.clip(((self.x - p[0]) * d[0] + (self.y - p[1]) * d[1]) / (d @ d), 0, 1)
            distance = np.minimum(
                distance, np.hypot(self.x - p[0] - h * d[0], self.y - p[1] - h * d[1])
            )
        return distance

    def coverage(self, distance: np.ndarray, half_width: float) -> np.ndarray:
        """Anti-aliased coverage of a line of ``half_width`` (image fractions)."""
        pixels = distance * self.res
        return np.clip(half_width * self.res + 0.5 - pixels, 0, 1).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _scratch(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A thin (1-2.5 px at 256 px), gently curved line, a little lighter or darker."""
    length = canvas.size(rng, 0.12, 0.45)
    angle = rng.uniform(0, math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    start = rng.uniform(0.2, 0.8, 2) - 0.5 * length * direction
    end = start + length * direction
    bend = (start + end) / 2 + rng.normal(0, 0.04, 2)
    s = np.linspace(0, 1, 13)[:, None]
    curve = (1 - s) ** 2 * start + 2 * (1 - s) * s * bend + s**2 * end
    alpha = canvas.coverage(canvas.curve_distance(curve), rng.uniform(0.5, 1.25) / 256)
    luma = _luma(rgb)[..., None]
    # Lighter on dark surfaces, darker on light ones, by 12-30 % of the range.
    sign = np.where(luma < 0.5, 1.0, -1.0)
    rgb += alpha[..., None] * sign * rng.uniform(0.12, 0.30)
    return alpha >= 0.5


def _stain(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A low-contrast stain: a soft, slightly tinted darkening (or bleaching) of 8-20 %."""
    alpha = canvas.blob(rng, canvas.size(rng, 0.03, 0.14), softness=0.5)
    tint = np.array([1.0, 0.93, 0.80], dtype=np.float32) ** rng.uniform(0, 1.5)
    strength = rng.uniform(0.08, 0.20)
    target = rgb * (1 - strength) * tint if rng.random() < 0.7 else rgb + strength * (1 - rgb)
    rgb += alpha[..., None] * (target - rgb)
    return alpha >= 0.5


def _cut(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small cut: a short straight gash, dark inside, with a lighter rim along one side."""
    length = canvas.size(rng, 0.03, 0.10)
    angle = rng.uniform(0, math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    centre = rng.uniform(0.15, 0.85, 2)
    ends = np.stack([centre - 0.5 * length * direction, centre + 0.5 * length * direction])
    half_width = rng.uniform(0.75, 1.75) / 256
    gash = canvas.coverage(canvas.curve_distance(ends), half_width)
    normal = np.array([-direction[1], direction[0]]) * 2.0 * half_width
    rim = canvas.coverage(canvas.curve_distance(ends + normal), half_width * 0.6) * (1 - gash)
    depth = rng.uniform(0.35, 0.65)
    rgb *= 1 - depth * gash[..., None]
    rgb += 0.5 * depth * rim[..., None] * (1 - rgb)
    return (gash >= 0.5) | (rim >= 0.5)


def _paste(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A patch of the same photograph from elsewhere (a quarter to half a view away)."""
    radius = canvas.size(rng, 0.04, 0.12)
    alpha = canvas.blob(rng, radius, softness=0.08)
    view = canvas.view
    angle = rng.uniform(0, 2 * math.pi)
    distance = rng.uniform(0.25, 0.5) * view.side
    other = _View(
        view.cx + distance * math.cos(angle),
        view.cy + distance * math.sin(angle),
        view.side,
        view.angle + math.radians(rng.choice([0.0, 90.0, 180.0, 270.0])),
    )
    donor = _render(canvas.category, _clamped(canvas.category, other), canvas.res)
    rgb += alpha[..., None] * (donor - rgb)
    return alpha >= 0.5


def _clamped(category: str, view: _View) -> _View:
    """``view`` moved back inside the photograph (and the retina's disc) if it left it."""
    image, allowed = _photo(category)
    width, height = image.size
    half = view.side / 2 * math.sqrt(2)
    cx = min(max(view.cx, half), width - half)
    cy = min(max(view.cy, half), height - half)
    if not allowed[int(cy), int(cx)]:
        cx, cy = width / 2, height / 2
    return _View(cx, cy, view.side, view.angle)


def _colour(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft colour shift: hue turned by 20-45 degrees and a colour cast of 4-8 %."""
    alpha = canvas.blob(rng, canvas.size(rng, 0.04, 0.15), softness=0.5)
    luma = _luma(rgb)[..., None]
    chroma = rgb - luma
    turn = math.radians(rng.choice([-1.0, 1.0]) * rng.uniform(20, 45))
    # Rotation about the grey axis: Rodrigues' formula with the unit vector (1, 1, 1)/sqrt(3).
    k = np.ones(3, dtype=np.float32) / math.sqrt(3)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=np.float32)
    rotation = (
        np.eye(3, dtype=np.float32) + math.sin(turn) * cross + (1 - math.cos(turn)) * cross @ cross
    )
    cast = rng.normal(0, 1, 3).astype(np.float32)
    cast -= cast.mean()
    cast *= rng.uniform(0.04, 0.08) / (np.abs(cast).max() + 1e-6)
    shifted = luma + chroma @ rotation.T + cast
    rgb += alpha[..., None] * (shifted - rgb)
    return alpha >= 0.5


_DEFECTS = {
    "scratch": _scratch,
    "stain": _stain,
    "cut": _cut,
    "paste": _paste,
    "colour": _colour,
}


# ----------------------------------------------------------------------------- images


def render_photo(
    category: str,
    split: str,
    index: int,
    defect: str | None = None,
    resolution: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: ``(image, mask, clean)``; uint8 (R, R, 3) images, bool (R, R) mask.

    ``clean`` is the same view without the defect (the same exposure and noise), so
    ``image != clean`` where the defect changed pixels; ``mask`` is all False for normal images.
    """
    if category not in PHOTO_SOURCES:
        raise KDADError(
            f"unknown photos category '{category}'; valid: {', '.join(PHOTO_CATEGORIES)}"
        )
    rng = stable_rng(seed, "photos", category, split, defect, index)
    view = _random_view(category, rng)
    rgb = _render(category, view, resolution)
    gain = (1 + rng.uniform(-0.04, 0.04)) * (1 + rng.uniform(-0.015, 0.015, 3))
    rgb = rgb * gain.astype(np.float32) + np.float32(rng.uniform(-0.015, 0.015))
    clean = rgb.copy()
    mask = np.zeros((resolution, resolution), dtype=bool)
    if defect is not None:
        mask = _DEFECTS[defect](_Canvas(category, resolution, view), rgb, rng)
        if not mask.any():  # a defect too thin for this resolution still marks its centre
            changed = np.abs(rgb - clean).max(axis=2)
            mask[np.unravel_index(np.argmax(changed), mask.shape)] = True
    noise = rng.normal(0, 0.01, rgb.shape).astype(np.float32)

    def to_uint8(values: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((values + noise) * 255), 0, 255).astype(np.uint8)

    return to_uint8(rgb), mask, to_uint8(clean)


def _generate(folder: Path, category: str, params: dict) -> None:
    """Write the whole MVTec-layout tree of one category into ``folder``."""

    def render(split: str, index: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _ = render_photo(
            category, split, index, defect, params["resolution"], params["seed"]
        )
        return image, mask

    write_mvtec_tree(folder, params, DEFECT_TYPES, render)


def ensure_photos(root: str | Path, category: str, **params: int) -> Path:
    """Generate photos ``category`` under ``root`` unless already there; returns the dataset
    root to pass to :func:`~kdad.data.layouts.mvtec_samples`.

    ``params``: resolution (256), num_train (100), num_test_good (30), num_test_per_defect
    (10), seed (0); each parameter set has its own sub-folder of ``root``.
    """
    return ensure_generated(
        "photos",
        root,
        category,
        PHOTO_CATEGORIES,
        params,
        DEFAULT_PARAMS,
        min_resolution=32,
        version=GENERATOR_VERSION,
        generate=_generate,
        marker_name=MARKER,
    )


__all__ = [
    "DEFAULT_PARAMS",
    "DEFECT_TYPES",
    "PHOTO_CATEGORIES",
    "PHOTO_SOURCES",
    "ensure_photos",
    "render_photo",
]
