"""``vidiff prepare``: a video folder + manifest -> ArrayRecord shards of fixed-size clips.

Example::

    vidiff prepare --videos clips/ --manifest clips/manifest.jsonl --out data/clips \\
        --size 64 --frames 17 --fps 8 --shard-size 256

One clip per manifest row (its ``start``/``end`` range, window first or
centre), resized on the shorter side and centre-cropped, stored as ``VDR1``
bytes (``vidiff.data.schema``: JPEG/PNG frames + JSON header, no pickle) in
``{split}-00000-of-000NN.array_record``. Bad rows and files are skipped,
counted by reason and logged; the JSON summary printed at the end (and saved
as ``{split}-summary.json``) has ``written``, ``skipped`` by reason and
``seconds``. More than ``--max-bad-fraction`` bad, or no clip at all, stops
with one error and removes the partial shards. Shards are staged in a hidden
folder in ``--out`` and moved in (replacing the split's old ones) only once
all are written; ``augment_shards`` later adds fields (e.g.
precomputed ``latents`` / ``text_embedding``) to prepared shards.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from vidiff.checks import height_width
from vidiff.data.schema import FRAME_FORMATS, decode_record, encode_record
from vidiff.data.skips import SkipLedger
from vidiff.data.sources import DecodeFolderClip, read_manifest
from vidiff.data.transforms import resize_crop

_MIN_RECORDS_FOR_EARLY_STOP = 100


def _parse_size(size) -> tuple[int, int]:
    """``--size`` as the command line gives it (``"64"``, ``"48x64"``), or a Python caller's int or pair."""
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*", size)
        if not match:
            raise ValueError(f"--size {size!r} is not SIDE or HEIGHTxWIDTH; e.g. --size 64 or --size 48x64")
        height = int(match.group(1))
        return height, int(match.group(2) or height)
    return height_width(size, field="size")


