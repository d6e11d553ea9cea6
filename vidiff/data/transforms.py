"""Per-record transforms (grain ``MapTransform`` / ``RandomMapTransform``) and bucket maths.

Every transform passes a ``Skip`` through untouched, so a bad item flows to
the one filter that counts it. Randomness comes from the ``np.random.Generator``
grain derives from the pipeline seed and the element index, so every choice
(window start, crop offset, caption dropout) is reproducible per seed/index.

Buckets: a list of ``(frames, height, width)``. A clip goes to the bucket
nearest in aspect ratio (``|log(w/h) - log(W/H)|``), among those whose
duration fits it, preferring the longest such bucket; it is then cut to the
bucket's frames and resized (shorter side) + cropped to its height and width.
Without buckets there is one: ``(num_frames, height, width)``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from vidiff import io as vio
from vidiff.data.skips import BAD_ARRAY, TOO_SHORT, Skip

WINDOWS = ("random", "first", "center")
CROPS = ("random", "center")

Bucket = tuple[int, int, int]  # (frames, height, width)


def parse_buckets(buckets: Sequence | None, default: Bucket, field: str = "data.buckets") -> list[Bucket]:
    """Normalise a bucket list: ``(frames, height, width)`` tuples or ``"FxHxW"`` strings."""
    if buckets is None or (isinstance(buckets, (list, tuple)) and len(buckets) == 0):
        return [tuple(int(v) for v in default)]
    if isinstance(buckets, str):
        buckets = [b for b in re.split(r"[,\s]+", buckets) if b]
    parsed = []
    for bucket in buckets:
        if isinstance(bucket, str):
            match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", bucket.strip())
            if not match:
                raise ValueError(f"{field}: unknown bucket {bucket!r}; write buckets as 'FRAMESxHEIGHTxWIDTH', e.g. '17x32x48'")
            bucket = tuple(int(g) for g in match.groups())
        try:
            frames, height, width = (int(v) for v in bucket)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: unknown bucket {bucket!r}; give (frames, height, width) of positive ints") from None
        if min(frames, height, width) < 1:
            raise ValueError(f"{field}: bucket {bucket!r} has a non-positive size; give (frames, height, width) >= 1")
        parsed.append((frames, height, width))
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"{field}: bucket list {parsed} repeats a bucket; list each (frames, height, width) once")
    return parsed


def frames_needed(frames: int, stride: int) -> int:
    """Source frames a window of ``frames`` output frames at ``stride`` spans."""
    return (frames - 1) * stride + 1


def nearest_bucket(buckets: Sequence[Bucket], height: int, width: int, available: int, stride: int) -> int | None:
    """Index of the bucket for a ``height x width`` clip of ``available`` frames; None if none fits its duration."""
    aspect = math.log(width / height)
    best, best_key = None, None
    for index, (frames, h, w) in enumerate(buckets):
        if frames_needed(frames, stride) > available:
            continue
        key = (round(abs(math.log(w / h) - aspect), 9), -frames, index)
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best


def window_offset(slack: int, window: str, rng: np.random.Generator) -> int:
    """Start of a window given ``slack`` spare frames (available - needed)."""
    if window == "first" or slack <= 0:
        return 0
    if window == "center":
        return slack // 2
    return int(rng.integers(0, slack + 1))


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size a ``height x width`` frame scales to (aspect kept) so it just covers ``target_h x target_w``."""
    scale = max(target_h / height, target_w / width)
    return max(target_h, round(height * scale)), max(target_w, round(width * scale))


def resize_crop(video: np.ndarray, target_h: int, target_w: int, crop: str, rng: np.random.Generator | None) -> np.ndarray:
    """Resize the shorter side (aspect kept) then crop ``(target_h, target_w)``, centred or at random."""
    height, width = video.shape[1:3]
    cover_h, cover_w = cover_size(height, width, target_h, target_w)
    if (cover_h, cover_w) != (height, width):  # a clip already at its size is not put through Pillow
        video = vio.resize_frames(video, cover_h, cover_w)
    spare_h, spare_w = video.shape[1] - target_h, video.shape[2] - target_w
    if crop == "random" and rng is not None:
        top, left = int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))
    else:
        top, left = spare_h // 2, spare_w // 2
    return video[:, top : top + target_h, left : left + target_w]


