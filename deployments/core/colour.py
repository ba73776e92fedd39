"""The colour descriptor: a histogram of a product's own pixels (background left out), pure
numpy + PIL. Stored per product and computed per query photo, it is the `colour` signal of
ranking (ImageNet features see shape far better than colour).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from deployments.core.images import pad_to_square

COLOUR_VERSION = "hsv54-v2"  # change when the descriptor changes: stored descriptors go stale
GREY_BINS = 6  # achromatic pixels, by brightness
HUE_BINS = 12  # chromatic pixels: hue (soft-assigned) x saturation (2) x brightness (2)
COLOUR_DIMS = GREY_BINS + HUE_BINS * 2 * 2
BACKGROUND_TOLERANCE = 24  # max channel difference from the border colour that is background
MIN_FOREGROUND = 0.01  # below this share of foreground pixels, use the whole photo
SAMPLE_SIDE = 112  # the histogram reads about this many pixels a side (every 2nd of 224)


def foreground_mask(pixels: np.ndarray, tolerance: int = BACKGROUND_TOLERANCE) -> np.ndarray:
    """Pixels that differ from the border colour (median of the outer 2-pixel frame) by more
    than `tolerance` in some channel; the whole photo when almost nothing does."""
    frame = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                            pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(frame, axis=0).astype(np.int16)
    mask = np.abs(pixels.astype(np.int16) - background).max(axis=2) > tolerance
    return mask if mask.mean() >= MIN_FOREGROUND else np.ones(mask.shape, dtype=bool)


def colour_histogram(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Counts of the masked pixels in COLOUR_DIMS HSV bins: greys by brightness, colours by hue
    (split linearly between the two nearest hue bins), saturation and brightness."""
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"), dtype=np.float32)[mask] / 255.0
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    chromatic = (sat >= 0.15) & (val >= 0.2)
    hist = np.bincount(np.minimum((val[~chromatic] * GREY_BINS).astype(int), GREY_BINS - 1),
                       minlength=COLOUR_DIMS).astype(np.float64)
    hue, sat, val = hue[chromatic], sat[chromatic], val[chromatic]
    cell = (sat >= 0.5).astype(int) * 2 + (val >= 0.55).astype(int)
    position = hue * HUE_BINS - 0.5
    lower = np.floor(position).astype(int)
    upper_share = position - lower
    for bins, share in ((lower % HUE_BINS, 1.0 - upper_share),
                        ((lower + 1) % HUE_BINS, upper_share)):
        hist += np.bincount(GREY_BINS + bins * 4 + cell, weights=share, minlength=COLOUR_DIMS)
    return hist


def colour_descriptor(pixels: np.ndarray) -> np.ndarray:
    """COLOUR_DIMS-d colour signature of the product in a uint8 HxWx3 photo (the encoder's
    `model_pixels`): square root of the foreground's normalised HSV histogram, so it has unit
    length and the dot product of two descriptors is their Bhattacharyya coefficient (0..1).
    Returns (COLOUR_DIMS,) float32 (all zero for an empty histogram); ValueError for other
    pixel arrays."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError("pixels must be a uint8 HxWx3 array")
    step = max(1, min(pixels.shape[:2]) // SAMPLE_SIDE)
    pixels = np.ascontiguousarray(pixels[::step, ::step])  # 4x cheaper, same figures
    hist = colour_histogram(pixels, foreground_mask(pixels))
    total = hist.sum()
    if total <= 0:
        return np.zeros(COLOUR_DIMS, dtype=np.float32)
    root = np.sqrt(hist / total)
    return (root / np.linalg.norm(root)).astype(np.float32)


def colour_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Bhattacharyya coefficient of two descriptors (0: no colour in common, 1: the same);
    0.0 when either is missing."""
    if a is None or b is None:
        return 0.0
    return float(np.clip(np.dot(a, b), 0.0, 1.0))


# -- photos without colour ------------------------------------------------------------------
LAYOUT_SIDE = 32  # the grey layout is the photo (padded square) at this many pixels a side
LAYOUT_FLOOR = 0.8  # correlations at or below this count as no likeness (0); 1.0 stays 1.0


def grey_layout(image: Image.Image) -> np.ndarray:
    """Brightness layout of a photo: its padded square in grey at LAYOUT_SIDE pixels a side,
    zero mean and unit length, so the dot product of two is their correlation (blind to colour,
    overall brightness and contrast). A query photo without colour information is compared to
    candidates by this instead of by colour."""
    grey = pad_to_square(image.convert("RGB")).convert("L")
    small = grey.resize((LAYOUT_SIDE, LAYOUT_SIDE), Image.Resampling.BILINEAR)
    values = np.asarray(small, dtype=np.float64).ravel()
    values -= values.mean()
    norm = np.linalg.norm(values)
    return (values / norm if norm > 0 else values).astype(np.float32)


def layout_similarity(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Likeness of two grey layouts in 0..1: their correlation rescaled from LAYOUT_FLOOR..1."""
    if a is None or b is None:
        return 0.0
    correlation = float(np.dot(a, b))
    return float(np.clip((correlation - LAYOUT_FLOOR) / (1.0 - LAYOUT_FLOOR), 0.0, 1.0))
