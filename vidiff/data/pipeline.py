"""The pipeline builder: a ``DataConfig`` -> a checkpointable grain ``IterDataset``.

Order of stages (the per-record work all sits in the ``MapDataset`` part, so
grain parallelises it with reader threads and ``mp_prefetch`` workers)::

    source (records or manifest rows)
      -> shuffle(seed) -> repeat(num_epochs)  one global order, reshuffled every epoch
      -> decode / bucket + temporal window   random, per seed and global index
      -> [image_fraction: clip -> one frame]  image-or-video draw per seed and step (see below)
      -> resize shorter side + crop          to the record's bucket
      -> caption dropout -> tokenise hook
      -> CountSkips filter                    bad items counted, dropped
      -> [process_index::process_count]      multi-host slice (lazy: only this slice is read)
      -> to_iter_dataset -> EndOfStream      flushes this process's (or worker's) skip counts
      -> batch (BucketBatch with several buckets)
      -> [num_workers: mp_prefetch]
      -> EndOfStream bad-fraction check      in the main process, on the summed counts

Several processes slice the one global stream late, so each reads distinct
records with independent random draws (keyed by the global index), and every
skipped record is counted by the one process that reads it. Draws that pick a
record's bucket (image or video) are keyed by ``global index //
process_count``, the record's position in its process's stream, so with
several buckets all processes fill the same bucket at the same step and emit
batches of one shape (``SampleImages``).

``iter(ds)`` gives an iterator with ``get_state()`` / ``set_state()``:
restoring a saved state continues with bitwise identical batches. Close the
iterator (``it.close()``) when using workers; scripts that use workers need an
``if __name__ == "__main__":`` guard (workers are spawned).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import grain

from vidiff.data import registry, shards, sources
from vidiff.data.batching import BucketBatch, batch_records
from vidiff.data.config import DataConfig
from vidiff.data.skips import CountSkips, EndOfStream, SkipLedger
from vidiff.data.transforms import BucketWindow, CaptionDropout, ResizeCrop, SampleImages, Tokenize

log = logging.getLogger("vidiff.data")


def default_process_index_count() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())`` when jax is importable, else ``(0, 1)``."""
    try:
        import jax  # lazily: the data layer must not need jax
    except ImportError:
        return 0, 1
    return jax.process_index(), jax.process_count()


def make_ledger(config: Any) -> SkipLedger:
    """The skip ledger a pipeline built from ``config`` should count into.

    With worker processes it aggregates through a directory (a folder of its own in
    ``skip_log_dir``, or a temporary one it removes when collected).
    """
    config = DataConfig.from_any(config)
    if config.skip_log_dir:  # a new folder per pipeline: the files of earlier runs there are not summed in
        Path(config.skip_log_dir).mkdir(parents=True, exist_ok=True)
        return SkipLedger(tempfile.mkdtemp(prefix="pipeline-", dir=config.skip_log_dir))
    return SkipLedger.temporary() if config.num_workers > 0 else SkipLedger()


def build_source(config: DataConfig, split: str, ledger: SkipLedger, latents_only: bool = False):
    """``(random-access source, first RandomMap)`` for ``config.source``, as registered in ``vidiff.data.registry``.

    The first stage turns a source item into a record cut to its bucket
    (decoding the window for the video folder). ``latents_only``: ``array_record``
    shards read without their frames (see ``record_stream``).
    """
    if latents_only:
        source = build_array_record(config, split, ledger, frames=False)
        return source, BucketWindow(config.bucket_list(), config.frame_stride, config.fps, config.window)
    entry = registry.get_source(config.source)
    source = entry.build(config, split, ledger)
    if entry.first_stage is not None:
        return source, entry.first_stage(config)
    return source, BucketWindow(config.bucket_list(), config.frame_stride, config.fps, config.window)


# The built-in sources' builders (registered by name in vidiff.data.registry).

def build_folder(config: DataConfig, split: str, ledger: SkipLedger):
    manifest = config.manifest
    if isinstance(manifest, dict):
        if split not in manifest:
            raise ValueError(f"data.manifest has no {split!r} entry (it has {sorted(manifest)}); add one or pass split=")
        manifest = manifest[split]
    rows = sources.read_manifest(manifest, config.video_dir, ledger)
    # The whole manifest is known: judge its rows now, before decoding anything.
    ledger.check(config.max_bad_fraction, field="data.max_bad_fraction", uncounted=len(rows))
    return rows


