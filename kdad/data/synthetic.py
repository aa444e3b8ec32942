"""A deterministic synthetic anomaly-detection dataset in the MVTec AD layout.

Each category is a procedural texture (numpy only); every normal image is a random variation
of it (phase, small rotation and scale, colour jitter, sensor noise). Test images carry one
defect each, with its exact binary mask: the mask covers every pixel the defect changed.
Visible defects are obvious in local statistics, so small models with random-weight teachers
can learn them; subtle ones are low-contrast or geometric and are there for realism.

Data are generated on first use by :func:`ensure_synthetic` under
``<root>/<parameter folder>/<category>``, atomically (:mod:`kdad.data.generated`).
Every random number derives from ``(seed, crc32(category/split/defect/index))``, so the same
parameters give byte-identical files on every machine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdad.data.generated import ensure_generated, stable_rng, write_mvtec_tree, write_png

GENERATOR_VERSION = 1  # bump when the images change, so old caches are not reused
SYNTHETIC_CATEGORIES = ("stripes", "checker", "cells", "weave", "wood", "dots")
VISIBLE_DEFECTS = ("scratch", "color_spot", "hole", "contamination")
SUBTLE_DEFECTS = ("faint_spot", "warp")
DEFECT_TYPES = VISIBLE_DEFECTS + SUBTLE_DEFECTS
DEFAULT_PARAMS = {
    "resolution": 256,
    "num_train": 60,
    "num_test_good": 20,
    "num_test_per_defect": 8,
    "seed": 0,
}
MARKER = ".kdad_synthetic.json"

Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) -> intensity in [0, 1]

# Background and foreground colours (RGB in [0, 1]); all fairly light, so dark defects show.
_PALETTES = {
    "stripes": ((0.78, 0.74, 0.62), (0.38, 0.45, 0.62)),
    "checker": ((0.85, 0.85, 0.82), (0.45, 0.47, 0.50)),
    "cells": ((0.80, 0.66, 0.50), (0.52, 0.36, 0.24)),
    "weave": ((0.42, 0.40, 0.30), (0.82, 0.78, 0.62)),
    "wood": ((0.80, 0.62, 0.42), (0.55, 0.36, 0.20)),
    "dots": ((0.70, 0.80, 0.80), (0.25, 0.50, 0.55)),
}
_SPOT_COLOURS = np.array(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.75, 0.15],
        [0.15, 0.20, 0.90],
        [0.90, 0.15, 0.85],
        [0.95, 0.90, 0.05],
    ]
)


# ----------------------------------------------------------------------------- textures


def _value_noise(rng: np.random.Generator, size: int = 16) -> Texture:
    """Smooth periodic noise in [0, 1]: a random lattice, sampled with smoothstep blending."""
    lattice = rng.random((size, size))

    def sample(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        i0, j0 = np.floor(u), np.floor(v)
        fu, fv = u - i0, v - j0
        fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
        i0, j0 = i0.astype(np.int64) % size, j0.astype(np.int64) % size
        i1, j1 = (i0 + 1) % size, (j0 + 1) % size
        top = lattice[j0, i0] * (1 - fu) + lattice[j0, i1] * fu
        bottom = lattice[j1, i0] * (1 - fu) + lattice[j1, i1] * fu
        return top * (1 - fv) + bottom * fv

    return sample


def _stripes(rng: np.random.Generator) -> Texture:
    wobble = _value_noise(rng)
    return lambda u, v: (
        0.5 + 0.5 * np.tanh(2.5 * np.sin(2 * np.pi * (10 * u + 0.15 * wobble(2 * u, 2 * v))))
    )


def _checker(rng: np.random.Generator) -> Texture:
    return lambda u, v: (
        0.5 + 0.5 * np.tanh(4 * np.sin(2 * np.pi * 6 * u) * np.sin(2 * np.pi * 6 * v))
    )


def _cells(rng: np.random.Generator) -> Texture:
    """Worley cells: one jittered point per grid cell, dark borders where two are equidistant."""
    size, k = 32, 8
    points = rng.uniform(0.1, 0.9, (size, size, 2))

    def sample(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        a, b = u * k, v * k
        ia, ib = np.floor(a).astype(np.int64), np.floor(b).astype(np.int64)
        d1 = np.full(a.shape, 9.0)
        d2 = np.full(a.shape, 9.0)
        for da in (-1, 0, 1):
            for db in (-1, 0, 1):
                pa, pb = ia + da, ib + db
                point = points[pb % size, pa % size]
                d = np.hypot(pa + point[..., 0] - a, pb + point[..., 1] - b)
                d2 = np.minimum(d2, np.maximum(d1, d))  # second-nearest so far
                d1 = np.minimum(d1, d)
        return np.clip((d2 - d1) * 4, 0, 1) * (1 - 0.4 * np.clip(d1, 0, 1))

    return sample


def _weave(rng: np.random.Generator) -> Texture:
    """Basket weave: blocks of three threads, horizontal and vertical in alternation."""
    k = 6

    def sample(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        a, b = u * k, v * k
        horizontal = (np.floor(a) + np.floor(b)) % 2 == 0
        across = np.where(horizontal, b, a)
        along = np.where(horizontal, a, b)
        thread = np.sin(np.pi * ((across * 3) % 1.0)) ** 0.7
        edge = np.clip(np.sin(np.pi * (along % 1.0)) * 4, 0, 1)  # shadow at block ends
        return thread * (0.6 + 0.4 * edge)

    return sample


def _wood(rng: np.random.Generator) -> Texture:
    """Growth rings bent by smooth noise, plus fine grain along them."""
    bend, grain = _value_noise(rng), _value_noise(rng)

    def sample(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        rings = 7 * v + 1.2 * bend(1.5 * u, 1.5 * v)
        base = (0.5 + 0.5 * np.sin(2 * np.pi * rings)) ** 2
        return np.clip(0.8 * base + 0.3 * grain(2 * u, 40 * v) - 0.1, 0, 1)

    return sample


def _dots(rng: np.random.Generator) -> Texture:
    """Round dots on a hexagonal lattice."""
    k = 9

    def sample(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        b = v * k * 2 / math.sqrt(3)
        a = u * k + 0.5 * (np.floor(b) % 2)  # shift every other row by half a period
        d = np.hypot(a % 1.0 - 0.5, (b % 1.0 - 0.5) * math.sqrt(3) / 2)
        return 1 - np.clip((d - 0.22) / 0.06, 0, 1)

    return sample


_TEXTURES: dict[str, Callable[[np.random.Generator], Texture]] = {
    "stripes": _stripes,
    "checker": _checker,
    "cells": _cells,
    "weave": _weave,
    "wood": _wood,
    "dots": _dots,
}

# ----------------------------------------------------------------------------- defects


class _Canvas:
    """One image being drawn: texture coordinates, the texture and its colouring."""

    def __init__(self, category: str, res: int, rng: np.random.Generator) -> None:
        self.category, self.res = category, res
        grid = (np.arange(res) + 0.5) / res
        self.x, self.y = np.meshgrid(grid, grid)  # pixel centres in [0, 1]
        angle = np.clip(rng.normal(0, 0.05), -0.1, 0.1)  # radians, about 3 degrees
        scale = 1 + np.clip(rng.normal(0, 0.03), -0.06, 0.06)
        phase = rng.random(2) * 8
        cx, cy = self.x - 0.5, self.y - 0.5
        self.u = scale * (math.cos(angle) * cx - math.sin(angle) * cy) + phase[0]
        self.v = scale * (math.sin(angle) * cx + math.cos(angle) * cy) + phase[1]
        self.texture = _TEXTURES[category](rng)
        self.t = self.texture(self.u, self.v)
        jitter = 1 + rng.normal(0, 0.025, (2, 3)) + rng.normal(0, 0.03)
        self.palette = np.clip(np.array(_PALETTES[category]) * jitter, 0, 1)
        # A gentle illumination gradient: normal images are not all equally lit.
        gx, gy = rng.normal(0, 0.04, 2)
        self.light = 1 + gx * cx + gy * cy

    def colour(self, t: np.ndarray, where: np.ndarray | tuple = ()) -> np.ndarray:
        """RGB for intensities ``t`` at pixels ``where`` (all pixels by default)."""
        c0, c1 = self.palette
        return (c0 + t[..., None] * (c1 - c0)) * self.light[where][..., None]

    def blob(self, rng: np.random.Generator, r_min: float, r_max: float) -> np.ndarray:
        """An irregular round region (bool mask), radius in image fractions."""
        cx, cy = rng.uniform(0.2, 0.8, 2)
        radius = rng.uniform(r_min, r_max)
        theta = np.arctan2(self.y - cy, self.x - cx)
        wobble = sum(
            rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5)
        )
        mask = np.hypot(self.x - cx, self.y - cy) < radius * (1 + wobble)
        mask[int(cy * self.res), int(cx * self.res)] = True  # never empty, even at tiny sizes
        return mask

    def contrast_colour(self) -> np.ndarray:
        """The saturated spot colour farthest from this texture's colours."""
        distance = np.abs(_SPOT_COLOURS[:, None] - self.palette[None]).sum(-1).min(1)
        return _SPOT_COLOURS[int(np.argmax(distance))]


