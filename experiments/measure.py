"""How the benchmarks measure: timing, traces, compiled programs, device and host memory, out-of-memory,
isolated runs; and how the experiment scripts read their command lines.

``bench_dit.py`` and ``bench_vae.py`` share these. A case whose peak memory
must be its own, or that may run out of memory, runs in a fresh interpreter
(``run_isolated``): ``peak_bytes_in_use`` only ever grows within a process, and
a failed allocation may fragment the next try. Nothing here initialises a JAX
backend at import, so a script may still set ``XLA_*`` variables after it.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

import trace_summary  # (experiments/ is the scripts' own folder)


def timed_runs(run, warmup: int, steps: int) -> list[float]:
    """Call ``run()`` (which must block until its results are ready) ``warmup`` then ``steps`` times."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax.monitoring's event for a program loaded from disk


@functools.cache
def _cache_hits() -> list[int]:
    """A counter of this process's persistent-cache hits, kept by one listener registered on first use
    (registered once, so no jax version's unregistering API is needed)."""
    hits = [0]

    def listener(event: str, **_):
        if event == CACHE_HIT_EVENT:
            hits[0] += 1

    jax.monitoring.register_event_listener(listener)
    return hits


def timed_compile(jitted, *args):
    """``(compiled, seconds, from_cache)`` for ``jitted.lower(*args).compile()``, lowering included. ``from_cache`` is
    None without JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``), else whether the
    program was loaded from it: then the seconds are a load, not a compile, and the executable is the one
    an earlier process compiled (the same kernels: a repeated measurement costs no device time compiling)."""
    hits = _cache_hits()
    before = hits[0]
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    return compiled, seconds, hits[0] > before if jax.config.jax_compilation_cache_dir else None


def waited_run(dispatch, host_s: list[float]):
    """``run()`` for :func:`timed_runs`: one call of ``dispatch()``, waited for. Appends to ``host_s`` the
    seconds the call took to return: the host's argument checks (one per array of a training state) and
    the launch. On a GPU the device may already be running for part of it (the H200's 64 x 256 step
    returned after 81 ms while waiting cost only 35 ms over queueing, experiments/PERF.md), so the time the
    device sits idle is the waited step less the queued one (when the queued steps keep the device busy),
    not this."""
    def run():
        start = time.perf_counter()
        out = dispatch()
        host_s.append(time.perf_counter() - start)
        out.block_until_ready()

    return run


def queued_run(dispatch, steps: int):
    """``run()``: ``steps`` calls of ``dispatch()`` (which returns an array and does not wait) queued back to
    back, only the last waited for, as a training loop runs its steps: each call's host work hides behind
    the device's work on the one before."""
    def run():
        for _ in range(steps - 1):
            dispatch()
        dispatch().block_until_ready()

    return run


def queued_step_s(dispatch, steps: int, steady: bool = True) -> dict[str, float | None]:
    """Seconds per call of ``dispatch()`` queued back to back (:func:`queued_run`), a training loop's rate
    (``timed_runs`` waits after every call, as the peer's per-step CUDA events do):

    - ``step_s_pipelined``: ``T(steps) / steps``, one run of ``steps`` calls, timed from the first call to the
      last one's result. It carries the run's fixed costs, the device idle until the first call's launch
      and the final wait, spread over ``steps``.
    - ``step_s_steady``: ``(T(2 steps) - T(steps)) / steps`` from a second run twice as long: those fixed
      costs cancel, leaving the rate of a long run. None with ``steady=False`` (no second run: for steps
      so long that the fixed costs do not matter and the run would cost minutes), and None where the
      longer run came out no slower: ``steps`` steps took less than the runs' timing noise (a tiny CPU
      forward at ``--steps 2``: a negative rate); it needs ``steps`` large enough that a run takes tens
      of milliseconds or more.
    """
    spans = []
    for count in (steps, 2 * steps) if steady else (steps,):
        start = time.perf_counter()
        queued_run(dispatch, count)()
        spans.append(time.perf_counter() - start)
    steady_s = (spans[1] - spans[0]) / steps if steady and spans[1] > spans[0] else None
    return {"step_s_pipelined": spans[0] / steps, "step_s_steady": steady_s}