def folder_first_stage(config: DataConfig):
    return sources.DecodeFolderClip(config.bucket_list(), config.frame_stride, config.fps, config.window,
                                    config.max_pixels)


def build_array_record(config: DataConfig, split: str, ledger: SkipLedger, frames: bool = True):
    source = shards.ArrayRecordSource(shards.array_record_paths(config.array_record_path, split), frames=frames)
    _check_prepared_latents(source, config, frames)
    return source


def build_tfds(config: DataConfig, split: str, ledger: SkipLedger):
    return sources.TfdsSource(
        config.tfds_name, (config.tfds_splits or {}).get(split, split), data_dir=config.tfds_data_dir,
        video_key=config.tfds_video_key, caption_key=config.tfds_caption_key, fps_key=config.tfds_fps_key,
        fps=config.tfds_fps, id_key=config.tfds_id_key, label_keys=config.tfds_label_keys,
        download=config.tfds_download,
    )


def build_world(config: DataConfig, split: str, ledger: SkipLedger):
    return sources.world_source(config.world, split, config.bucket_list(), config.frame_stride, config.fps)


def _check_prepared_latents(source, config: DataConfig, frames: bool = True):
    # Precomputed latents belong to the stored clip: any re-windowing or
    # resizing would misalign them, so the config must ask for the clip as is.
    if not len(source):
        return
    first = source[0]
    if not frames and isinstance(first, dict) and "latents" not in first:  # without frames nothing is left to train on
        raise ValueError(f"the shards in data.array_record_path={config.array_record_path!r} hold no latents, which "
                         f"latents_only=True reads in place of their frames; run `vidiff prepare --latents MODEL_DIR`")
    if not isinstance(first, dict) or "latents" not in first:
        return
    stored = tuple(first["video"].shape[:3] if frames else first["video_shape"][:3])
    if config.bucket_list() != [stored] or config.frame_stride != 1 or config.fps not in (None, float(first["fps"])):
        raise ValueError(
            f"prepared clips carry latents for {stored[0]}x{stored[1]}x{stored[2]} video; set data.num_frames={stored[0]}, "
            f"data.size=({stored[1]}, {stored[2]}), data.buckets=None, data.frame_stride=1, data.fps=None"
        )


def _check_latents_only(config: DataConfig, source: Any) -> None:
    """Records without frames come only from prepared shards, and no frame can be cut from them as an image."""
    if source is not None or config.source != "array_record":
        where = "a source= of its own" if source is not None else f"data.source={config.source!r}"
        raise ValueError(f"latents_only=True reads `vidiff prepare --latents` shards, not {where}; set "
                         f"data.source='array_record' and data.array_record_path to their folder")
    if config.image_fraction > 0:
        raise ValueError(f"data.image_fraction={config.image_fraction!r} cannot cut images from latents_only=True "
                         f"records (they hold no frames); set data.image_fraction=0.0")


def _check_buckets_in_step(config: DataConfig, process_count: int, custom_source: bool):
    # With several buckets every process must fill the same bucket at the same
    # step. Random bucket picks are keyed alike on all processes; a bucket chosen
    # from the clip itself (aspect, duration) is in step only when all clips share
    # one shape. A video folder's clips differ (and are probed only when decoded).
    if process_count > 1 and len(config.bucket_list()) > 1 and config.source == "folder" and not custom_source:
        raise ValueError(
            f"data.buckets={['x'.join(map(str, b)) for b in config.bucket_list()]} with data.source='folder' on {process_count} processes: each clip's "
            "aspect and duration pick its bucket, so processes would emit batches of different shapes at the same step; "
            "use one bucket (data.buckets=None), one process, or fixed-size shards from `vidiff prepare` "
            "(data.source='array_record')"
        )