def _scratch(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A long, slightly curved line of 3-5 px, much darker (or brighter) than the texture."""
    length, angle = rng.uniform(0.3, 0.6), rng.uniform(0, math.pi)
    start = rng.uniform(0.2, 0.8, 2) - 0.5 * length * np.array([math.cos(angle), math.sin(angle)])
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    bend = (start + end) / 2 + rng.normal(0, 0.06, 2)
    s = np.linspace(0, 1, 17)[:, None]
    curve = (1 - s) ** 2 * start + 2 * (1 - s) * s * bend + s**2 * end  # quadratic Bezier
    half_width = max(rng.uniform(0.007, 0.012), 0.75 / canvas.res)
    distance = np.full(canvas.x.shape, np.inf)
    for p, q in itertools.pairwise(curve):
        d = q - p
        h = np.clip(((canvas.x - p[0]) * d[0] + (canvas.y - p[1]) * d[1]) / (d @ d), 0, 1)
        distance = np.minimum(
            distance, np.hypot(canvas.x - p[0] - h * d[0], canvas.y - p[1] - h * d[1])
        )
    mask = distance <= half_width
    mask[np.unravel_index(np.argmin(distance), mask.shape)] = True
    ink = 0.05 if canvas.palette.mean() > 0.45 else 0.95
    rgb[mask] = 0.1 * rgb[mask] + 0.9 * ink
    return mask


def _color_spot(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A stain of a saturated colour that the texture never has."""
    mask = canvas.blob(rng, 0.06, 0.1)
    rgb[mask] = 0.15 * rgb[mask] + 0.85 * canvas.contrast_colour()
    return mask


def _hole(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A nearly black patch with only a trace of the texture left."""
    mask = canvas.blob(rng, 0.05, 0.09)
    rgb[mask] = 0.04 + 0.1 * rgb[mask]
    return mask


def _contamination(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A patch of another category's texture, finer and in contrasting colours."""
    mask = canvas.blob(rng, 0.08, 0.12)
    others = [c for c in SYNTHETIC_CATEGORIES if c != canvas.category]
    foreign = _TEXTURES[others[int(rng.integers(len(others)))]](rng)
    t = foreign(1.7 * canvas.u[mask], 1.7 * canvas.v[mask])[:, None]
    rgb[mask] = 0.08 + t * (canvas.contrast_colour() - 0.08)
    return mask


def _faint_spot(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A low-contrast spot: a uniform brightness shift of 12-20 grey levels."""
    mask = canvas.blob(rng, 0.05, 0.1)
    rgb[mask] += rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.08)
    return mask


def _warp(canvas: _Canvas, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A local swirl and bulge of the texture: same colours, distorted geometry."""
    cx, cy = rng.uniform(0.2, 0.8, 2)
    radius = rng.uniform(0.08, 0.12)
    distance = np.hypot(canvas.x - cx, canvas.y - cy)
    mask = distance < radius
    mask[int(cy * canvas.res), int(cx * canvas.res)] = True
    # Both effects fall smoothly to 0 at the rim, so there is no seam; the bulge (sampling
    # nearer the centre) also changes rotation-symmetric spots such as dots.
    falloff = (1 - np.minimum(distance[mask] / radius, 1) ** 2) ** 2
    angle = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.3) * falloff
    zoom = 1 - rng.uniform(0.3, 0.45) * falloff
    u0, v0 = canvas.u[mask], canvas.v[mask]
    centre = np.argmin(distance[mask])
    du, dv = zoom * (u0 - u0[centre]), zoom * (v0 - v0[centre])
    u = u0[centre] + np.cos(angle) * du - np.sin(angle) * dv
    v = v0[centre] + np.sin(angle) * du + np.cos(angle) * dv
    rgb[mask] = canvas.colour(canvas.texture(u, v), mask)
    return mask


# ----------------------------------------------------------------------------- rendering

_DEFECTS = {
    "scratch": _scratch,
    "color_spot": _color_spot,
    "hole": _hole,
    "contamination": _contamination,
    "faint_spot": _faint_spot,
    "warp": _warp,
}


_rng = stable_rng


def render_sample(
    category: str,
    split: str,
    index: int,
    defect: str | None = None,
    resolution: int = 256,
    seed: int = 0,
    with_clean: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One image: ``(image, mask, clean)``; uint8 (R, R, 3) images, bool (R, R) mask.

    ``clean`` is the same image without the defect (identical noise), so ``image != clean``
    exactly where the defect changed pixels; ``mask`` is all False for normal images.
    """
    canvas = _Canvas(category, resolution, _rng(seed, category, split, defect, index, "texture"))
    rgb = canvas.colour(canvas.t)
    clean = rgb.copy() if with_clean else None
    mask = np.zeros((resolution, resolution), dtype=bool)
    if defect is not None:
        mask = _DEFECTS[defect](canvas, rgb, _rng(seed, category, split, defect, index, "defect"))
    noise = _rng(seed, category, split, defect, index, "noise").normal(0, 0.015, rgb.shape)

    def to_uint8(values: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((values + noise) * 255), 0, 255).astype(np.uint8)

    return to_uint8(rgb), mask, None if clean is None else to_uint8(clean)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write one PNG (a separate function so tests can make it fail mid-generation)."""
    write_png(path, array)


def _generate(folder: Path, category: str, params: dict) -> None:
    """Write the whole MVTec-layout tree of one category into ``folder``."""

    def render(split: str, index: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _ = render_sample(
            category, split, index, defect, params["resolution"], params["seed"], False
        )
        return image, mask

    # _write_png looked up at call time (tests make it fail mid-generation).
    write_mvtec_tree(folder, params, DEFECT_TYPES, render, lambda p, a: _write_png(p, a))


def ensure_synthetic(root: str | Path, category: str, **params: int) -> Path:
    """Generate synthetic ``category`` under ``root`` unless already there; returns the
    dataset root to pass to :func:`~kdad.data.layouts.mvtec_samples`.

    ``params``: resolution (256), num_train (60), num_test_good (20), num_test_per_defect (8),
    seed (0). Each parameter set lives in its own sub-folder of ``root``, so changing one
    never reuses (or destroys) another set's images.
    """
    # _generate looked up at call time (tests replace it).
    return ensure_generated(
        "synthetic",
        root,
        category,
        SYNTHETIC_CATEGORIES,
        params,
        DEFAULT_PARAMS,
        min_resolution=16,
        version=GENERATOR_VERSION,
        generate=lambda folder, name, merged: _generate(folder, name, merged),
        marker_name=MARKER,
    )
