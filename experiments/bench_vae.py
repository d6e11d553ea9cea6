"""Encode/decode throughput and peak memory of the video VAE, one-shot against chunked in time.

    PYTHONPATH=. python experiments/bench_vae.py                       # base VAE, 256 and 512 px, 17/65/257 frames
    PYTHONPATH=. python experiments/bench_vae.py --sizes 256 --ways chunked --ops decode
    PYTHONPATH=. python experiments/bench_vae.py --tiny --in-process   # CPU smoke run (tiny VAE, 32 px)

For every (op, way, size, frames) case, a clip ``(batch, frames, size, size, 3)``
(or its latents, for decode) of random values goes through
``VideoVAE.encode`` / ``decode`` either one-shot (one jitted apply) or chunked
(``vidiff.models.vae.encode_chunked`` / ``decode_chunked``: causal-conv caches
carried across ``--chunk-frames`` video frames / ``--chunk-latent-frames``
latent frames). Parameters are float32, compute in ``--dtype``.

Each case runs in its own subprocess (unless ``--in-process``), because the
device's ``peak_bytes_in_use`` only ever grows within a process: isolation
makes each case's peak its own, and a case that runs out of memory cannot
disturb the next. Time: ``--warmup`` untimed calls (compiling), then the
median of ``--repeats`` calls closed by ``jax.block_until_ready``.

Prints one JSON line per case (impl="vidiff", bench="vae", op, way, size,
frames, status "ok" | "oom" | "error", time_s, frames_per_s, peak_mem_GiB,
device_base_GiB, device_warmup_peak_GiB, device_added_GiB, host_run_GiB),
then one summary line per (op, way, size) with ``peak_ratio``: the memory of
the longest clip over that of the shortest. The goal for chunked decode is
flat memory in clip length: ``peak_ratio <= 1.2`` for 257 against 17 frames.

On a GPU the ratio is of ``device_added_GiB``: the device's peak
(``peak_bytes_in_use``, the whole process's: ``peak_mem_GiB``) less
``device_base_GiB``, what was in use before the warm-up (parameters, the
input), so the fixed part both clips share does not pull the ratio towards 1.
The warm-up compiles, and XLA's autotuning allocates through the same
allocator; ``device_warmup_peak_GiB`` (the peak right after the warm-up) shows
whether the peak came from there (equal to ``peak_mem_GiB``) or from the
timed calls. On backends without memory stats (CPU) those are null and the
ratio is of ``host_run_GiB``, the resident memory the timed calls added on
top of parameters, inputs and compiled code (Linux: the high-water mark is
reset after the warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# As in bench_dit: let JAX use nearly all GPU memory before declaring a one-shot case out of memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from measure import (bytes_in_use_gib, is_oom, parse_list, peak_memory_gib, proc_status_gib, reset_host_peak,  # noqa: E402
                     run_isolated, strip_flags, timed_runs)  # (experiments/ is the script's own folder)
from vidiff.models.vae import VideoVAE, decode_chunked, encode_chunked, vae_preset  # noqa: E402

PEAK_RATIO_GOAL = 1.2
DEFAULTS = dict(preset="base", sizes="256,512", frames="17,65,257", dtype="bfloat16", repeats=3, warmup=1,
                chunk_frames=16, chunk_latent_frames=4)
# tiny VAE: 4x4x4 compression, so 5 and 9 frames give 2 and 3 latent frames.
TINY_DEFAULTS = dict(preset="tiny", sizes="32", frames="5,9", dtype="float32", repeats=1, warmup=1,
                     chunk_frames=4, chunk_latent_frames=1)
OPS = ("encode", "decode")
WAYS = ("oneshot", "chunked")


_VARIABLES: dict = {}


def init_variables(vae: VideoVAE):
    """Random parameters and latent stats, initialised once per VAE config in a process."""
    if vae.config not in _VARIABLES:
        sf = vae.config.spatial_factor
        video = jnp.zeros((1, 1, sf, sf, 3))  # the smallest valid clip traces fastest
        _VARIABLES[vae.config] = jax.jit(vae.init)(jax.random.key(0), video)
    return _VARIABLES[vae.config]


def measure_case(args, op: str, way: str, size: int, frames: int) -> dict:
    """Time one case in this process; returns its JSON record."""
    cfg = vae_preset(args.preset, dtype=args.dtype)
    vae = VideoVAE(cfg)
    video_shape = (args.batch, frames, size, size, 3)
    latent_shape = cfg.latent_shape(video_shape)  # validates frames / size for this VAE
    chunk = {"encode": args.chunk_frames, "decode": args.chunk_latent_frames}[op] if way == "chunked" else None
    record = dict(impl="vidiff", bench="vae", op=op, way=way, preset=args.preset, dtype=args.dtype,
                  batch=args.batch, size=size, frames=frames, latent_shape=list(latent_shape[1:4]), chunk=chunk,
                  isolated=not args.in_process, backend=jax.default_backend(),
                  device_kind=jax.devices()[0].device_kind)
    try:
        variables = init_variables(vae)
        rng = np.random.default_rng(1)  # host random numbers: no device program to compile per shape
        if op == "encode":
            x = jnp.asarray(rng.uniform(-1.0, 1.0, video_shape).astype(np.float32))
        else:
            x = jnp.asarray(rng.standard_normal(latent_shape, np.float32))
        device_base = bytes_in_use_gib()  # parameters and the input: what every clip length holds alike
        start = time.perf_counter()
        if way == "oneshot":
            compiled = jax.jit(lambda v, inp: vae.apply(v, inp, method=op)).lower(variables, x).compile()
            run = lambda: jax.block_until_ready(compiled(variables, x))
        elif op == "encode":
            run = lambda: jax.block_until_ready(encode_chunked(vae, variables, x, args.chunk_frames))
        else:
            run = lambda: jax.block_until_ready(decode_chunked(vae, variables, x, args.chunk_latent_frames))
        timed_runs(run, args.warmup, 0)  # the first call compiles (every chunk shape, when chunked)
        setup_s = time.perf_counter() - start
        warmup_peak = peak_memory_gib()
        host_base = reset_host_peak()
        times = timed_runs(run, 0, args.repeats)
        host_peak = proc_status_gib("VmHWM") if host_base is not None else None
    except Exception as error:  # out of memory is a result for one-shot cases; anything else is a bug
        if not is_oom(error):
            raise
        return dict(record, status="oom", error=str(error).strip().splitlines()[0][:300],
                    peak_mem_GiB=peak_memory_gib())
    time_s = statistics.median(times)
    peak = peak_memory_gib()
    return dict(record, status="ok", setup_s=setup_s, time_s=time_s, frames_per_s=args.batch * frames / time_s,
                peak_mem_GiB=peak, device_base_GiB=device_base, device_warmup_peak_GiB=warmup_peak,
                device_added_GiB=None if None in (peak, device_base) else peak - device_base,
                host_base_GiB=host_base, host_peak_GiB=host_peak,
                host_run_GiB=None if host_peak is None else host_peak - host_base)


def run_case_isolated(argv: list[str], case: tuple, timeout: float) -> dict:
    """Run one case in a fresh interpreter (own device memory, own peak) and parse its JSON line."""
    op, way, size, frames = case
    passthrough = strip_flags(argv, {"--sizes": 1, "--frames": 1, "--ops": 1, "--ways": 1, "--case": 1})
    cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--case", f"{op},{way},{size},{frames}"]
    base = dict(impl="vidiff", bench="vae", op=op, way=way, size=size, frames=frames, isolated=True)
    record = run_isolated(cmd, timeout)
    return record if "bench" in record else dict(base, **record)  # else the child printed no record


def summaries(records: list[dict]) -> list[dict]:
    """Peak memory of the longest clip over the shortest, per (op, way, size).

    What the case added to the device's memory (peak less what was in use before the warm-up,
    ``device_added_GiB``) where the backend keeps stats; the device's whole peak for records without
    that figure; otherwise (CPU, where device buffers are host memory) the resident memory the timed
    calls added (``host_run_GiB``). ``memory`` says which one the ratio is of.
    """
    out = []
    groups = sorted({(r["op"], r["way"], r["size"]) for r in records})
    for op, way, size in groups:
        rows = sorted((r for r in records if (r["op"], r["way"], r["size"]) == (op, way, size)),
                      key=lambda r: r["frames"])
        if len(rows) < 2:
            continue
        short, long = rows[0], rows[-1]
        both_ok = short.get("status") == long.get("status") == "ok"
        memory, peaks = None, (short.get("peak_mem_GiB"), long.get("peak_mem_GiB"))
        for key, name in (("device_added_GiB", "device_added"), ("peak_mem_GiB", "device"),
                          ("host_run_GiB", "host_run")):
            if both_ok and None not in (short.get(key), long.get(key)) and short[key] > 0:
                memory, peaks = name, (short[key], long[key])
                break
        ratio = peaks[1] / peaks[0] if memory else None
        record = dict(impl="vidiff", bench="vae", kind="summary", op=op, way=way, size=size,
                      frames=[short["frames"], long["frames"]], memory=memory, peak_GiB=list(peaks),
                      peak_ratio=ratio)
        if memory == "device_added":  # the process's whole peaks too, for comparison with earlier runs
            record["whole_peak_ratio"] = long["peak_mem_GiB"] / short["peak_mem_GiB"] if short.get(
                "peak_mem_GiB") and long.get("peak_mem_GiB") else None
        if op == "decode" and way == "chunked":
            record.update(goal=f"peak_ratio <= {PEAK_RATIO_GOAL}",
                          met=None if ratio is None else ratio <= PEAK_RATIO_GOAL)
        out.append(record)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny VAE, 32 px, 5/9 frames (CPU smoke run)")
    p.add_argument("--preset", help="VAE preset (tiny, small, base); default base")
    p.add_argument("--sizes", help="square frame sizes, comma-separated (default 256,512)")
    p.add_argument("--frames", help="clip lengths 1 + 4k, comma-separated (default 17,65,257)")
    p.add_argument("--ops", default="encode,decode")
    p.add_argument("--ways", default="oneshot,chunked")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--chunk-frames", type=int, help="video frames per encode chunk (default 16)")
    p.add_argument("--chunk-latent-frames", type=int, help="latent frames per decode chunk (default 4)")
    p.add_argument("--repeats", type=int, help="timed calls per case (median reported)")
    p.add_argument("--warmup", type=int, help="untimed calls per case (the first compiles)")
    p.add_argument("--in-process", action="store_true",
                   help="run all cases in this process (faster; peak memory is then cumulative)")
    p.add_argument("--case-timeout", type=float, default=600.0, help="seconds per isolated case")
    p.add_argument("--case", help=argparse.SUPPRESS)  # op,way,size,frames: one isolated case (internal)
    args = p.parse_args(argv)
    for name, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.size_list = parse_list(args.sizes, int, flag="--sizes")
        args.frame_list = parse_list(args.frames, int, flag="--frames")
        args.op_list = parse_list(args.ops, str, OPS, "--ops")
        args.way_list = parse_list(args.ways, str, WAYS, "--ways")
    except ValueError as error:
        p.error(str(error))
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1 (the warmup call compiles)")
    if args.batch < 1:  # (a 0 ran and reported the memory of empty clips)
        p.error(f"--batch must be >= 1, got {args.batch}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.case:  # child of an isolated run: one case, one line
        op, way, size, frames = args.case.split(",")
        print(json.dumps(measure_case(args, op, way, int(size), int(frames))), flush=True)
        return []
    records = []
    for size in args.size_list:
        for frames in args.frame_list:
            for op in args.op_list:
                for way in args.way_list:
                    case = (op, way, size, frames)
                    if args.in_process:
                        record = measure_case(args, *case)
                    else:
                        record = run_case_isolated(argv, case, args.case_timeout)
                    print(json.dumps(record), flush=True)
                    records.append(record)
    for record in summaries(records):
        print(json.dumps(record), flush=True)
    return records


if __name__ == "__main__":
    main()
