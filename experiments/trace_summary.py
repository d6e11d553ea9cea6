"""Where a traced step's GPU time goes: the kernels of a ``jax.profiler`` trace, summed by kind.

    python experiments/trace_summary.py train_4x4096.trace.json.gz --steps 1

A device call returns files of at most 16 MiB and its output's last 12,000
characters, so a trace is only useful if it can be read there: ``bench_dit.py
--profile`` prints this summary in its profile record, also for a trace too
big to bring back. Kernels are the complete events ("ph": "X") on the GPU's
stream threads (``/device:GPU:<n>`` processes, threads named "Stream ...");
the "XLA Ops" and "XLA Modules" rows of the same process describe the same
time again and are left out. Kinds, by kernel name:

- ``attention``: cuDNN fused attention and flash kernels (``fmha``, ``sdpa``, ``flash``);
- ``matmul``: cuBLAS / cuBLASLt / CUTLASS / Triton GEMMs (``gemm``, ``nvjet``, ``xmma``, ``cutlass``, ``cublas``);
- ``copy``: memcpy and memset;
- ``other``: everything else, XLA's elementwise, reduction and transpose fusions above all.

Times are per step (``--steps`` traced steps), in milliseconds of kernel time;
kernels on several streams at once count each. No GPU events (a CPU trace)
gives ``{"kernels": 0, "host": ...}``: the calls' host side alone.

``host`` is the calling thread's side of the same steps (:func:`host_timeline`),
the median over the traced calls of the jitted function: how long the call
took to return, how long after the call the GPU's first kernel started (what a
waited step pays on top of the GPU's work), and the PJRT / XLA phases that
make up the wait (``HOST_PHASES``: parsing the arguments, buffer assignment,
updating and launching the CUDA graph).

With the compiled program's HLO (``--hlo``, as ``bench_dit.py --dump-hlo``
writes it; ``bench_dit.py --profile`` passes it itself), ``other_by_op`` says
what the ``other`` kernels compute: XLA names a kernel after its fusion
(``fusion_9243`` is ``%fusion.9243``), whose ``op_name`` metadata is the JAX
source path (``jvp(VideoDiT)/.../blocks_3/mlp/mul``); paths are summed with
the block number folded (``blocks_N``), so the 28 blocks' copies are one row.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
from pathlib import Path

KINDS = (("attention", re.compile(r"fmha|sdpa|flash", re.I)),
         ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas", re.I)),
         ("copy", re.compile(r"memcpy|memset", re.I)))


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(kernel)), "other")


def _gpu_stream_threads(events: list[dict]) -> set[tuple]:
    """``(pid, tid)`` of the GPU processes' stream threads (all their threads if none is named)."""
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and str(e.get("args", {}).get("name", "")).startswith("/device:GPU")}
    named = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {key for key, name in named.items() if name.lower().startswith("stream")}
    if streams:
        return streams
    return {(e.get("pid"), e.get("tid")) for e in events if e.get("pid") in gpu_pids and e.get("ph") == "X"}


# Phase -> the TraceMe name (a substring) of its event on the calling thread, as jax 0.10-0.11's PJRT clients
# name them; a phase the trace lacks reads 0.
HOST_PHASES = {
    "parse_arguments": "ParseArguments",
    "args_to_execute": None,  # from ParseArguments' end to the first Execute event: JAX's C++ path, untraced
    "handle_inputs": "Handle inputs",
    "build_allocations": "Build buffer allocations",
    "execute_thunks": "GpuExecutable::ExecuteThunks",
    # Where XLA (re)records a CUDA graph: if buffer addresses moved between calls, these two grow with the
    # graph's kernels (call 5, addresses unchanged: 0.35 and 0.20 ms for 5,381 kernels).
    "graph_initialize": "Thunks::Initialize",
    "graph_update": "command_buffer::update",
    "graph_launch": "cuGraphLaunch",
}
CALL_EVENT = "PjitFunction("  # one call of a jitted function (a compiled one too), C++ fast path or not