TRACE_FILE_LIMIT = 15 * 2**20  # a device call returns files up to 16 MiB: bigger traces are left behind, named


def profiled_runs(run, steps: int, out_dir: str | None, name: str, max_bytes: int = TRACE_FILE_LIMIT,
                  hlo_text: str | None = None, steps_per_run: int = 1) -> tuple[list[str], list[str], dict | None]:
    """``steps`` more (untimed) calls of ``run()`` under ``jax.profiler``, each ``steps_per_run`` steps
    (:func:`queued_run`'s, say); ``(copied, left, kernels)``: trace files copied flat into ``out_dir``,
    ``"<file> (<size> MiB > limit)"`` for each one over ``max_bytes``, not copied, and the GPU kernel time of
    one step by kind with the calls' host side (``trace_summary.summarize``; read before any file is left
    behind; with the program's ``hlo_text``, its ``other`` kernels by JAX source path too).

    Flat names (``<name>.trace.json.gz`` for Perfetto, ``<name>.xplane.pb`` for TensorBoard /
    XProf) because the profiler nests its own folders deeper than a device call returns, and a
    device call brings back no file over 16 MiB (an unscanned XL step's xplane, which carries the
    program's HLO, can be that big).
    """
    if not out_dir or steps < 1:
        return [], [], None
    with tempfile.TemporaryDirectory(prefix="vidiff-profile-") as raw:
        jax.profiler.start_trace(raw)
        try:
            for number in range(steps):
                with jax.profiler.StepTraceAnnotation(name, step_num=number):
                    run()
        finally:
            jax.profiler.stop_trace()
        os.makedirs(out_dir, exist_ok=True)
        copied, left, kernels = [], [], None
        for path in sorted(Path(raw).glob("plugins/profile/*/*")):
            if kernels is None and path.name.endswith(".trace.json.gz"):
                kernels = trace_summary.summarize_file(path, steps * steps_per_run, hlo_text=hlo_text)
            for ending in (".trace.json.gz", ".xplane.pb"):  # after the host name, which may hold dots
                if path.name.endswith(ending):
                    size = path.stat().st_size
                    if size > max_bytes:
                        left.append(f"{name + ending} ({size / 2**20:.1f} MiB > {max_bytes / 2**20:.0f} MiB)")
                        continue
                    copied.append(os.path.join(out_dir, name + ending))
                    shutil.copyfile(path, copied[-1])
    return copied, left, kernels


# --------------------------------------------------------------------------- compiled programs

CUDNN_ATTENTION_MARKER = "__cudnn$fmha"


def cudnn_attention_kernels(hlo_text: str) -> dict[str, int]:
    """cuDNN fused-attention calls in compiled HLO, forward and backward (a scanned body counts once).

    A training step under remat ``block`` runs twice as many forward kernels as under ``none``;
    ``norms``, ``attention`` and ``dots`` must run as many as ``none`` (``vidiff.models.remat.REMAT_POLICIES``)."""
    targets = re.findall(r'custom_call_target="(' + re.escape(CUDNN_ATTENTION_MARKER) + r'[^"]*)"', hlo_text)
    backward = sum("Backward" in target for target in targets)
    return {"forward": len(targets) - backward, "backward": backward}


def dump_hlo(out_dir: str | None, name: str, hlo_text: str) -> str | None:
    """The optimised HLO, gzipped, as ``out_dir/<name>.hlo.txt.gz``: names a trace's fusions (``fusion_123``)
    after the ops inside them (``trace_summary.py --hlo``)."""
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.hlo.txt.gz")
    with gzip.open(path, "wt") as f:
        f.write(hlo_text)
    return path


# --------------------------------------------------------------------------- device memory


def peak_memory_gib() -> float | None:
    """Largest ``peak_bytes_in_use`` over local devices (GiB), or None where the backend keeps no stats."""
    peaks = []
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**30 if peaks else None


def bytes_in_use_gib() -> float | None:
    """Largest ``bytes_in_use`` over local devices (GiB) now, or None where the backend keeps no stats."""
    used = [stats["bytes_in_use"] for stats in (d.memory_stats() or {} for d in jax.local_devices())
            if "bytes_in_use" in stats]
    return max(used) / 2**30 if used else None