def resample_indices(num_frames: int, source_fps: float, target_fps: float | None) -> np.ndarray:
    """Indices of the frames of a ``num_frames`` clip at ``source_fps`` nearest to each ``target_fps`` instant."""
    if target_fps is None or abs(target_fps - source_fps) < 1e-6:
        return np.arange(num_frames)
    count = int(math.floor(num_frames * target_fps / source_fps + 1e-6))
    # An instant exactly between two frames takes the earlier one, as decoding a file does (vidiff.io.read_video).
    return np.minimum(np.ceil(np.arange(count) * source_fps / target_fps - 0.5).astype(int), num_frames - 1)


def as_rgb_video(video: Any) -> np.ndarray | None:
    """``uint8 (T, H, W, 3)`` from a dataset's array (grey is repeated to RGB); None if it is not a video."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3) or 0 in video.shape:
        return None
    return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def take_frames(video: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``video[indices]``, as a read-only view when the indices step evenly (a window at a stride, the whole clip):
    indexing with an array copies every frame, a quarter of a rendered world clip's cost. Read-only, so a later
    stage that wrote into it in place would fail instead of changing the source's clip."""
    steps = np.diff(indices)
    if len(indices) == 0 or (len(steps) and (steps[0] < 1 or np.any(steps != steps[0]))):
        return video[indices]
    window = video[indices[0] : indices[-1] + 1 : int(steps[0]) if len(steps) else 1]
    window.flags.writeable = False
    return window


@dataclasses.dataclass
class BucketWindow(grain.transforms.RandomMap):
    """In-memory clip -> bucket + temporal window (``fps`` resampling, ``stride``, random/first/center)."""

    buckets: Sequence[Bucket]
    stride: int = 1
    fps: float | None = None
    window: str = "random"

    def random_map(self, record, rng: np.random.Generator):
        """Choose the record's bucket and cut its temporal window; ``Skip``s pass through."""
        if isinstance(record, Skip):
            return record
        if "video" not in record and "video_shape" in record:
            return self._whole_stored_clip(record)
        video = as_rgb_video(record["video"])
        if video is None:
            shape = np.shape(record["video"])
            return Skip(BAD_ARRAY, record["id"], f"video is {np.asarray(record['video']).dtype} {shape}, not uint8 (T, H, W, 3)")
        chosen = self._bucket(record, *video.shape[:3])
        if isinstance(chosen, Skip):
            return chosen
        indices, bucket, out = chosen
        need = frames_needed(self.buckets[bucket][0], self.stride)
        start = window_offset(len(indices) - need, self.window, rng)
        out["video"] = take_frames(video, indices[start : start + need : self.stride])
        return out

    def _bucket(self, record, frames: int, height: int, width: int):
        """``(frame indices at self.fps, bucket, the record with its new fps and bucket)`` for a clip of that
        shape, or a ``Skip`` when no bucket fits its duration."""
        source_fps = float(record["fps"])
        indices = resample_indices(frames, source_fps, self.fps)
        bucket = nearest_bucket(self.buckets, height, width, len(indices), self.stride)
        if bucket is None:
            shortest = min(frames_needed(b[0], self.stride) for b in self.buckets)
            return Skip(TOO_SHORT, record["id"], f"{len(indices)} frames, the shortest bucket needs {shortest}")
        out = dict(record)
        out["fps"] = np.float32((self.fps or source_fps) / self.stride)
        out["bucket"] = np.int32(bucket)
        return indices, bucket, out

    def _whole_stored_clip(self, record):
        """A latents-only record (``decode_record(frames=False)``) is bucketed by its stored shape; its latents
        belong to the whole stored clip, so a bucket that would cut or resize that clip skips it."""
        frames, height, width = (int(n) for n in record["video_shape"][:3])
        chosen = self._bucket(record, frames, height, width)
        if isinstance(chosen, Skip):
            return chosen
        indices, bucket, out = chosen
        if tuple(self.buckets[bucket]) != (frames, height, width) or self.stride != 1 or \
                not np.array_equal(indices, np.arange(frames)):
            want = "x".join(map(str, self.buckets[bucket]))
            return Skip(BAD_ARRAY, record["id"], f"its latents belong to its stored {frames}x{height}x{width} clip, "
                        f"which bucket {want} at frame_stride={self.stride}, fps={self.fps} would cut")
        return out


_IMAGE_OR_VIDEO, _IMAGE_FRAME = 1, 2  # SampleImages' two key streams