class _ShardWriter:
    """Rolls over to a new ``{split}-NNNNN.array_record.partial`` every ``shard_size`` records."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.paths: list[Path] = []
        self._writer, self._count = None, 0

    def write(self, data: bytes):
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self._count == self.shard_size:
            self._close_current()
            path = self.out / f"{self.split}-{len(self.paths):05d}.array_record.partial"
            self.paths.append(path)
            # group_size:1 keeps every record individually seekable (random access).
            self._writer, self._count = ArrayRecordWriter(str(path), "group_size:1"), 0
        self._writer.write(data)
        self._count += 1

    def _close_current(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> list[str]:
        self._close_current()
        names = []
        for index, path in enumerate(self.paths):
            final = path.with_name(f"{self.split}-{index:05d}-of-{len(self.paths):05d}.array_record")
            path.rename(final)
            names.append(final.name)
        return names

    def abort(self):
        self._close_current()
        for path in self.paths:
            path.unlink(missing_ok=True)


def prepare_shards(
    videos, manifest, out, *, size=64, frames: int = 17, fps: float | None = 8.0, stride: int = 1,
    window: str = "first", shard_size: int = 256, frame_format: str = "jpeg", quality: int = 95,
    max_pixels: int | None = 3840 * 2160, max_bad_fraction: float = 0.1, split: str = "train",
    overwrite: bool = False, threads: int = 1, add_fields: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:
    """Write ArrayRecord shards from a manifest; returns the summary dict (see the module docstring).

    ``add_fields(record) -> {name: np.ndarray}`` adds arrays (``latents``,
    ``text_embedding``, ``text_mask``, ...) to each record before it is stored.
    Counts are exact: everything runs in this process (``threads`` decode in
    parallel, results are written in manifest order).
    """
    started = time.perf_counter()
    height, width = check_options(size=size, frames=frames, fps=fps, stride=stride, window=window,
                                  shard_size=shard_size, frame_format=frame_format, quality=quality,
                                  max_pixels=max_pixels, max_bad_fraction=max_bad_fraction, threads=threads, split=split)
    out = Path(out)
    check_out(out, split, overwrite)
    ledger = SkipLedger()
    rows = read_manifest(manifest, videos, ledger, field="--manifest", video_dir_field="--videos")
    ledger.check(max_bad_fraction, field="--max-bad-fraction", uncounted=len(rows))
    staging = out / f".{split}-prepare-staging"
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's
    staging.mkdir(parents=True)
    decode = DecodeFolderClip([(frames, height, width)], stride, fps, window, max_pixels)
    rng = np.random.default_rng(0)  # first/center windows use no randomness

    def load(row):
        record = decode.random_map(row, rng)
        if isinstance(record, dict):
            record["video"] = np.ascontiguousarray(resize_crop(record["video"], height, width, "center", None))
            record.pop("bucket", None)
        return record

    writer = _ShardWriter(staging, split, shard_size)
    written = 0
    with _stops_between_records() as stop_if_asked:
        try:
            for record in _ordered_map(load, rows, threads):
                stop_if_asked()
                if not ledger.count(record):
                    ledger.check(max_bad_fraction, field="--max-bad-fraction",
                                 min_records=_MIN_RECORDS_FOR_EARLY_STOP)
                    continue
                if add_fields is not None:
                    record.update(add_fields(record))
                writer.write(encode_record(record, frame_format=frame_format, quality=quality))
                written += 1
            stop_if_asked()
            ledger.check(max_bad_fraction, field="--max-bad-fraction")
            if not written:  # shards without records would only fail later, when training opens them
                reasons = ", ".join(f"{k}={v}" for k, v in ledger.skipped.items())
                raise ValueError(f"--manifest {manifest}: none of its {ledger.seen} rows gave a clip ({reasons}); "
                                 "fix the inputs (see the warnings logged per row)")
        except BaseException:
            writer.abort()
            shutil.rmtree(staging, ignore_errors=True)
            raise
    shards = writer.finish()
    summary = {
        "written": written,
        "skipped": ledger.skipped,
        "skipped_total": ledger.bad,
        "shards": shards,
        "out": str(out),
        "clip": {"frames": frames, "height": height, "width": width, "fps": None if fps is None else fps / stride},
        "seconds": round(time.perf_counter() - started, 3),
    }
    move_in(staging, out, split, shards, summary)
    staging.rmdir()
    return summary


@contextlib.contextmanager
def _stops_between_records():
    """SIGINT and SIGTERM noted and acted on between records (``KeyboardInterrupt``; ``SystemExit(143)``), so the
    staged shards are removed either way. Python's own ``KeyboardInterrupt`` could land in a callback (jax's
    garbage-collection hook, once ``--latents`` imported jax) that discards it, and the run went on to write
    every shard; SIGTERM's default ended the process with the staging folder left behind. A second signal stops
    at once, inside the record."""
    noted, raised = [], []

    def stop_if_asked():
        if noted and not raised:  # once: a signal during the clean-up that follows must not cut it short
            raised.append(True)
            raise KeyboardInterrupt if noted[0] == signal.SIGINT else SystemExit(128 + noted[0])

    def note(signum, frame):
        noted.append(signum)
        if len(noted) > 1:  # a second signal: a record that takes long (a stalled read) is not waited for
            stop_if_asked()

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, note)
    except ValueError:  # not the main thread, which alone gets signals: they stay as they were
        pass
    try:
        yield stop_if_asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def move_in(staging: Path, out: Path, split: str, shards: list[str], summary: dict) -> None:
    """Replace the split's shards and summary in ``out`` with the ones staged in ``staging`` (also
    ``vidiff prepare --latents``'s way in).

    One rename per file is as atomic as a folder shared with other splits allows, so the order keeps every
    state a kill can leave loud or whole: the old set goes (then its summary: an old set is never left without
    it), the new shards come in, the summary comes last. A kill in between leaves a set short of its ``-of-N``
    count, which ``array_record_paths`` refuses, or a whole set without its summary, which readers skip.
    """
    for old in [*out.glob(f"{split}-*.array_record"), *out.glob(f"{split}-*.array_record.partial")]:
        old.unlink()  # (.partial: left by a vidiff that renamed its shards into --out one by one, then was killed)
    (out / f"{split}-summary.json").unlink(missing_ok=True)
    for name in shards:
        (staging / name).rename(out / name)
    (staging / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (staging / "summary.json").rename(out / f"{split}-summary.json")


def check_options(*, size, frames, fps, stride, window, shard_size, frame_format, quality, max_pixels,
                  max_bad_fraction, threads, split) -> tuple[int, int]:
    """``(height, width)`` of ``--size`` once every flag is valid, else a one-line error naming the flag."""
    height, width = _parse_size(size)
    checks = [
        (min(height, width) >= 1, "--size", "use a positive SIDE or HEIGHTxWIDTH"),
        (frames >= 1, "--frames", "use an int >= 1"),
        (fps is None or fps > 0, "--fps", "use a positive frame rate (0 keeps the file's rate)"),
        (stride >= 1, "--stride", "use an int >= 1"),
        (window in ("first", "center"), "--window", "use first or center"),
        (shard_size >= 1, "--shard-size", "use an int >= 1"),
        (frame_format in FRAME_FORMATS, "--frame-format", f"use one of {', '.join(FRAME_FORMATS)}"),
        (1 <= quality <= 100, "--quality", "use a JPEG quality in 1..100"),
        # Caught here: 0 would refuse every file, and read as bad inputs.
        (max_pixels is None or max_pixels >= 1, "--max-pixels", "use a positive pixel count, e.g. 8294400 (3840x2160)"),
        (0 <= max_bad_fraction <= 1, "--max-bad-fraction", "use a fraction in [0, 1]"),
        (threads >= 1, "--threads", "use an int >= 1"),
        (bool(re.fullmatch(r"[A-Za-z0-9_.]+", split)), "--split", "use letters, digits, '_' or '.'"),
    ]
    for ok, flag, fix in checks:
        if not ok:
            raise ValueError(f"{flag} is invalid; {fix}")
    return height, width


def check_out(out: Path, split: str, overwrite: bool) -> list[Path]:
    """The split's shards already in ``out``; a one-line error when ``out`` is a file, or holds them without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    existing = sorted(out.glob(f"{split}-*.array_record"))
    if existing and not overwrite:
        raise ValueError(f"--out {out} already holds {len(existing)} {split}-*.array_record shards; pass --overwrite or choose an empty directory")
    return existing


