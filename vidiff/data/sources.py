"""Data sources behind the one record schema: video folder, TFDS, captioned world (ArrayRecord shards: ``shards``).

Each source is random access (``__len__`` / ``__getitem__``) and yields a
schema record or a ``Skip``. The video folder is two steps: ``read_manifest``
turns a ``.jsonl`` / ``.csv`` manifest into ``ManifestRow``s (bad rows are
counted there, once), and the ``DecodeFolderClip`` transform probes, picks a
bucket and a temporal window, and decodes only that window with PyAV, already
scaled to cover the bucket (FFmpeg's swscale is much faster than resizing full
frames afterwards).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import zlib
from pathlib import Path
from typing import Any, Sequence

import grain
import numpy as np

from vidiff import io as vio
from vidiff.data import skips as sk
from vidiff.data.schema import make_record
from vidiff.data.transforms import Bucket, as_rgb_video, cover_size, frames_needed, nearest_bucket, window_offset
from vidiff.data.world import CaptionedWorld, WorldConfig

MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One usable manifest entry: a video file, its caption and an optional time range in seconds."""

    path: str
    caption: str
    id: str
    start: float | None = None
    end: float | None = None
    where: str = ""  # its manifest line, e.g. "m.jsonl line 3"

    @property
    def key(self) -> str:
        """What a skip of this row is named by: several rows may cut clips from one file, so the file and the line."""
        return f"{self.path} ({self.where})" if self.where else self.path


def _parse_time(value, name):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} is a boolean")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{name}={value!r} is not a non-negative number of seconds")
    return seconds


def _row(fields: dict, where: str, base: Path) -> ManifestRow | sk.Skip:
    path = fields.get("path")
    if not isinstance(path, str) or not path.strip():
        return sk.Skip(sk.MISSING_PATH, where, "the row has no 'path'")
    key = f"{path} ({where})"
    caption = sk.check_caption(fields.get("caption"))
    if isinstance(caption, tuple):
        return sk.Skip(caption[0], key, caption[1])
    try:
        start, end = _parse_time(fields.get("start"), "start"), _parse_time(fields.get("end"), "end")
    except ValueError as e:
        return sk.Skip(sk.BAD_TIME_RANGE, key, str(e))
    if end is not None and end <= (start or 0):  # no start is the file's start: end=0 is an empty range too
        return sk.Skip(sk.BAD_TIME_RANGE, key, f"end={end:g} is not after start={start or 0:g}")
    row_id = fields.get("id")
    if not isinstance(row_id, str) or not row_id:
        row_id = path if start is None and end is None else f"{path}@{start or 0:g}-{'' if end is None else f'{end:g}'}"
    return ManifestRow(str(base / path), caption, row_id, start, end, where)


def read_manifest(manifest, video_dir=None, ledger: sk.SkipLedger | None = None, *,
                  field: str = "data.manifest", video_dir_field: str = "data.video_dir") -> list[ManifestRow]:
    """Parse a ``.jsonl`` (one JSON object a line) or ``.csv`` (header row) manifest.

    Columns: ``path`` (relative to ``video_dir``, default the manifest's folder),
    ``caption``, optional ``start`` / ``end`` seconds and ``id``. Rows that
    cannot be used are counted in ``ledger`` and logged; the rest are returned.
    A manifest without any row (blank lines aside) is a one-line error.
    """
    manifest = Path(manifest)
    suffix = manifest.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{field}: unknown manifest suffix {suffix!r} ({manifest}); use a .jsonl or .csv file")
    if not manifest.is_file():
        problem = "is a directory" if manifest.is_dir() else "does not exist"
        raise ValueError(f"{field}: manifest {manifest} {problem}; point {field} at a .jsonl or .csv file")
    base = Path(video_dir) if video_dir is not None else manifest.parent
    if video_dir is not None and not base.is_dir():
        if base.exists():
            raise ValueError(f"{video_dir_field}: {base} is a file, give a folder: "
                             "the directory holding the manifest's videos")
        raise ValueError(f"{video_dir_field}: folder {base} does not exist; point it at the directory holding the manifest's videos")
    # surrogateescape keeps undecodable bytes, so a non-UTF-8 caption costs its
    # own row (counted as non_utf8_caption), not the whole manifest; utf-8-sig
    # drops the byte-order mark Excel writes before a CSV header.
    text = manifest.read_bytes().decode("utf-8-sig", "surrogateescape")
    rows: list[ManifestRow | sk.Skip] = []
    if suffix == ".jsonl":
        # Lines end at "\n" alone: str.splitlines would also cut at U+2028 or U+0085 inside a caption, which
        # json.dumps(ensure_ascii=False) leaves unescaped.
        for number, line in enumerate((line.rstrip("\r") for line in text.split("\n")), 1):
            if not line.strip():
                continue
            where = f"{manifest.name} line {number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append(sk.Skip(sk.BAD_MANIFEST_ROW, where, f"not JSON ({e.msg})"))
                continue
            if not isinstance(fields, dict):
                rows.append(sk.Skip(sk.BAD_MANIFEST_ROW, where, f"a JSON {type(fields).__name__}, not an object"))
                continue
            rows.append(_row(fields, where, base))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in reader.fieldnames or []]
        twice = next((name for name in header if header.count(name) > 1), None)
        if twice is not None:  # DictReader would keep the last one's value and count every row as a field short
            raise ValueError(f"{field}: {manifest} header names the column {twice!r} twice; keep one {twice!r} column")
        if "path" not in header or "caption" not in header:
            raise ValueError(f"{field}: {manifest} header is {header}; its first row must name path,caption[,start,end,id]")
        reader.fieldnames = header
        for fields in reader:
            where = f"{manifest.name} line {reader.line_num}"
            count = sum(v is not None for k, v in fields.items() if k is not None) + len(fields.get(None) or ())
            if count != len(header):  # DictReader pads a short row with None and keeps a long one's rest under None
                rows.append(sk.Skip(sk.BAD_MANIFEST_ROW, where, f"{count} fields, the header has {len(header)}"))
                continue
            rows.append(_row(fields, where, base))
    if not rows:
        raise ValueError(f"{field} {manifest} has no rows; add one clip per {'line' if suffix == '.jsonl' else 'row under the header'} "
                         "with path and caption")
    good = []
    for row in rows:
        if isinstance(row, sk.Skip):
            if ledger is not None:
                ledger.skip(row)
        else:
            good.append(row)
    return good


