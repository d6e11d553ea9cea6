"""What the captioned world's objects look like: the palette, the shapes and their pixel masks.

Shapes are the geometric ``"circle"``, ``"square"`` and ``"triangle"`` and
the handwritten ``"digit 0"`` ... ``"digit 9"``, drawn from scikit-learn's
``load_digits`` (bundled with the package, no download) as in Moving MNIST.
:func:`sprite_mask` gives the crisp mask of any of them at any side; the
renderer (:mod:`vidiff.data.world`) stamps it in a palette colour, and the
scorer (:mod:`vidiff.data.world_score`) builds its shape templates from the
same masks, so the two cannot drift apart.
"""
from __future__ import annotations

import functools

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "magenta": (220, 60, 220),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple(f"digit {i}" for i in range(10))
BACKGROUND = (32, 32, 32)  # dark grey: every palette colour stands out from it


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: ``float32 (N, 8, 8)`` in [0, 16] and ``int (N,)`` classes."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def rasterize_digits(images: np.ndarray, side: int) -> np.ndarray:
    """Upscale ``(N, 8, 8)`` digit images bilinearly to ``side`` pixels and threshold to crisp ``bool`` masks."""
    source = (np.arange(side) + 0.5) * 8.0 / side - 0.5
    source = np.clip(source, 0.0, 7.0)
    low = np.minimum(np.floor(source).astype(np.int64), 6)
    frac = source - low
    weights = np.zeros((side, 8), np.float32)
    weights[np.arange(side), low] = 1.0 - frac
    weights[np.arange(side), low + 1] += frac
    upscaled = np.einsum("ia,nab,jb->nij", weights, images, weights)
    return upscaled > 6.0  # ink is 0..16; 6 keeps strokes about as thick as in the 8x8 original


@functools.lru_cache(maxsize=4096)  # every digit sample at a few sizes: a few MB at most
def sprite_mask(shape: str, side: int, glyph: int = -1) -> np.ndarray:
    """Crisp ``bool (side, side)`` mask of a shape; ``glyph`` indexes :func:`digit_images` for digits."""
    centres = (np.arange(side) + 0.5) / side  # pixel centres in the unit square
    y, x = centres[:, None], centres[None, :]
    eps = 1e-9
    if shape == "circle":
        mask = (y - 0.5) ** 2 + (x - 0.5) ** 2 <= 0.25 + eps
    elif shape == "square":
        mask = np.ones((side, side), bool)
    elif shape == "triangle":  # apex at the top centre, base along the bottom edge
        mask = np.abs(x - 0.5) <= y / 2 + eps
    elif shape in DIGITS:
        images, targets = digit_images()
        if not 0 <= glyph < len(images) or f"digit {targets[glyph]}" != shape:
            raise ValueError(f"glyph={glyph} is not a sample of {shape!r} in sklearn's load_digits")
        mask = rasterize_digits(images[glyph : glyph + 1], side)[0]
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES + DIGITS)}")
    mask = np.array(mask, bool)
    mask.flags.writeable = False  # cached and shared: nobody may draw into it
    return mask
