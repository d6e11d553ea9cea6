"""Images: any file Pillow reads (or a video's first frame) -> ``uint8 (H, W, 3)``, and which reader a path takes.

Pillow reads images as viewers show them (EXIF orientation applied, 16- and 32-bit grey scaled to 8 bits,
transparent pixels laid over black); an
image declaring a decompression bomb's canvas is refused before it decodes. Failures are ``VideoReadError``s
with ``vidiff.io.read``'s reason codes, so the data pipeline counts skipped images and videos alike.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from vidiff.io.read import NOT_VIDEO, TOO_LARGE, VideoReadError, check_is_file, read_video


def read_image(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file to ``uint8 (H, W, 3)``, optionally resized to ``(height, width)``.

    16-bit and 32-bit grey images are scaled to 8 bits (``_rgb``). The EXIF orientation is applied, as viewers
    do (a phone's portrait photo is stored sideways). A file Pillow cannot identify is read as a video by PyAV,
    whatever its suffix: its first frame is the image. One declaring more than ``PIL.Image.MAX_IMAGE_PIXELS`` is
    ``too_large`` before it decodes (``_open_image``).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    check_is_file(path)
    try:
        with _open_image(path) as image:
            image = _rgb(ImageOps.exif_transpose(image), path)
            if size is not None:
                image = image.resize((int(size[1]), int(size[0])), Image.Resampling.BICUBIC)
            return np.asarray(image, np.uint8)
    except UnidentifiedImageError as e:
        try:
            return read_video(path, max_frames=1, size=size)[0][0]
        except VideoReadError as video_error:
            raise VideoReadError(path, NOT_VIDEO, f"not a readable image ({e}) nor video ({video_error.reason}: "
                                 f"{video_error.detail})") from None
    except Image.DecompressionBombError:  # Pillow's refusal above twice its limit, before the size is known
        raise VideoReadError(path, TOO_LARGE, _too_large()) from None
    except OSError as e:
        raise VideoReadError(path, NOT_VIDEO, f"not a readable image ({e})") from None


def _open_image(path):
    """Pillow's image of ``path``, refused (``too_large``) before any pixel is decoded when it declares more than
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels: a few hundred bytes can declare a canvas of gigabytes (a decompression
    bomb). Pillow itself only warns up to twice that limit, and decodes (a 10000x10000 PNG of 291 KB took 39 s
    and 1.9 GB); ``MAX_IMAGE_PIXELS = None`` lifts both checks."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it in one line
        image = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise VideoReadError(path, TOO_LARGE, _too_large(image.size))
    return image


def _too_large(size=None) -> str:
    """``too_large``'s detail for an image of ``size`` (width, height); None: Pillow refused before it was known."""
    from PIL import Image

    declared = f"{size[0]}x{size[1]} pixels, more than the" if size else "more than twice the"
    return (f"declares {declared} {Image.MAX_IMAGE_PIXELS} pixels Pillow decodes without a decompression-bomb "
            "warning; downscale it (it is resized to the video's frame size anyway)")


def _rgb(image, path):
    """A Pillow image as RGB. ``convert("RGB")`` drops transparency, showing whatever colour transparent pixels
    store, so an image with an alpha channel or a transparent colour is laid over black first. It also clips
    grey values above 255 (a 16-bit PNG comes out nearly white), so wider grey modes are scaled first
    (:func:`_grey_to_8_bits`), their transparent value compared before scaling."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, np.float64)
        rgb = np.repeat(_grey_to_8_bits(values, image.mode, path)[..., None], 3, -1)
        if "transparency" in image.info:
            rgb[values == image.info["transparency"]] = 0
        return Image.fromarray(rgb, "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_8_bits(values: np.ndarray, mode: str, path) -> np.ndarray:
    """A wide grey image's values as uint8: 16-bit by 255 / 65535; 32-bit and float ones by their range (values
    within [0, 1] (float) or [0, 255] are 8-bit intensities, within [0, 65535] 16-bit ones)."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (high > 255 and low >= 0 and high <= 65535 and mode == "I"):
        scale = 255 / 65535
    elif mode == "F" and 0 <= low and high <= 1:
        scale = 255.0
    elif 0 <= low and high <= 255:
        scale = 1.0
    else:
        raise VideoReadError(path, NOT_VIDEO, f"a {mode}-mode image with values {low:g} to {high:g}, "
                             "outside the ranges it could be scaled from; save it as an 8- or 16-bit image")
    return np.round(values * scale).astype(np.uint8)


def is_video_path(path: str | os.PathLike, suffixes: Sequence[str] = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")) -> bool:
    """Whether a path looks like a video by its suffix (used to pick read_video vs read_image)."""
    return Path(path).suffix.lower() in suffixes


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def reads_as_video(path: str | os.PathLike, video_expected: bool) -> bool:
    """Whether to read ``path`` with ``read_video`` (PyAV) rather than ``read_image`` (Pillow): a video suffix, or,
    where a video is expected, any suffix but an image's (``.m4v``, ``.mpg``, ``.ts``, none: PyAV decodes them)."""
    return is_video_path(path) or (video_expected and Path(path).suffix.lower() not in IMAGE_SUFFIXES)
