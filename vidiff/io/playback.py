"""Decoded frames as a player shows them: upright, in square pixels, at the instants a frame rate asks for.

``vidiff.io.read`` decodes; this turns each PyAV frame into the array a
viewer would see (``to_array``) and picks which frames fill a resampled clip
(``Resampler``).
"""
from __future__ import annotations

import warnings

import numpy as np


def orientation(frame) -> tuple[bool, int]:
    """``(mirrored, turns)`` that show ``frame`` as players do: ``np.rot90(np.fliplr(array) if mirrored else array,
    turns)``, ``turns`` quarter turns counter-clockwise (0 to 3).

    PyAV's ``frame.rotation`` is the display matrix's angle counter-clockwise;
    ffmpeg 7.0's autorotation shows a frame with rotation 90 exactly as
    ``np.rot90(array, 1)``, -90 as ``np.rot90(array, 3)``, 180 as
    ``np.rot90(array, 2)`` (checked on the decoded pixels). Other angles are
    rounded to the nearest quarter turn. That angle is where the matrix turns
    the x axis, so a mirroring matrix (a front camera's, an editor's flip)
    reads as the frame flipped top to bottom, then turned: a left-right flip
    reads as 180. ffmpeg's hflip / vflip / transpose choices for all four
    mirrored quarter-turn matrices come to exactly that, which is the frame
    flipped left to right and turned two quarters more.
    """
    turns = int(round(frame.rotation / 90)) % 4
    return (True, (turns + 2) % 4) if _mirrors(frame) else (False, turns)


def quarter_turns(frame) -> int:
    """The ``turns`` of ``orientation``: an odd count shows ``frame`` with its width and height swapped."""
    return orientation(frame)[1]


def _mirrors(frame) -> bool:
    """Whether ``frame``'s display matrix flips it (its 2x2 part has a negative determinant)."""
    try:
        matrix = frame.side_data.get("DISPLAYMATRIX")
    except ValueError as e:
        # PyAV lists every side data of a frame through an enum of the types it knows, and FFmpeg 8 attaches
        # newer ones (a JPEG's EXIF, MV-HEVC's view ids); frame.rotation still reads the angle.
        warnings.warn(
            f"PyAV cannot list a decoded frame's side data ({e}), so whether its display matrix mirrors it is "
            "unknown: it is turned by the matrix's angle but never flipped",
            stacklevel=2,
        )
        return False
    if matrix is None:
        return False
    a, b, _, c, d = np.frombuffer(bytes(matrix), np.int32)[:5].astype(np.int64)  # 16.16 fixed point
    return bool(a * d - b * c < 0)


def pixel_aspect(stream) -> float:
    """The width of a stored pixel as displayed, over its height (FFmpeg's guess from codec and container)."""
    sar = stream.sample_aspect_ratio
    return float(sar) if sar and sar > 0 else 1.0


def display_width(width: int, aspect: float) -> int:
    """A stored width as displayed, in square pixels: a 64-wide frame with 2:1 pixels shows 128 wide."""
    return width if aspect == 1.0 else max(1, int(round(width * aspect)))


def to_array(frame, size, aspect: float = 1.0) -> np.ndarray:
    """``frame`` as ``uint8 (H, W, 3)`` RGB as displayed; ``size``: the displayed ``(height, width)`` to scale to,
    ``None``: its displayed size (scaled only when ``aspect``, its pixel aspect, is not 1)."""
    mirrored, turns = orientation(frame)
    if size is None and aspect == 1.0:
        array = frame.to_ndarray(format="rgb24")
    else:
        if size is None:
            height, width = frame.height, display_width(frame.width, aspect)
        else:
            height, width = size if turns % 2 == 0 else size[::-1]  # scaled before it is turned
        array = frame.to_ndarray(format="rgb24", height=int(height), width=int(width), interpolation="BICUBIC")
    array = array[:, ::-1] if mirrored else array
    return np.rot90(array, turns) if turns else array


class Resampler:
    """The output frames of ``read_video``: every frame of the window (``fps=None``), or one per ``1 / fps``
    instant from ``start``, the frame with the nearest timestamp (``read_video``'s ``fps``). Resampling holds
    each frame back until the next one's timestamp says which instants it is nearest to. Frames are converted
    to arrays only when output."""

    def __init__(self, fps, start, source_fps, max_frames, convert):
        self.fps, self.start, self.max_frames, self.convert = fps, start, max_frames, convert
        self.period = 1.0 / source_fps
        self.frames = []
        # The frame waiting for the next one's time, its time, and whether it lies in the window (a frame just
        # before the window may still be nearer to its first instant than the window's first frame is).
        self.held, self.held_t, self.held_in_window = None, None, False

    def full(self) -> bool:
        return self.max_frames is not None and len(self.frames) >= self.max_frames

    def before(self, frame, t: float):
        """A frame before the window: a candidate for its first instants only."""
        if self.fps is not None:
            self.held, self.held_t, self.held_in_window = frame, t, False

    def add(self, frame, t: float):
        """A frame of the window, at ``t`` seconds."""
        if self.fps is None:
            self.frames.append(self.convert(frame))
            return
        if self.held is not None:
            # Instants up to the middle of the two timestamps (the middle included) are nearer the held frame.
            self._output_held(lambda instant: instant <= 0.5 * (self.held_t + t) + 1e-9)
        self.held, self.held_t, self.held_in_window = frame, t, True

    def finish(self, end_t: float | None, ran_out: bool, stream_end: float | None):
        """Output the window's last frame for the instants left before ``end_t`` (None: no end).

        When the data ``ran_out`` before a frame at or past ``end_t``, the
        frame's span ends one average period after it, or at ``stream_end`` if
        sooner: a gif's whole-centisecond timestamps put its last frame up to
        half a centisecond early, and one period past it would be an instant
        after the clip. A ``stream_end`` before the frame itself is the
        container's mistake, and ignored.
        """
        if self.fps is None or self.held is None or not self.held_in_window:
            return
        limits = [] if end_t is None else [end_t]
        if ran_out:
            limits.append(self.held_t + self.period)
            if stream_end is not None and stream_end > self.held_t:
                limits.append(stream_end)
        if limits:
            self._output_held(lambda instant: instant < min(limits) - 1e-9)

    def _output_held(self, before) -> None:
        array = None
        while not self.full():
            instant = self.start + len(self.frames) / self.fps  # not summed, so that rounding cannot build up
            if not before(instant):
                return
            array = self.convert(self.held) if array is None else array
            self.frames.append(array)