@dataclasses.dataclass
class DecodeFolderClip(grain.transforms.RandomMap):
    """Manifest row -> record: probe, choose bucket and window, decode only the window, pre-scaled.

    ``fps`` resamples to that rate (None keeps the file's); ``stride`` keeps
    every stride-th frame after that; ``window`` is random / first / center
    within the row's ``[start, end)``.
    """

    buckets: Sequence[Bucket]
    stride: int = 1
    fps: float | None = None
    window: str = "random"
    max_pixels: int | None = None

    def random_map(self, row, rng: np.random.Generator):
        """Decode one manifest row's window, or pass on a ``Skip`` (and turn read errors into one)."""
        if isinstance(row, sk.Skip):
            return row
        try:
            return self._decode(row, rng)
        except vio.VideoReadError as e:
            return sk.Skip(e.reason, row.key, str(e).split(": ", 2)[-1])

    def _decode(self, row: ManifestRow, rng):
        if Path(row.path).is_dir():  # vidiff.io would call it "no such file", which sends the user looking for one
            return sk.Skip(vio.MISSING_FILE, row.key, "a directory, not a video file")
        info = vio.probe(row.path)
        if self.max_pixels is not None and info.width * info.height > self.max_pixels:
            return sk.Skip(vio.TOO_LARGE, row.key, f"{info.width}x{info.height} exceeds max_pixels={self.max_pixels}")
        clip_start = row.start or 0.0
        rate = self.fps or info.fps
        if info.duration > 0:
            clip_end = info.duration if row.end is None else min(row.end, info.duration)
            if clip_start >= info.duration:
                return sk.Skip(vio.NO_FRAMES, row.key, f"start={clip_start:g}s is past the end of the {info.duration:g}s video")
            available = int(math.floor((clip_end - clip_start) * rate + 1e-6))
        else:
            # No duration in the container (a still image, a raw stream): decode
            # from the start for the longest bucket; a shorter result picks
            # the bucket again below.
            available = 1 << 30 if row.end is None else int(math.floor((row.end - clip_start) * rate + 1e-6))
        bucket = nearest_bucket(self.buckets, info.height, info.width, available, self.stride)
        if bucket is None:
            return self._too_short(row, available)
        frames, height, width = self.buckets[bucket]
        need = frames_needed(frames, self.stride)
        slack = available - need if info.duration > 0 else 0
        start = clip_start + window_offset(slack, self.window, rng) / rate
        # A file that stops before the window is complete is skipped as
        # truncated, not silently shortened.
        video, _ = vio.read_video(
            row.path, fps=self.fps, start=start, end=row.end, max_frames=need,
            size=cover_size(info.height, info.width, height, width), max_pixels=self.max_pixels, truncated="error",
        )
        if len(video) < need and info.duration <= 0 and len(video) >= 1:
            # No duration to plan with: the longest bucket was tried; choose
            # again with the frames there really are, and cut that window.
            bucket = nearest_bucket(self.buckets, info.height, info.width, len(video), self.stride)
            if bucket is None:
                return self._too_short(row, len(video))
            frames, new_height, new_width = self.buckets[bucket]
            need = frames_needed(frames, self.stride)
            offset = window_offset(len(video) - need, self.window, rng)
            if (new_height, new_width) != (height, width):
                # Scaled for the bucket first tried: decode the same frames again, scaled for this one.
                video, _ = vio.read_video(
                    row.path, fps=self.fps, start=start, end=row.end, max_frames=offset + need,
                    size=cover_size(info.height, info.width, new_height, new_width), max_pixels=self.max_pixels,
                    truncated="error",
                )
            video = video[offset : offset + need]
        if len(video) < need:  # the container's duration overstated the frames
            return self._too_short(row, len(video))
        return {
            **make_record(video[:: self.stride], row.caption, rate / self.stride, row.id),
            "bucket": np.int32(bucket),
        }

    def _too_short(self, row, available):
        shortest = min(frames_needed(b[0], self.stride) for b in self.buckets)
        return sk.Skip(sk.TOO_SHORT, row.key, f"{available} frames at the target rate, the shortest bucket needs {shortest}")


