"""Writing: mp4 as H.264 and webm as VP9 through PyAV, gif and png through Pillow (its adaptive palette
keeps the few exact colours of synthetic clips); frame rates a format cannot store, and files in the way of
an output folder, are refused in one line before anything is written. Either writer stores a ``record`` (a
JSON object: how the file was made) in the file's own metadata, written with it (``vidiff.io.record``)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from vidiff.io.files import replace_whole
from vidiff.io.frames import check_frames, check_image
from vidiff.io.record import pillow_options, record_text


# The frame rates (fps) each format stores. A GIF delay is a whole number of centiseconds in 16 bits (655.35 s at
# most), and browsers play delays under 2 cs at 10 fps. WebM stamps frames in milliseconds (above 1000 fps frames
# share a stamp) and misstates rates below 1 / 30000 fps; FFmpeg refuses an mp4 below 1 / 65535 fps (mp4 stored
# rates up to 2**31 - 1 fps in our checks; 1e6 is plenty).
FPS_RANGES = {".gif": (100 / 65535, 50.0), ".webm": (1e-4, 1000.0), ".mp4": (1e-4, 1e6)}


def check_fps(path, fps: float, name: str = "fps") -> None:
    """A one-line ``ValueError`` when the format of ``path`` (by suffix) cannot store ``fps`` frames per second."""
    suffix = Path(path).suffix.lower()
    if suffix not in FPS_RANGES:
        return
    low, high = FPS_RANGES[suffix]
    if not low <= fps <= high:  # NaN too
        other = " or write .mp4" if suffix == ".gif" else ""
        raise ValueError(f"{path}: {name}={fps:g} does not fit a {suffix} file, which stores {low:.4g} to {high:g} "
                         f"fps; choose a rate in that range{other}")


def check_folders(path) -> None:
    """A one-line ``OSError`` when a file (not a folder) sits where a folder above ``path`` should be (mkdir
    would say only "File exists")."""
    for folder in Path(path).parents:  # a relative path's end in ".", an existing folder
        if folder.exists():
            if not folder.is_dir():
                raise OSError(f"cannot write {path}: {folder} is a file, not a folder; choose another output path")
            return


def write_video(path, frames, fps: float = 8.0, *, crf: int = 18, record: dict | None = None) -> Path:
    """Write ``uint8 (T, H, W, 3)`` frames; the suffix picks the format.

    ``.mp4`` is H.264 (yuv420p, odd sizes padded by edge replication to even),
    ``.webm`` is VP9, ``.gif`` loops forever, ``.png`` takes a single frame.
    A rate the format cannot store (``FPS_RANGES``) is refused. The file appears whole or not at all: it is
    written beside ``path`` and renamed over it, so an interrupted write leaves no half a clip under its name.
    ``record``: a JSON object stored in the file's metadata (``vidiff.io.read_record`` reads it back).
    """
    path = Path(path)
    frames = check_frames(frames)
    suffix = path.suffix.lower()
    check_fps(path, fps)
    check_folders(path)
    if suffix == ".png" and len(frames) != 1:
        raise ValueError(f"{path}: png holds one frame, got {len(frames)}; use .mp4/.gif, "
                         "or vidiff.io.write_image(path, vidiff.io.frame_grid(frames))")
    if suffix not in (*FPS_RANGES, ".png"):
        raise ValueError(f"{path}: unknown video suffix {suffix!r}; use .mp4, .webm, .gif or .png")
    text = None if record is None else record_text(path, record)
    writers = {".gif": lambda out: _write_gif(out, frames, fps, path, text),
               ".png": lambda out: _pil_image(frames[0]).save(out, **pillow_options(path, text)),
               ".mp4": lambda out: _write_av(out, frames, fps, crf, "libx264", text),
               ".webm": lambda out: _write_av(out, frames, fps, crf, "libvpx-vp9", text)}
    return replace_whole(path, writers[suffix], sync=False, keep_suffix=True)


def _pil_image(frame):
    from PIL import Image

    return Image.fromarray(frame, "RGB")


def gif_delays(count: int, fps: float) -> list[int]:
    """Per-frame GIF delays in centiseconds (whole numbers): frame k ends at ``round(100 (k + 1) / fps)``, so
    the delays alternate (8 fps: 12, 13, 13, 12, ...) and the clip plays at ``fps`` on average, not at
    ``100 / round(100 / fps)`` (8.33 fps)."""
    ends = [round(100 * (k + 1) / fps) for k in range(count)]
    return [end - start for start, end in zip([0, *ends], ends)]


def _write_gif(out, frames, fps, path, text=None):
    """``frames`` as a gif into ``out``, ``text`` its comment; ``path`` is the name errors give."""
    images = [_pil_image(f) for f in frames]
    durations_ms = [10 * delay for delay in gif_delays(len(images), fps)]
    try:
        images[0].save(out, save_all=True, append_images=images[1:], duration=durations_ms, loop=0, optimize=False,
                       **pillow_options(path, text))
    except (OverflowError, struct.error):  # Pillow merges identical frames: their delays add up past 16 bits
        # (Pillow 13 raises OverflowError, Pillow 12 struct.error)
        raise ValueError(f"{path}: identical frames in a row last longer than the 655.35 s a gif frame can show; "
                         "use a higher fps or .mp4") from None


def _write_av(path, frames, fps, crf, codec, text=None):
    import av

    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        if text is not None:
            container.metadata["comment"] = text
        stream = container.add_stream(codec, rate=_rate(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf + 12), "b": "0"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _rate(fps: float):
    """``fps`` as a fraction with a small denominator (29.97 -> 30000/1001); below 1 fps the frame period is
    the one made small (a rate's own denominator would round 1e-4 fps to 0, which FFmpeg takes as 24 fps)."""
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001) if fps >= 1 else 1 / Fraction(1 / fps).limit_denominator(1001)


def write_image(path, image, *, record: dict | None = None) -> Path:
    """Write one ``uint8 (H, W, 3)`` image (png, jpg, ... by suffix), whole or not at all; ``record`` as for
    :func:`write_video` (png and jpg hold one)."""
    path = Path(path)
    image = check_image(image)
    if not path.suffix:  # Pillow would name the temporary file's suffix
        raise ValueError(f"{path}: no suffix to pick the image format by; add one (.png, .jpg, ...)")
    text = None if record is None else record_text(path, record)
    check_folders(path)
    return replace_whole(path, lambda out: _pil_image(image).save(out, **pillow_options(path, text)), sync=False,
                         keep_suffix=True)
