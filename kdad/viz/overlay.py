"""Pictures of anomaly maps: the colour map, training-time test panels and prediction overlays."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from kdad.metrics.thresholds import normalize

CAPTION_HEIGHT = 18


def colorize(heat: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H,W) floats -> (H,W,3) uint8 with the jet colormap on a fixed [vmin, vmax] scale."""
    from matplotlib import colormaps  # imported lazily: only needed when images are written

    scaled = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def colour_bar(height: int, vmin: float, vmax: float, width: int = 10) -> np.ndarray:
    """A vertical jet colour bar of ``height`` pixels (top: ``vmax``) with both ends written
    beside it, as (height, W, 3) uint8 on black: the scale of :func:`colorize`."""
    top, bottom = f"{vmax:.3g}", f"{vmin:.3g}"
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = int(max(draw.textlength(top), draw.textlength(bottom))) + 4
    strip = Image.new("RGB", (width + 3 + text_width, height), (0, 0, 0))
    gradient = colorize(np.linspace(vmax, vmin, height)[:, None].repeat(width, 1), vmin, vmax)
    strip.paste(Image.fromarray(gradient), (2, 0))
    writer = ImageDraw.Draw(strip)
    writer.text((width + 4, 0), top, fill=(255, 255, 255))
    writer.text((width + 4, max(0, height - 11)), bottom, fill=(255, 255, 255))
    return np.asarray(strip)


def heatmap_panel(
    image: np.ndarray, mask: np.ndarray, heat: np.ndarray, vmin: float, vmax: float
) -> np.ndarray:
    """Input | ground truth | heatmap over the input | colour bar of [vmin, vmax] (uint8 HxWx3)."""
    gt = np.repeat((mask > 0.5).astype(np.uint8)[..., None] * 255, 3, axis=2)
    overlay = (0.5 * image.astype(np.float32) + 0.5 * colorize(heat, vmin, vmax)).astype(np.uint8)
    bar = colour_bar(image.shape[0], vmin, vmax)
    return np.concatenate([image, gt, overlay, bar], axis=1)


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The boundary pixels of a boolean mask (image borders close it), ``width`` pixels thick."""
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1) & mask
    return edge


def render_overlay(
    display: np.ndarray,
    heat: np.ndarray,
    pixel_level: dict[str, Any] | None,
    caption: str,
    caption_color: tuple[int, int, int],
) -> np.ndarray:
    """image | heatmap over the image (+ mask contour) | image with the mask contour, captioned.

    With a pixel threshold the colours are on the normalised scale [0, 2] (blue: the median
    normal pixel, the middle of the scale: the threshold), the same for every image; without
    one each map is stretched to its own range and no mask is drawn.
    """
    finite = np.isfinite(heat)
    if pixel_level:
        coloured = colorize(np.nan_to_num(normalize(heat, pixel_level)), 0.0, 2.0)
        mask = np.where(finite, heat, -np.inf) > pixel_level["threshold"]
    else:
        values = heat[finite]
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        coloured = colorize(np.nan_to_num(heat, nan=low), low, high)
        mask = np.zeros(heat.shape, dtype=bool)
    blend = np.where(finite[..., None], 0.5 * display + 0.5 * coloured, display).astype(np.uint8)
    outlined = display.copy()
    edge = contour(mask, width=max(1, max(display.shape[:2]) // 256))
    blend[edge] = (255, 255, 255)
    outlined[edge] = (255, 0, 0)
    panels = np.concatenate([display, blend, outlined], axis=1)
    bar = Image.new("RGB", (panels.shape[1], CAPTION_HEIGHT), (24, 24, 24))
    ImageDraw.Draw(bar).text((4, 3), caption, fill=caption_color)
    return np.concatenate([panels, np.asarray(bar)], axis=0)