def _correlation(event: dict):
    return event.get("args", {}).get("correlation_id")


def _phases_ms(inside: list[dict]) -> dict[str, float]:
    """One call's ``HOST_PHASES`` in ms, from the events on its thread within it."""
    phases = {phase: sum(float(e.get("dur", 0.0)) for e in inside if marker and marker in str(e.get("name", "")))
              / 1e3 for phase, marker in HOST_PHASES.items()}
    parse = [e for e in inside if e.get("name") == "ParseArguments"]
    if parse:
        parsed = float(parse[0]["ts"]) + float(parse[0].get("dur", 0.0))
        executes = [float(e["ts"]) for e in inside if "Execute" in str(e.get("name", "")) and float(e["ts"]) >= parsed]
        phases["args_to_execute"] = (min(executes) - parsed) / 1e3 if executes else 0.0
    return phases


def host_timeline(events: list[dict], kernels: list[dict]) -> dict:
    """The traced calls' host side, medians in ms: ``{"calls", "call_ms", "to_first_kernel_ms", "gpu_span_ms",
    "gpu_idle_between_ms", "phases_ms": {phase: ms}}``.

    A call's kernels are those whose ``correlation_id`` is one of the launches made inside the call (CUPTI
    links each kernel to the host API call that launched it), so calls queued back to back, whose kernels
    run after the next call has started, are told apart; a trace without the ids falls back to the kernels
    from the call's start to the next call's. ``gpu_idle_between_ms``: the GPU idle from one call's last
    kernel to the next call's first: near 0 when the host keeps ahead of queued steps. The GPU figures are
    None where no call has kernels (a CPU trace: ``bench_dispatch.py --phases``) or, for the idle time, one.
    """
    starts = sorted((e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith(CALL_EVENT)),
                    key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
    calls = []
    for event in starts:  # the outermost of nested events (the same call is traced at two levels)
        if not calls or float(event["ts"]) >= float(calls[-1]["ts"]) + float(calls[-1].get("dur", 0.0)):
            calls.append(event)
    if not calls:
        return {"calls": 0}
    by_id = collections.defaultdict(list)
    for kernel in kernels:
        by_id[_correlation(kernel)].append(kernel)
    rows, spans = [], []
    for index, call in enumerate(calls):
        begin, end = float(call["ts"]), float(call["ts"]) + float(call.get("dur", 0.0))
        inside = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) == (call.get("pid"),
                  call.get("tid")) and begin <= float(e["ts"]) <= end]
        launched = {_correlation(e) for e in inside} - {None}
        if launched:
            own = [k for cid in launched for k in by_id.get(cid, ())]
        else:
            until = float(calls[index + 1]["ts"]) if index + 1 < len(calls) else float("inf")
            own = [k for k in kernels if begin <= float(k["ts"]) < until]
        row = dict(call_ms=(end - begin) / 1e3, to_first_kernel_ms=None, gpu_span_ms=None, phases_ms=_phases_ms(inside))
        if own:
            first = min(float(k["ts"]) for k in own)
            last = max(float(k["ts"]) + float(k.get("dur", 0.0)) for k in own)
            spans.append((first, last))
            row.update(to_first_kernel_ms=(first - begin) / 1e3, gpu_span_ms=(last - first) / 1e3)
        rows.append(row)

    def median(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    idle = [(nxt[0] - prev[1]) / 1e3 for prev, nxt in zip(spans, spans[1:])]
    return {"calls": len(rows), **{key: median([row[key] for row in rows])
                                   for key in ("call_ms", "to_first_kernel_ms", "gpu_span_ms")},
            "gpu_idle_between_ms": median(idle),
            "phases_ms": {phase: median([row["phases_ms"][phase] for row in rows]) for phase in HOST_PHASES}}


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its ``op_name`` metadata, the scanned or unrolled block number folded to ``blocks_N``."""
    names = {}
    for match in _INSTRUCTION.finditer(hlo_text):
        names.setdefault(match.group(1), re.sub(r"blocks_\d+", "blocks_N", match.group(2)))
    return names


def op_of(kernel: str, op_names: dict[str, str]) -> str:
    for name in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
        if name in op_names:
            return op_names[name]
    return "(not an HLO instruction)"  # e.g. cuDNN's own helper kernels


def summarize(trace: dict, steps: int = 1, top: int = 12, hlo_text: str | None = None) -> dict:
    """``{"kernels", "total_ms", "kinds": {kind: {"ms", "share"}}, "top": [{"name", "kind", "ms", "calls"}],
    "host"}`` per step, from a Chrome-format trace (``*.trace.json.gz`` loaded); with ``hlo_text`` also
    ``"other_by_op": [{"op", "ms", "calls"}]``, the ``other`` kernels by JAX source path."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    threads = _gpu_stream_threads(events)
    kernels = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in threads]
    if not kernels:
        return {"kernels": 0, "host": host_timeline(events, [])}
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        per_name[e.get("name", "?")][0] += float(e.get("dur", 0.0)) / 1e3  # microseconds -> ms
        per_name[e.get("name", "?")][1] += 1
    total = sum(ms for ms, _ in per_name.values())
    by_kind = collections.Counter()
    for name, (ms, _) in per_name.items():
        by_kind[kind_of(name)] += ms
    ranked = sorted(per_name.items(), key=lambda item: -item[1][0])[:top]
    summary = {
        "kernels": len(kernels) // steps,
        "total_ms": round(total / steps, 3),
        "kinds": {kind: {"ms": round(ms / steps, 3), "share": round(ms / total, 4) if total else 0.0}
                  for kind, ms in by_kind.most_common()},
        "top": [{"name": name[:120], "kind": kind_of(name), "ms": round(ms / steps, 3), "calls": calls // steps}
                for name, (ms, calls) in ranked],
        "host": host_timeline(events, kernels),
    }
    if hlo_text is not None:
        op_names, by_op = hlo_op_names(hlo_text), collections.defaultdict(lambda: [0.0, 0])
        for name, (ms, calls) in per_name.items():
            if kind_of(name) == "other":
                row = by_op[op_of(name, op_names)]
                row[0] += ms
                row[1] += calls
        summary["other_by_op"] = [{"op": op[:160], "ms": round(ms / steps, 3), "calls": calls // steps}
                                  for op, (ms, calls) in sorted(by_op.items(), key=lambda item: -item[1][0])[:top]]
    return summary


def read_text(path: str | Path) -> str:
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
        return f.read()


def load_trace(path: str | Path) -> dict:
    """A trace file's JSON; a ValueError naming the file for one that is not JSON (or not gzip where it says .gz)."""
    try:
        return json.loads(read_text(path))
    except (ValueError, EOFError, gzip.BadGzipFile) as error:
        raise ValueError(f"{path} is not a jax.profiler trace (*.trace.json.gz or .json): {error}") from None


def summarize_file(path: str | Path, steps: int = 1, top: int = 12, hlo_text: str | None = None) -> dict:
    return summarize(load_trace(path), steps, top, hlo_text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a *.trace.json.gz (or .json) written by jax.profiler")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds: times are per step")
    p.add_argument("--top", type=int, default=12, help="kernels (and HLO source paths) listed by time")
    p.add_argument("--hlo", help="the traced program's optimised HLO (.txt or .txt.gz): adds other_by_op")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    import measure  # (here, not at the top: measure imports this module)

    with measure.one_line_errors("trace_summary.py"):  # a missing or unreadable file
        trace = load_trace(args.trace)
        hlo_text = read_text(args.hlo) if args.hlo else None
    summary = summarize(trace, args.steps, args.top, hlo_text)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
