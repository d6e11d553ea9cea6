"""``DataConfig``: every knob of the data pipeline, validated before any data is touched.

Experiments keep these fields under ``config.data`` (an ``ml_collections``
ConfigDict); ``DataConfig.from_any`` also takes a dict, a dataclass or any
object with these attributes, plus the fields of sources registered with
``vidiff.data.register_source``. A wrong value raises one ``ValueError`` line
naming ``data.<field>`` and how to fix it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from vidiff.checks import field_checker, height_width, is_int, is_number
from vidiff.data.registry import FIELD_SOURCES, source_hint, source_names
from vidiff.data.transforms import CROPS, WINDOWS, Bucket, parse_buckets


@dataclasses.dataclass
class DataConfig:
    """Data pipeline settings (see the field comments; units are frames, pixels and seconds)."""

    source: str = "world"  # world | folder | array_record | tfds | a name given to vidiff.data.register_source
    # Clip shape. ``size`` is the square side or (height, width).
    num_frames: int = 17
    size: Any = 32
    frame_stride: int = 1  # keep every n-th frame (after fps resampling)
    fps: float | None = None  # resample to this rate; None keeps the source's
    window: str = "random"  # random | first | center temporal window
    crop: str = "center"  # center | random spatial crop after the shorter-side resize
    buckets: Sequence | None = None  # [(frames, height, width) or "FxHxW", ...]; None = one bucket from num_frames/size
    # Batching and order.
    batch_size: int = 8
    drop_remainder: bool = True
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None repeats forever
    caption_dropout: float = 0.0  # probability of replacing the caption by "" (classifier-free guidance)
    image_fraction: float = 0.0  # joint image + video: share of clips cut to one frame (needs a 1-frame bucket)
    # Parallelism: mp_prefetch worker processes, and reader threads per process.
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 8
    # Training: batches drawn ahead of the step and made device arrays on a worker thread (0 = on the main thread).
    prefetch_to_device: int = 2
    # Bad input: skipped and counted; past this fraction the stream stops.
    max_bad_fraction: float = 0.1
    bad_fraction_min_records: int = 100  # judge the fraction only after this many records (and at stream end)
    max_pixels: int | None = 3840 * 2160  # refuse video frames larger than this
    skip_log_dir: str | None = None  # where worker processes leave their skip counts (default: a temp dir)
    # source="folder"
    manifest: Any = None  # path to .jsonl/.csv, or {split: path}
    video_dir: str | None = None  # manifest paths are relative to this (default: the manifest's folder)
    # source="array_record"
    array_record_path: Any = None  # `vidiff prepare --out` directory, a glob, or a list of shards
    # source="tfds"
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    tfds_splits: Mapping | None = None  # {vidiff split: tfds split}, default the same name
    tfds_video_key: str = "video"
    tfds_caption_key: str | None = "caption"
    tfds_fps_key: str | None = None
    tfds_fps: float = 8.0  # frame rate when the dataset has no fps feature
    tfds_id_key: str | None = None
    tfds_label_keys: Sequence[str] = ()
    tfds_download: bool = False  # vidiff never downloads unless asked
    # source="world": WorldConfig overrides (num_frames/size default to the largest bucket, fps to data.fps)
    world: Mapping | None = None

    # A registered source's own fields (data.png_dir) are instance attributes, not dataclass fields, which every
    # config spelling out DataConfig's fields would then hold.
    def __getattr__(self, name: str):
        """A registered source's field the config leaves unset: None."""
        if name in FIELD_SOURCES:  # (only asked for names that are not attributes)
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __eq__(self, other):
        return type(other) is type(self) and vars(self) == vars(other)

    @classmethod
    def from_any(cls, config: Any) -> "DataConfig":
        """A validated ``DataConfig`` from a DataConfig, dict, ConfigDict or attribute object."""
        if isinstance(config, cls):
            values = {**vars(config), **dataclasses.asdict(config)}
        elif isinstance(config, Mapping) or hasattr(config, "keys"):
            values = {k: config[k] for k in config.keys()}
        elif dataclasses.is_dataclass(config):
            values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        else:
            values = {k: v for k, v in vars(config).items() if not k.startswith("_")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(FIELD_SOURCES))
        if unknown:
            raise ValueError(f"data config has unknown field(s) {unknown}; known fields: "
                             f"{', '.join(sorted(known | set(FIELD_SOURCES)))}")
        values = {k: _plain(v) for k, v in values.items()}
        out = cls(**{k: v for k, v in values.items() if k in known})
        out.__dict__.update({k: v for k, v in values.items() if k not in known})
        out.validate()
        return out

    @property
    def height_width(self) -> tuple[int, int]:
        """``(height, width)`` from ``size``, with a one-line error naming ``data.size`` otherwise."""
        return height_width(self.size)

    def bucket_list(self) -> list[Bucket]:
        """The buckets, or the single ``(num_frames, height, width)`` bucket."""
        return parse_buckets(self.buckets, (self.num_frames, *self.height_width))

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for the first bad field."""
        need = field_checker("data", lambda field: getattr(self, field))
        need(self.source in source_names(), "source", source_hint())
        # A string such as "no" or "false" is truthy: only real booleans are taken.
        for flag in ("drop_remainder", "shuffle", "tfds_download"):
            need(isinstance(getattr(self, flag), bool), flag, "use True or False (a bool, not a string or number)")
        need(is_int(self.num_frames) and self.num_frames >= 1, "num_frames", "use an int >= 1 (e.g. 17 = 1 + 4k for the causal VAE)")
        height, width = self.height_width
        need(height >= 1 and width >= 1, "size", "use a positive side or (height, width)")
        need(is_int(self.frame_stride) and self.frame_stride >= 1, "frame_stride", "use an int >= 1")
        need(self.fps is None or (is_number(self.fps) and self.fps > 0), "fps", "use a positive frame rate or None")
        need(self.window in WINDOWS, "window", f"use one of {', '.join(WINDOWS)}")
        need(self.crop in CROPS, "crop", f"use one of {', '.join(CROPS)}")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "use an int >= 1")
        need(self.num_epochs is None or (is_int(self.num_epochs) and self.num_epochs >= 1), "num_epochs", "use an int >= 1, or None to repeat forever")
        need(is_number(self.caption_dropout) and 0 <= self.caption_dropout <= 1, "caption_dropout", "use a probability in [0, 1]")
        need(is_number(self.image_fraction) and 0 <= self.image_fraction <= 1, "image_fraction", "use a fraction in [0, 1]")
        side = "x".join(map(str, self.height_width))  # the example fits this run's clips
        need(self.image_fraction == 0 or any(b[0] == 1 for b in self.bucket_list()), "image_fraction",
             f"add a 1-frame image bucket, e.g. data.buckets=['{self.num_frames}x{side}', '1x{side}'], or set "
             f"data.image_fraction=0.0")
        need(is_int(self.num_workers) and self.num_workers >= 0, "num_workers", "use an int >= 0 (0 = no worker processes)")
        need(is_int(self.worker_buffer_size) and self.worker_buffer_size >= 1, "worker_buffer_size", "use an int >= 1")
        need(is_int(self.read_threads) and self.read_threads >= 0, "read_threads", "use an int >= 0")
        need(is_int(self.read_buffer_size) and self.read_buffer_size >= max(1, self.read_threads), "read_buffer_size", "use an int >= read_threads")
        need(is_int(self.prefetch_to_device) and self.prefetch_to_device >= 0, "prefetch_to_device",
             "use an int >= 0 (0 = prepare each batch on the main thread)")
        need(is_number(self.max_bad_fraction) and 0 <= self.max_bad_fraction <= 1, "max_bad_fraction", "use a fraction in [0, 1]")
        need(is_int(self.bad_fraction_min_records) and self.bad_fraction_min_records >= 0, "bad_fraction_min_records", "use an int >= 0")
        need(self.max_pixels is None or (is_int(self.max_pixels) and self.max_pixels > 0), "max_pixels", "use a positive pixel count or None")
        need(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "use an int in [0, 2**32)")
        if self.source == "folder":
            need(self.manifest not in (None, ""), "manifest", "set it to a .jsonl or .csv manifest for source='folder'")
        if self.source == "array_record":
            need(self.array_record_path not in (None, ""), "array_record_path", "set it to the `vidiff prepare --out` directory")
        if self.source == "tfds":
            need(bool(self.tfds_name), "tfds_name", "set it to a TFDS dataset name, e.g. 'ucf101'")
        self.bucket_list()


def _plain(value):
    """ConfigDict / FrozenConfigDict children -> dicts, tuples stay tuples."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value