def compiled_memory_gib(compiled) -> float | None:
    """XLA's static per-device estimate: arguments + outputs + temporaries - donated aliases."""
    try:
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / 2**30
    except Exception:  # not every backend/version implements it; the number is informative only
        return None


# What XLA (``RESOURCE_EXHAUSTED: Out of memory while trying to allocate ...``) and PyTorch
# (``torch.OutOfMemoryError: CUDA out of memory``) raise when an allocation fails. Not the BFC
# allocator's warnings ("ran out of memory trying to allocate ... not a failure"), which a child near
# the memory cap may log before failing for another reason.
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory while trying to allocate", "OutOfMemoryError",
               "CUDA out of memory")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


def last_exception_line(stderr: str) -> str:
    """The last line of a traceback's own ``SomeError: message`` form in ``stderr`` (else its last line)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1] if lines else "")


def is_oom(error: BaseException | str) -> bool:
    """Whether an exception, or the exception a failed child's ``stderr`` ends with, is a device allocation failure."""
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
    else:
        text = last_exception_line(error)
    return any(marker in text for marker in OOM_MARKERS)


# --------------------------------------------------------------------------- host memory (the CPU backend's)


def proc_status_gib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in GiB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return kib / 2**20


def reset_host_peak() -> float | None:
    """Restart the process's resident-memory high-water mark (Linux ``clear_refs``); returns the restarted mark.

    On the CPU backend device buffers are host memory, so the mark reached after
    this call is what the measured calls take on top of what was already resident
    (parameters, inputs, compiled code). ``ru_maxrss`` cannot be reset, and
    compiling often peaks higher than running. Free heap pages go back to the
    system first (glibc ``malloc_trim``): pages a warm-up freed but kept would
    otherwise be reused unseen.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the mark may then read low
        pass
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return None
    # The mark itself, not VmRSS: the kernel syncs the two counters lazily (VmRSS could read a few pages above the
    # restarted mark), and the peak read later is the same mark, so the difference can never be negative.
    return proc_status_gib("VmHWM")


# --------------------------------------------------------------------------- isolated runs


def strip_flags(argv: list[str], flags: dict[str, int]) -> list[str]:
    """``argv`` without the given flags (name -> number of values; ``--flag=value`` forms too)."""
    out, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in flags:
            i += 1 + (flags[name] if "=" not in argv[i] else 0)
            continue
        out.append(argv[i])
        i += 1
    return out


def run_isolated(cmd: list[str], timeout: float) -> dict:
    """Run a benchmark command in a fresh process; its last JSON line, or why there is none.

    A child that fails gives ``{"status": "oom" | "error", "error": <its exception line>}``, one that
    runs past ``timeout`` seconds ``{"status": "timeout"}``.
    """
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="timeout")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = last_exception_line(done.stderr) or "no output"
    return dict(status="oom" if is_oom(done.stderr) else "error", error=tail[:300])

# --------------------------------------------------------------------------- command lines


def parse_list(text: str, cast, valid=None, flag="") -> list:
    """``"a,b"`` -> ``[cast(a), cast(b)]``; a ValueError naming ``flag`` for a value ``cast`` refuses, none, or
    one not in ``valid`` (the caller hands it to ``parser.error``)."""
    try:
        items = [cast(v) for v in text.split(",") if v]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of {cast.__name__}s") from None
    if not items:
        raise ValueError(f"{flag}: give at least one value" + (f" of {valid}" if valid else ""))
    outside = [v for v in items if valid is not None and v not in valid]
    if outside:
        raise ValueError(f"{flag}: {outside} not in {valid}")
    return items


@contextlib.contextmanager
def one_line_errors(prog: str):
    """A ``ValueError`` or ``OSError`` raised inside (a missing file, a checkpoint that is none: the user's
    mistake) ends the script with ``<prog>: error: <message>`` on stderr and status 2, as ``vidiff``'s
    command does (``vidiff/cli.py``), not with a traceback. Wrap what reads the user's input, not a
    measurement, whose errors are bugs worth their traceback."""
    try:
        yield
    except (ValueError, OSError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