def _ordered_map(fn, items: list, threads: int) -> Iterable:
    if threads == 1:
        yield from map(fn, items)
        return
    # Bounded look-ahead: decoded clips wait in memory only a few at a time.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        chunk = 4 * threads
        for begin in range(0, len(items), chunk):
            yield from pool.map(fn, items[begin : begin + chunk])


def augment_shards(source_dir, out_dir, add_fields: Callable[[dict], dict], *, split: str = "train",
                   frame_format: str = "jpeg", quality: int = 95) -> list[str]:
    """Copy prepared shards to ``out_dir``, adding ``add_fields(record)`` arrays to every record.

    The hook for precomputed ``latents`` / ``text_embedding`` + ``text_mask``:
    the ArrayRecord source passes any such array field through unchanged.
    Use ``frame_format="png"`` to keep frames bit-exact (JPEG re-encodes).
    Shards are written as ``.partial`` files and renamed once every one is
    complete, so a failing hook leaves no shard that looks whole.
    """
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    paths = sorted(source_dir.glob(f"{split}-*.array_record"))
    if not paths:
        raise ValueError(f"{source_dir} holds no {split}-*.array_record shards; run `vidiff prepare --out {source_dir}` first")
    if out_dir.resolve() == source_dir.resolve():  # a shard written while it is read is lost
        raise ValueError(f"augment_shards: out_dir is the source folder {source_dir}; write to another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = [out_dir / f"{path.name}.partial" for path in paths]
    try:
        for path, target in zip(paths, partial):
            reader = ArrayRecordReader(str(path))
            writer = ArrayRecordWriter(str(target), "group_size:1")
            try:
                for data in reader.read_all():
                    record = decode_record(data)
                    record.update(add_fields(record))
                    writer.write(encode_record(record, frame_format=frame_format, quality=quality))
            finally:
                writer.close()
                reader.close()
    except BaseException:
        for target in partial:
            target.unlink(missing_ok=True)
        raise
    for path, target in zip(paths, partial):
        target.rename(out_dir / path.name)
    return [path.name for path in paths]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vidiff prepare``."""
    parser.add_argument("--videos", required=True, help="folder the manifest's paths are relative to")
    parser.add_argument("--manifest", required=True, help=".jsonl or .csv with path, caption[, start, end, id]")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--size", default="64", help="SIDE or HEIGHTxWIDTH of the stored clips (default 64)")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    parser.add_argument("--fps", type=float, default=8.0, help="resample to this rate; 0 keeps each file's rate (default 8)")
    parser.add_argument("--stride", type=int, default=1, help="keep every n-th frame after resampling (default 1)")
    parser.add_argument("--window", choices=("first", "center"), default="first", help="which window of each row")
    parser.add_argument("--shard-size", type=int, default=256, help="records per shard (default 256)")
    parser.add_argument("--frame-format", choices=FRAME_FORMATS, default="jpeg", help="frame codec (png is lossless)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--max-pixels", type=int, default=3840 * 2160, help="skip videos with larger frames")
    parser.add_argument("--max-bad-fraction", type=float, default=0.1, help="stop when more of the rows are bad (default 0.1)")
    parser.add_argument("--split", default="train", help="shard name prefix (default train)")
    parser.add_argument("--threads", type=int, default=1, help="decode threads (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of this split in --out")


def run(args: argparse.Namespace) -> int:
    """Run ``vidiff prepare`` and print its JSON summary on one line."""
    summary = prepare_shards(
        args.videos, args.manifest, args.out, size=args.size, frames=args.frames, fps=args.fps or None,
        stride=args.stride, window=args.window, shard_size=args.shard_size, frame_format=args.frame_format,
        quality=args.quality, max_pixels=args.max_pixels, max_bad_fraction=args.max_bad_fraction,
        split=args.split, overwrite=args.overwrite, threads=args.threads,
    )
    print(json.dumps(summary))
    return 0
