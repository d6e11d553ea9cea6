"""Check a captioned-world clip against its labels from the pixels alone.

The scorer judges rendered and *generated* clips the same way, so it relies
only on cues that survive noise, blur and slightly wrong colours:

- colour: a pixel shows the palette colour nearest in hue (angle of its
  offset from the clip's median background colour) once it is more than
  halfway there from the background and within about 26 degrees of that
  colour's hue (:func:`palette_index`: grey and white show none); the
  object's colour is the one with the most pixels.
- shape: per frame, the object's mask is cropped to its bounding box (the
  outermost 1% of its pixels trimmed, so stray pixels do not stretch it),
  padded to a square and averaged down to 16x16; the mean over frames goes to
  the nearest template. Templates are the circle, square and triangle as the
  renderer draws them at the object's measured side (the median over frames
  of its box's longer side: an 8 px circle fills 0.81 of its box, not an ideal
  circle's 0.785, and a square with chipped corners is nearer the square) and,
  for digits, the mean of every ``load_digits`` sample of that class.
- direction: the least-squares slope of the mask's centroid over frames; the
  larger axis of the displacement decides, and less than 15% of the frame
  counts as ``"none"`` (not moving).

The world only draws handwritten digits this scorer reads correctly at the
size they are drawn (:func:`readable_glyphs`), so it scores the renderer's
own clips 100% right from 32px frames up (24px too, checked once). At 16px
small objects are 4px wide: the geometric shapes still read right, but small
digits often read as other digits.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from vidiff.io import check_frames
from vidiff.data.world_sprites import (
    BACKGROUND, COLORS, DIGITS, SHAPES, digit_images, rasterize_digits, sprite_mask,
)

FEATURE_SIDE = 16  # side of the normalised shape image compared with the templates
TRIM = 0.01  # fraction of mask pixels trimmed from each end of the bounding box
MIN_TRAVEL = 0.15  # displacement (fraction of the frame) below which an object counts as static

_COLOUR_NAMES = tuple(COLORS)
_OFFSETS = np.array([COLORS[c] for c in _COLOUR_NAMES], np.float32) - np.asarray(BACKGROUND, np.float32)
_OFFSET_NORMS = np.linalg.norm(_OFFSETS, axis=1)
# A pixel whose every channel lies within this distance of the background is
# less than halfway to every palette colour, so only the rest need the full test.
_SURELY_BACKGROUND = float(_OFFSET_NORMS.min() / 2 / np.sqrt(3))
# Palette hues lie 27 degrees apart at the closest (blue, cyan), grey at 29 from the nearest (magenta): a pixel
# further than this from every hue is no palette colour, so a grey or white object is not read as magenta.
MIN_HUE_COSINE = 0.9


def palette_index(frames: np.ndarray) -> np.ndarray:
    """``int8 (T, H, W)`` colour of each pixel: 0 background, k the k-th colour of :data:`COLORS`.

    A pixel's hue is the palette colour whose direction from the background
    is closest in angle to the pixel's; the pixel shows that colour when it
    lies more than halfway from the background towards it. The background is
    the clip's median colour, so a colour cast shared by the whole clip
    changes nothing, and blur (mixing with the background) keeps the hue.
    A pixel whose hue is further than :data:`MIN_HUE_COSINE` from every
    palette colour's (grey, white) shows none.
    """
    frames = np.asarray(frames)
    background = np.median(frames[:, ::2, ::2].reshape(-1, 3), axis=0).astype(np.float32)
    index = np.zeros(frames.shape[:-1], np.int8)
    # Cheap integer pre-filter (one grey level of slack for the rounding) before float maths on the rest.
    distance = np.abs(frames.astype(np.int16) - np.round(background).astype(np.int16))
    rough = np.maximum(np.maximum(distance[..., 0], distance[..., 1]), distance[..., 2])  # 3x faster than .max(-1)
    candidates = rough > _SURELY_BACKGROUND - 1
    offset = frames[candidates].astype(np.float32) - background
    dots = offset @ _OFFSETS.T
    cosines = dots / (np.linalg.norm(offset, axis=1, keepdims=True) * _OFFSET_NORMS + 1e-6)
    hue = cosines.argmax(1)
    progress = dots[np.arange(len(hue)), hue] / _OFFSET_NORMS[hue] ** 2
    on_hue = cosines[np.arange(len(hue)), hue] > MIN_HUE_COSINE
    index[candidates] = np.where((progress > 0.5) & on_hue, hue + 1, 0)
    return index


@functools.lru_cache(maxsize=128)
def _area_matrix(side: int) -> np.ndarray:
    # Row a averages the source pixels overlapping output cell a (box filter).
    edges_in = np.arange(side + 1) / side
    edges_out = np.arange(FEATURE_SIDE + 1) / FEATURE_SIDE
    low = np.maximum(edges_in[None, :-1], edges_out[:-1, None])
    high = np.minimum(edges_in[None, 1:], edges_out[1:, None])
    return (np.clip(high - low, 0, None) * FEATURE_SIDE).astype(np.float32)


def _extent(counts: np.ndarray) -> tuple[int, int]:
    cut = TRIM * counts.sum()
    low = int(np.searchsorted(np.cumsum(counts), cut, side="right"))
    high = len(counts) - int(np.searchsorted(np.cumsum(counts[::-1]), cut, side="right"))
    return low, max(high, low + 1)


def _crop(mask: np.ndarray) -> np.ndarray:
    y0, y1 = _extent(mask.sum(1))
    x0, x1 = _extent(mask.sum(0))
    return mask[y0:y1, x0:x1]


def shape_features(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """A non-empty ``bool (H, W)`` mask -> its normalised ``float32 (16, 16)`` shape image and fill ratio.

    The fill ratio is the share of the (trimmed) bounding box the mask covers.
    """
    return _features_of_crop(_crop(mask))


def _features_of_crop(crop: np.ndarray) -> tuple[np.ndarray, float]:
    height, width = crop.shape
    side = max(height, width)
    # Padding to a square keeps the aspect ratio, so a thin "1" never looks like a square.
    canvas = np.zeros((side, side), np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = crop
    resize = _area_matrix(side)
    return resize @ canvas @ resize.T, float(crop.mean())


@functools.lru_cache(maxsize=64)
def _geometric_templates(side: int) -> dict[str, np.ndarray]:
    # Drawn at the object's own side: small shapes are staircases, and at 8 px the renderer's circle is
    # nearer a slightly chipped square than an ideal circle is, so ideal templates read such squares as circles.
    return {shape: shape_features(sprite_mask(shape, side))[0] for shape in SHAPES}


@functools.lru_cache(maxsize=1)
def _digit_templates() -> dict[str, np.ndarray]:
    images, targets = digit_images()
    features = _features_of_all(rasterize_digits(images, 32))
    return {name: features[targets == k].mean(0) for k, name in enumerate(DIGITS)}


def _features_of_all(masks: np.ndarray) -> np.ndarray:
    features = np.full((len(masks), FEATURE_SIDE, FEATURE_SIDE), np.inf, np.float32)  # empty masks match nothing
    for i, mask in enumerate(masks):
        if mask.any():
            features[i] = shape_features(mask)[0]
    return features


def templates(names: Sequence[str], side: int = 64) -> np.ndarray:
    """``float32 (len(names), 16, 16)`` templates of the given shape names, the geometric ones drawn ``side``
    pixels wide (the digits' are means over samples of every size)."""
    table = dict(_geometric_templates(max(1, int(side))))
    if any(name in DIGITS for name in names):
        table.update(_digit_templates())
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; use names from SHAPES or DIGITS")
    return np.stack([table[name] for name in names])


def classify_shape(features: np.ndarray, names: Sequence[str], side: int = 64) -> str:
    """The name among ``names`` whose template (at ``side``) is nearest (L2) to ``features``."""
    distances = ((templates(names, side) - features[None]) ** 2).sum((1, 2))
    return names[int(distances.argmin())]


@functools.lru_cache(maxsize=32)
def readable_glyphs(side: int) -> dict[int, np.ndarray]:
    """Per digit class, the ``load_digits`` samples this scorer reads right when drawn ``side`` pixels wide.

    Classes with no readable sample at a tiny ``side`` keep all their samples
    (the scorer is only promised to be exact from 32px frames up).
    """
    images, targets = digit_images()
    names = SHAPES + DIGITS
    predicted = np.full(len(images), -1)
    for i, mask in enumerate(rasterize_digits(images, side)):
        if mask.any():  # read as the scorer reads a rendered clip: at the glyph's own measured side
            crop = _crop(mask)
            predicted[i] = names.index(classify_shape(_features_of_crop(crop)[0], names, max(crop.shape)))
    predicted = predicted - len(SHAPES)
    readable = {}
    for k in range(10):
        good = np.nonzero((targets == k) & (predicted == k))[0]
        readable[k] = good if len(good) else np.nonzero(targets == k)[0]
    return readable


def _analyse(mask: np.ndarray, shapes: Sequence[str]) -> dict:
    """Shape, fill, direction and displacement of one object's ``bool (T, H, W)`` mask."""
    num_frames, height, width = mask.shape
    counts = mask.sum((1, 2))
    if not counts.any():
        return {"shape": None, "direction": None, "fill": 0.0, "displacement": None, "pixels": 0.0}
    # Frames where the object (nearly) vanished would only add noise to shape and track.
    typical = np.median(counts[counts > 0])
    frames = np.nonzero(counts >= max(2.0, 0.25 * typical))[0]
    if len(frames) == 0:
        frames = np.nonzero(counts)[0]
    crops = [_crop(mask[t]) for t in frames]
    measured = [_features_of_crop(crop) for crop in crops]
    side = int(round(np.median([max(crop.shape) for crop in crops])))
    shape = classify_shape(np.mean([f for f, _ in measured], axis=0), tuple(shapes), side)
    centroids = np.array([np.argwhere(mask[t]).mean(0) for t in frames])
    direction, displacement = None, None
    if num_frames > 1:
        if len(frames) >= 2:
            slope = np.polyfit(frames.astype(np.float64), centroids, 1)[0]
            dy, dx = slope * (num_frames - 1) / np.array([height, width])
        else:
            dy = dx = 0.0
        displacement = (float(dy), float(dx))
        if max(abs(dy), abs(dx)) < MIN_TRAVEL:
            direction = "none"
        elif abs(dx) >= abs(dy):
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
    return {
        "shape": shape,
        "direction": direction,
        "fill": float(np.mean([fill for _, fill in measured])),
        "displacement": displacement,  # (dy, dx) over the clip, in frame heights / widths
        "pixels": float(counts[frames].mean()),
    }


def _judge(index: np.ndarray, colour: str | None, labels: dict, shapes: Sequence[str] | None) -> dict:
    if shapes is None:
        shapes = SHAPES + DIGITS if labels["shape"] in DIGITS else SHAPES
    if colour is None:
        analysis = _analyse(np.zeros(index.shape, bool), shapes)
    else:
        analysis = _analyse(index == _COLOUR_NAMES.index(colour) + 1, shapes)
    predicted = {"color": colour, **analysis}
    colour_ok = colour == labels["color"]
    shape_ok = predicted["shape"] == labels["shape"]
    direction_ok = None if index.shape[0] == 1 else predicted["direction"] == labels["direction"]
    return {
        "color": colour_ok,
        "shape": shape_ok,
        "direction": direction_ok,
        "all": colour_ok and shape_ok and direction_ok is not False,
        "predicted": predicted,
    }


def score(frames: np.ndarray, labels: dict, shapes: Sequence[str] | None = None) -> dict:
    """Whether a clip shows the object of ``labels``.

    Args:
      frames: ``uint8 (T, H, W, 3)`` (or one ``(H, W, 3)`` image), rendered or generated.
      labels: at least ``color``, ``shape``, ``direction``; with an
        ``objects`` list of two or more, every object is scored
        (:func:`score_objects`) and each verdict holds only if it holds for all.
      shapes: shape names the prediction may choose from; default the three
        geometric shapes, plus the digits when the label is a digit.

    Returns:
      ``{"color", "shape", "direction", "all": bool, "predicted": {...}}``;
      ``direction`` is ``None`` for a single frame (not checkable) and ``all``
      then ignores it. ``predicted`` holds ``color``, ``shape``, ``direction``
      (one of the four, ``"none"`` for a static object, ``None`` when
      uncheckable or nothing was found), ``fill``, ``displacement`` and
      ``pixels`` for confusion tables. Multi-object results add ``objects``
      (the per-object results) and report the first object's ``predicted``.
    """
    frames = check_frames(frames, "score")
    objects = labels.get("objects")
    if objects is not None and len(objects) > 1:
        results = score_objects(frames, objects, shapes)
        single_frame = len(frames) == 1
        combined = {key: None if key == "direction" and single_frame else all(r[key] for r in results)
                    for key in ("color", "shape", "direction", "all")}
        return {**combined, "predicted": results[0]["predicted"], "objects": results}
    index = palette_index(frames)
    counts = np.bincount(index.ravel(), minlength=len(COLORS) + 1)[1:]
    colour = _COLOUR_NAMES[int(counts.argmax())] if counts.any() else None
    return _judge(index, colour, labels, shapes)


def score_objects(frames: np.ndarray, objects: Sequence[dict], shapes: Sequence[str] | None = None) -> list[dict]:
    """Score each object of a multi-object clip; the result per object is as in :func:`score`.

    Objects are told apart by colour: the colours covering at least 10% as
    many pixels as the most common one are the clip's objects. An object
    whose colour is among them is measured on it; the others take the largest
    colours left, so a wrong colour is reported as such with its shape and motion.
    """
    frames = check_frames(frames, "score")
    index = palette_index(frames)
    counts = np.bincount(index.ravel(), minlength=len(COLORS) + 1)[1:]
    present = [k for k in np.argsort(-counts, kind="stable") if counts[k] > 0 and counts[k] >= 0.1 * counts.max()]
    present = [_COLOUR_NAMES[k] for k in present]
    assigned: list[str | None] = [obj["color"] if obj["color"] in present else None for obj in objects]
    leftovers = [c for c in present if c not in assigned]
    for i, colour in enumerate(assigned):
        if colour is None and leftovers:
            assigned[i] = leftovers.pop(0)
    return [_judge(index, colour, obj, shapes) for colour, obj in zip(assigned, objects)]