def record_stream(config: Any, *, split: str = "train", process_index: int | None = None,
                  process_count: int | None = None, skips: SkipLedger | None = None,
                  tokenize: Callable[[str], Any] | None = None, source: Any = None,
                  workers: bool = True, latents_only: bool = False) -> grain.IterDataset:
    """Unbatched schema records (windowed, resized, dropout applied), checkpointable.

    Args:
      config: a ``DataConfig`` or anything ``DataConfig.from_any`` takes.
      split: "train", "eval", ... (chooses the manifest / shards / TFDS split).
      process_index, process_count: this host's slice; default jax's values.
      skips: the ledger bad items are counted in (see ``vidiff.data.skips``);
        default ``make_ledger(config)``.
      tokenize: optional hook ``caption -> ids | (ids, mask) | dict``.
      source: a random-access sequence of schema records (or ``Skip``s) to
        use instead of ``config.source`` (a script's own stream; for
        ``vidiff train``, register a source: ``vidiff.data.register_source``).
      workers: apply ``mp_prefetch`` with ``config.num_workers`` (the batched
        pipeline turns this off and prefetches whole batches instead).
      latents_only: read ``vidiff prepare --latents`` shards without their
        frames: records carry ``video_shape`` in place of ``video`` (a DiT on
        prepared latents never reads the frames, whose decoding is nearly all
        of a record's cost); ``data.source='array_record'`` only.
    """
    config = DataConfig.from_any(config)
    if process_index is None or process_count is None:
        default_index, default_count = default_process_index_count()
        process_index = default_index if process_index is None else process_index
        process_count = default_count if process_count is None else process_count
    if not (0 <= process_index < process_count):
        raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count}); pass matching values")
    ledger = make_ledger(config) if skips is None else skips
    if config.num_workers > 0 and ledger.directory is None:
        raise ValueError("skips: worker processes cannot report into a SkipLedger without a directory; "
                         "pass SkipLedger.temporary() or SkipLedger(dir) when data.num_workers > 0")
    _check_buckets_in_step(config, process_count, custom_source=source is not None)
    if latents_only:
        _check_latents_only(config, source)
    if source is None:
        source, first_stage = build_source(config, split, ledger, latents_only)
    else:
        first_stage = BucketWindow(config.bucket_list(), config.frame_stride, config.fps, config.window)
    buckets = config.bucket_list()

    # One global stream for all processes; each takes its slice at the very end
    # (MapDataset is lazy: a process reads, decodes and counts only its slice).
    ds = grain.MapDataset.source(source).seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs)
    ds = ds.random_map(first_stage)
    if config.image_fraction > 0:
        ds = ds.map_with_index(SampleImages(buckets, config.image_fraction, config.seed, process_count))
    ds = ds.random_map(ResizeCrop(buckets, config.crop))
    ds = ds.random_map(CaptionDropout(config.caption_dropout))
    if tokenize is not None:
        ds = ds.map(Tokenize(tokenize))
    ds = ds.filter(CountSkips(ledger, config.max_bad_fraction, config.bad_fraction_min_records))
    if process_count > 1:
        ds = ds[process_index::process_count]
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer_size)
    records = EndOfStream(ds.to_iter_dataset(read), ledger, None)  # flushes this process's counts
    return _prefetch(records, config, ledger) if workers else records


def make_pipeline(config: Any, *, split: str = "train", process_index: int | None = None,
                  process_count: int | None = None, skips: SkipLedger | None = None,
                  tokenize: Callable[[str], Any] | None = None, source: Any = None,
                  latents_only: bool = False) -> grain.IterDataset:
    """Batches ``{"video": uint8 (B, T, H, W, 3), "caption": object (B,), "fps", "id", "bucket", ...}``.

    Same arguments as ``record_stream``. With several buckets a batch only
    holds records of one bucket. ``iter(ds)`` is checkpointable with
    ``get_state`` / ``set_state``; close it after use when ``num_workers > 0``.
    ``ds.ledger`` is the ``SkipLedger`` counting bad items (``ds.ledger.totals()``).
    """
    config = DataConfig.from_any(config)
    ledger = make_ledger(config) if skips is None else skips
    records = record_stream(config, split=split, process_index=process_index, process_count=process_count,
                            skips=ledger, tokenize=tokenize, source=source, workers=False,
                            latents_only=latents_only)
    if len(config.bucket_list()) > 1:
        ds = BucketBatch(records, config.batch_size, drop_remainder=config.drop_remainder, batch_fn=batch_records)
    else:
        ds = records.batch(config.batch_size, drop_remainder=config.drop_remainder, batch_fn=batch_records)
    return _prefetch(ds, config, ledger)


def _prefetch(ds: grain.IterDataset, config: DataConfig, ledger: SkipLedger) -> grain.IterDataset:
    """``mp_prefetch`` with ``num_workers``, then the end-of-stream bad-fraction check in this process."""
    if config.num_workers > 0:
        from absl import flags

        # grain reads absl flags in its workers; a script without absl.app has not parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size)
        ds = ds.mp_prefetch(options)
    return EndOfStream(ds, ledger, config.max_bad_fraction)