class TfdsSource:
    """Any TFDS dataset read through ``tfds.data_source`` (no TensorFlow), mapped to the schema by feature keys.

    ``caption_key=None`` gives "" captions (unconditional data); ``fps_key=None``
    uses ``fps`` for every clip; ``id_key=None`` numbers records; grey videos
    are repeated to RGB.
    """

    def __init__(self, name: str, split: str, *, data_dir=None, video_key="video", caption_key="caption",
                 fps_key=None, fps: float = 8.0, id_key=None, label_keys: Sequence[str] = (), download: bool = False):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self.video_key, self.caption_key, self.fps_key, self.fps = video_key, caption_key, fps_key, fps
        self.id_key, self.label_keys = id_key, tuple(label_keys)
        self._source = _tfds_data_source(tfds, name, split, data_dir, download)
        if len(self._source):
            features = sorted(self._source[0])
            for config_field in ("video_key", "caption_key", "fps_key", "id_key"):
                key = getattr(self, config_field)
                if key is not None and key not in features:
                    raise ValueError(f"data.tfds_{config_field}={key!r} is not a feature of {name}; its features are {features}")
            missing = [k for k in self.label_keys if k not in features]
            if missing:
                raise ValueError(f"data.tfds_label_keys names {missing}, not features of {name}; its features are {features}")

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        example = self._source[index]
        record_id = f"{self.name}/{self.split}/{index}"
        if self.id_key is not None:
            value = example[self.id_key]
            record_id = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        video = as_rgb_video(example[self.video_key])
        if video is None:
            array = np.asarray(example[self.video_key])
            return sk.Skip(sk.BAD_ARRAY, record_id, f"{self.video_key} is {array.dtype} {array.shape}, not uint8 (T, H, W, 1|3)")
        caption = "" if self.caption_key is None else sk.check_caption(_item(example[self.caption_key]))
        if isinstance(caption, tuple):
            return sk.Skip(caption[0], record_id, caption[1])
        fps = self.fps if self.fps_key is None else float(example[self.fps_key])
        labels = {k: _item(example[k]) for k in self.label_keys} if self.label_keys else None
        return make_record(video, caption, fps, record_id, labels)


def _tfds_data_source(tfds, name, split, data_dir, download):
    """``tfds.data_source``, its multi-line errors (one lists every TFDS dataset) cut to one line."""
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"data.tfds_name={name!r} is not a registered TFDS dataset and no prepared copy is in "
                         f"data.tfds_data_dir={data_dir!r}; check the name or data.tfds_data_dir") from None
    except NotImplementedError as e:
        if "Random access data source" not in str(e):
            raise
        raise ValueError(f"data.tfds_name={name!r} has no array_record copy in data.tfds_data_dir={data_dir!r} "
                         "(tfds.data_source cannot read TFRecord); prepare it with "
                         "download_and_prepare(file_format='array_record') or point data.tfds_data_dir at one") from None


def _item(value):
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def world_source(world_kwargs: dict | None, split: str, buckets: Sequence[Bucket], stride: int,
                 fps: float | None = None) -> Any:
    """The built-in procedural captioned world, sized to the largest bucket and rendered at ``fps`` (``data.fps``:
    no resampling to drop the frames a bucket needs) unless ``world_kwargs`` say otherwise; splits get distinct
    seeds."""
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    kwargs = dict(world_kwargs or {})
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"data.world has unknown fields {unknown}; WorldConfig fields are {sorted(fields)}")
    kwargs.setdefault("num_frames", max(frames_needed(b[0], stride) for b in buckets))
    kwargs.setdefault("size", max(max(b[1], b[2]) for b in buckets))
    if fps:
        kwargs.setdefault("fps", float(fps))
    if split != "train":
        # A stable per-split offset: other draws, not other clips (most repeat
        # training clips); held_out="only" gives clips training never sees.
        default_seed = next(f.default for f in dataclasses.fields(WorldConfig) if f.name == "seed")
        kwargs["seed"] = int(kwargs.get("seed", default_seed or 0)) + zlib.crc32(split.encode()) % 1_000_003
    return CaptionedWorld(WorldConfig(**kwargs))