def image_buckets(buckets: Sequence[Bucket]) -> list[int]:
    """Indices of the 1-frame (image) buckets."""
    return [i for i, (frames, _, _) in enumerate(buckets) if frames == 1]


@dataclasses.dataclass
class SampleImages(grain.transforms.MapWithIndex):
    """Joint image + video training: with probability ``fraction`` a clip becomes one random frame.

    The frame goes to the 1-frame bucket nearest its clip's aspect ratio, so
    images batch with images and the causal VAE encodes them like frame 0.

    The image-or-video draw decides the record's bucket, so over several
    processes (each reading every ``process_count``-th element of one global
    stream) it must come out the same on all of them at the same step:
    ``BucketBatch`` then fills the same bucket everywhere and every process
    emits batches of one shape. So that draw is keyed by ``(seed, index //
    process_count)``, the element's position in its process's stream, and the
    frame by ``(seed, index)``.
    """

    buckets: Sequence[Bucket]
    fraction: float
    seed: int = 0
    process_count: int = 1

    def map_with_index(self, index: int, record):
        """With probability ``fraction``, one random frame of the clip in the nearest image bucket."""
        in_step = np.random.default_rng([self.seed, _IMAGE_OR_VIDEO, index // self.process_count])
        if isinstance(record, Skip) or not (self.fraction > 0 and in_step.random() < self.fraction):
            return record
        rng = np.random.default_rng([self.seed, _IMAGE_FRAME, index])
        video = record["video"]
        candidates = [self.buckets[i] for i in image_buckets(self.buckets)]
        out = dict(record)
        out["video"] = video[int(rng.integers(0, len(video)))][None]
        out["bucket"] = np.int32(self.buckets.index(candidates[nearest_bucket(candidates, *video.shape[1:3], 1, 1)]))
        return out


@dataclasses.dataclass
class ResizeCrop(grain.transforms.RandomMap):
    """Resize the shorter side and crop each clip to its bucket's ``(height, width)``."""

    buckets: Sequence[Bucket]
    crop: str = "center"

    def random_map(self, record, rng: np.random.Generator):
        """Resize + crop the record's video to its bucket's size; ``Skip``s pass through."""
        if isinstance(record, Skip) or "video" not in record:  # latents-only: BucketWindow kept it whole
            return record
        _, height, width = self.buckets[int(record["bucket"])]
        out = dict(record)
        out["video"] = np.ascontiguousarray(resize_crop(record["video"], height, width, self.crop, rng))
        return out


@dataclasses.dataclass
class CaptionDropout(grain.transforms.RandomMap):
    """Replace the caption with "" with probability ``rate`` (for classifier-free guidance)."""

    rate: float

    def random_map(self, record, rng: np.random.Generator):
        """Blank the caption with probability ``rate`` and record whether it was."""
        if isinstance(record, Skip):
            return record
        drop = bool(self.rate > 0 and rng.random() < self.rate)
        out = dict(record)
        out["caption_dropped"] = np.bool_(drop)
        if drop:
            out["caption"] = ""
        return out


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
    """Apply a tokeniser hook ``caption -> ids`` / ``(ids, mask)`` / ``{"input_ids", "attention_mask"}``.

    Adds ``token_ids`` (int32) and ``token_mask`` (bool; all True when the hook
    returns ids only). The hook must pad to a fixed length for batching.
    """

    tokenize: Callable[[str], Any]

    def map(self, record):
        """Add ``token_ids`` / ``token_mask`` for the record's caption; ``Skip``s pass through."""
        if isinstance(record, Skip):
            return record
        ids, mask = _split_tokens(self.tokenize(record["caption"]))
        out = dict(record)
        out["token_ids"] = np.asarray(ids, np.int32)
        out["token_mask"] = np.ones(out["token_ids"].shape, bool) if mask is None else np.asarray(mask, bool)
        return out


def _split_tokens(tokens):
    if isinstance(tokens, Mapping):
        ids = tokens.get("input_ids", tokens.get("ids"))
        mask = tokens.get("attention_mask", tokens.get("mask"))
        if ids is None:
            raise ValueError(f"tokenize hook returned keys {sorted(tokens)}; return 'input_ids' (and 'attention_mask')")
        return ids, mask
    if isinstance(tokens, tuple) and len(tokens) == 2:
        return tokens
    return tokens, None
