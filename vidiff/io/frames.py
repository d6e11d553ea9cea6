"""Frames as arrays: the model's [-1, 1] floats <-> ``uint8``, the checks every writer and pipeline input
goes through (with a hint that fits the array refused), resizing, and tiling frames into a grid."""
from __future__ import annotations

import math

import numpy as np


def to_uint8(video) -> np.ndarray:
    """Model output in [-1, 1] (any float array) -> ``uint8`` in [0, 255]."""
    video = np.asarray(video, dtype=np.float32)
    return np.clip(np.round((video + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(video) -> np.ndarray:
    """``uint8`` frames -> float32 in [-1, 1], the range models work in. Anything else is refused: float frames
    would be read as 0..255 values (frames already in [-1, 1] came out near -1), and wider integers may exceed 255."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise ValueError(f"vidiff.io.to_float expects uint8 frames in [0, 255], got {video.dtype}; "
                         f"convert with {_values_hint(video)}")
    return unit_range(video)


def unit_range(video):
    """``uint8`` pixels -> float32 in [-1, 1] unchecked (:func:`to_float` checks): numpy or jax arrays, traced
    inside a jitted step too."""
    return video.astype(np.float32) / 127.5 - 1.0


def check_frames(frames, user: str = "vidiff.io") -> np.ndarray:
    """``frames`` as ``uint8 (T, H, W, 3)`` (one ``(H, W, 3)`` image becomes T = 1), else a one-line error."""
    given = np.asarray(frames)
    frames = given[None] if given.ndim == 3 else given
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{user} expects uint8 frames of shape (T, H, W, 3), got {given.dtype} {given.shape}; "
                         f"{_conversion_hint(given, image=False)}")
    # Caught here: an empty array would otherwise fail deep inside jax indexing.
    if frames.shape[0] == 0:
        raise ValueError(f"{user}: the image/video has 0 frames; give at least one (H, W, 3) frame")
    if 0 in frames.shape[1:3]:
        raise ValueError(f"{user}: the frames are {frames.shape[1]}x{frames.shape[2]} pixels; give frames at least 1x1")
    return frames


def check_image(image, user: str = "vidiff.io.write_image") -> np.ndarray:
    """``image`` as ``uint8 (H, W, 3)``, else a one-line error (as ``check_frames``, for one image)."""
    given = np.asarray(image)
    if given.ndim != 3 or given.shape[-1] != 3 or given.dtype != np.uint8:
        raise ValueError(f"{user} expects a uint8 image of shape (H, W, 3), got {given.dtype} {given.shape}; "
                         f"{_conversion_hint(given, image=True)}")
    if 0 in given.shape[:2]:
        raise ValueError(f"{user}: the image is {given.shape[0]}x{given.shape[1]} pixels; give at least 1x1")
    return given


def _conversion_hint(x: np.ndarray, image: bool) -> str:
    """How to turn ``x`` into uint8 frames (or one image): its layout first, then its values."""
    fixes = [fix for fix in (_layout_hint(x, image), _values_hint(x)) if fix]
    return "convert with " + " and ".join(fixes) if fixes else "give uint8 RGB pixels in [0, 255]"


def _layout_hint(x: np.ndarray, image: bool) -> str | None:
    shape = x.shape
    if x.ndim == 5 and shape[-1] == 3:  # what TextToVideo returns: (clips, T, H, W, 3)
        if image:
            return "clips[j, k] (frame k of clip j)"
        return "clips[0] (one clip of the batch)" if shape[0] == 1 else "clips[j] (one clip at a time)"
    if image and x.ndim == 4 and shape[-1] == 3:
        return "clip[k] (one frame; write_video writes the clip, frame_grid tiles it)"
    if x.ndim in (3, 4) and shape[-1] == 4:
        return "x[..., :3] (drop the alpha channel)"
    if x.ndim in (3, 4) and shape[-1] == 1:
        return "np.repeat(x, 3, -1) (grey to RGB)"
    if x.ndim == 3 and shape[0] == 3 and shape[-1] != 3:
        return "x.transpose(1, 2, 0) (channels last)"
    if x.ndim == 4 and shape[1] == 3 and shape[-1] != 3:
        return "x.transpose(0, 2, 3, 1) (channels last)"
    if x.ndim == 2 or (x.ndim == 3 and not image and shape[-1] != 3):
        return "np.repeat(x[..., None], 3, -1) (grey to RGB)"
    if x.ndim not in (3, 4) or shape[-1] != 3:
        return "an array of shape " + ("(H, W, 3)" if image else "(T, H, W, 3)")
    return None


def _values_hint(x: np.ndarray) -> str | None:
    if x.dtype == np.uint8:
        return None
    if (x.dtype.kind == "f" or "float" in x.dtype.name) and x.size:  # bfloat16's kind is "V" (ml_dtypes)
        values = x.astype(np.float32)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        if 0.0 <= low and high <= 1.0:
            return "(x * 255).round().astype(np.uint8) (values in [0, 1])"
        if -1.0 <= low and high <= 1.0:
            return "vidiff.io.to_uint8(x) (values in [-1, 1])"
        return "np.clip(x, 0, 255).round().astype(np.uint8)"
    if x.dtype == np.bool_:
        return "x.astype(np.uint8) * 255"
    return "np.clip(x, 0, 255).astype(np.uint8)"


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """``uint8 (T, H, W, 3)`` frames resized to ``height`` x ``width`` (Pillow, bicubic, as ``read_image``)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
                     for f in frames])


def frame_grid(frames, columns: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile ``(T, H, W, 3)`` frames into one ``(rows*H, cols*W, 3)`` image."""
    frames = check_frames(frames)
    t, h, w, _ = frames.shape
    columns = columns or min(t, 8)
    rows = math.ceil(t / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), pad_value, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = frame
    return grid
