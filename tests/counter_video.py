"""Counter videos for frame-exact tests: frame k shows k in binary as 8 vertical bars (white = 1).

The bars survive H.264 and scaling, so ``counters(decoded)`` reads back which source frame every
decoded frame is, and a test can assert exact frame indices after seeks, windows and resampling.
"""
from fractions import Fraction

import numpy as np


def counter_frames(n, size=64):
    """``uint8 (n, size, size, 3)``: frame k shows k's bits."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    bar = size // 8
    for k in range(n):
        for b in range(8):
            if (k >> b) & 1:
                frames[k, :, b * bar : (b + 1) * bar] = 255
    return frames


def counters(video):
    """The frame index each decoded frame of ``video`` shows."""
    bar = video.shape[2] // 8
    middle = video[:, video.shape[1] // 4 : 3 * video.shape[1] // 4].astype(float).mean(axis=(1, 3))
    bits = [middle[:, b * bar + bar // 4 : (b + 1) * bar - bar // 4].mean(axis=1) > 127 for b in range(8)]
    return sum(bit.astype(int) << b for b, bit in enumerate(bits)).tolist()


def write_counter(path, n, fps, fmt=None, first_pts=None):
    """A 64x64 counter video written with PyAV. ``first_pts`` (in frames) stamps the first frame at
    ``first_pts / fps`` seconds; ``None`` leaves the stamps to the muxer (MPEG-TS adds its own offset)."""
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        if first_pts is not None:
            stream.codec_context.time_base = Fraction(1, fps)
        for k, array in enumerate(counter_frames(n)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if first_pts is not None:
                frame.pts, frame.time_base = first_pts + k, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
