"""Deterministic 2D stylization filters: the training images of the per-style diffusion teachers.

Each filter maps an RGB uint8 crop [H, W, 3] to a stylized RGB uint8 crop of the same size; sizes (blur radii,
edge widths) scale with the crop, so a 128-px and a 256-px crop of the same face look alike. No randomness: the
same input always gives the same output (the oil filter's brush texture is a fixed function of the pixel grid).

* `sketch`: pencil sketch, a colour-dodge blend of the grey image with its blurred negative, on warm paper.
* `toon`: repeated bilateral smoothing, colour quantisation and dark ink edges.
* `oil`: a Kuwahara filter (flattest of four quadrant means), a saturation boost and a directional brush texture.
* `bronze`: grey shading through a dark-brown -> bronze -> pale-gold colour ramp, plus a specular highlight.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

PAPER_TINT = np.array([1.0, 0.97, 0.9], np.float32)
BRONZE_RAMP = np.array([[30, 16, 8], [110, 60, 25], [185, 115, 50], [235, 185, 110], [255, 240, 200]],
                       np.float32)  # RGB stops at shading 0, 0.25, 0.5, 0.75, 1


def _scaled(size: int, fraction: float, minimum: float = 1.0) -> float:
    """A length that is `fraction` of the crop size (at least `minimum`)."""
    return max(minimum, size * fraction)


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def pencil_sketch(image: np.ndarray) -> np.ndarray:
    """Colour dodge of the grey image by its blurred negative (light areas vanish, edges stay as strokes)."""
    grey = _grey(image)
    blurred_negative = cv2.GaussianBlur(255 - grey, (0, 0), _scaled(image.shape[0], 1 / 24))
    dodge = np.clip(grey * 255 / np.maximum(255 - blurred_negative, 1), 0, 255)
    strokes = 255 * (dodge / 255) ** 2.2  # darker, more pencil-like lines
    return np.clip(strokes[..., None] * PAPER_TINT, 0, 255).astype(np.uint8)


def toon(image: np.ndarray, levels: int = 5) -> np.ndarray:
    """Bilateral smoothing, `levels` colour levels per channel and thick dark edges."""
    size = image.shape[0]
    smooth = image
    for _ in range(3):
        smooth = cv2.bilateralFilter(smooth, d=max(3, int(_scaled(size, 1 / 20))), sigmaColor=40,
                                     sigmaSpace=_scaled(size, 1 / 20))
    step = 256 / levels
    quantised = (np.floor(smooth.astype(np.float32) / step) + 0.5) * step
    grey = cv2.medianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 3)
    edges = cv2.Canny(grey, 90, 200)
    edges = cv2.dilate(edges, np.ones((2, 2), np.uint8)) if size >= 128 else edges
    out = np.where(edges[..., None] > 0, quantised * 0.15, quantised)
    return np.clip(out, 0, 255).astype(np.uint8)


def _kuwahara(image: np.ndarray, radius: int) -> np.ndarray:
    """Kuwahara filter: each pixel takes the mean of the least varying of its four (radius+1)^2 quadrants."""
    pixels = image.astype(np.float32)
    luminance = _grey(image)
    window = (radius + 1, radius + 1)
    means = cv2.blur(pixels, window, borderType=cv2.BORDER_REFLECT)
    variances = cv2.blur(luminance**2, window, borderType=cv2.BORDER_REFLECT) - cv2.blur(
        luminance, window, borderType=cv2.BORDER_REFLECT) ** 2
    # a box blur of size r+1 is centred; shifting by r/2 in x and y gives the four quadrants ending at the pixel
    half = radius / 2
    candidates, spreads = [], []
    for dx in (-half, half):
        for dy in (-half, half):
            shift = np.float32([[1, 0, dx], [0, 1, dy]])
            warp = dict(dsize=(image.shape[1], image.shape[0]), borderMode=cv2.BORDER_REFLECT)
            candidates.append(cv2.warpAffine(means, shift, **warp))
            spreads.append(cv2.warpAffine(variances, shift, **warp))
    choice = np.argmin(np.stack(spreads), axis=0)
    return np.take_along_axis(np.stack(candidates), choice[None, ..., None], axis=0)[0]


def oil_paint(image: np.ndarray) -> np.ndarray:
    """Kuwahara-flattened colours, more saturation and a diagonal brush-stroke texture on the luminance."""
    size = image.shape[0]
    painted = _kuwahara(image, int(_scaled(size, 1 / 24, 2)))
    hsv = cv2.cvtColor(np.clip(painted, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.35, 0, 255)
    painted = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    y, x = np.mgrid[0:size, 0:image.shape[1]].astype(np.float32)
    period = _scaled(size, 1 / 21, 3)
    strokes = np.sin((x + 0.6 * y) * 2 * np.pi / period) * np.sin((x - 1.7 * y) * np.pi / (3 * period))
    texture = cv2.GaussianBlur(strokes.astype(np.float32), (0, 0), period / 6)
    return np.clip(painted * (1 + 0.08 * texture[..., None]), 0, 255).astype(np.uint8)


def bronze_statue(image: np.ndarray) -> np.ndarray:
    """Smoothed, contrast-stretched grey shading through a bronze colour ramp, plus a specular highlight."""
    size = image.shape[0]
    shading = cv2.bilateralFilter(_grey(image), d=max(3, int(_scaled(size, 1 / 25))), sigmaColor=30,
                                  sigmaSpace=_scaled(size, 1 / 25)) / 255
    low, high = np.percentile(shading, (2, 98))
    shading = np.clip((shading - low) / max(high - low, 1e-3), 0, 1)
    shading = shading**1.6  # darker mid-tones: metal, not sepia
    stops = np.linspace(0, 1, len(BRONZE_RAMP))
    coloured = np.stack([np.interp(shading, stops, BRONZE_RAMP[:, channel]) for channel in range(3)], -1)
    specular = cv2.GaussianBlur(shading**5, (0, 0), _scaled(size, 1 / 64))
    return np.clip(coloured + 90 * specular[..., None], 0, 255).astype(np.uint8)


STYLE_FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sketch": pencil_sketch,
    "toon": toon,
    "oil": oil_paint,
    "bronze": bronze_statue,
}


def stylize(image: np.ndarray, style: str) -> np.ndarray:
    """`image` [H, W, 3] uint8 RGB through the filter named `style` (a key of `STYLE_FILTERS`)."""
    if style not in STYLE_FILTERS:
        raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLE_FILTERS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("expected an [H, W, 3] uint8 RGB image")
    return STYLE_FILTERS[style](np.ascontiguousarray(image))
