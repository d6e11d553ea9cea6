"""Host time to dispatch one jitted call, by the number of argument arrays: what a waited step pays per array.

    python experiments/bench_dispatch.py                     # 44, 180, 746 and 3,000 arrays; ~5 s on 2 CPU cores
    python experiments/bench_dispatch.py --arrays 3000 --steps 50

A training step takes its whole state as arguments: an unscanned XL DiT's is
~3,000 arrays (params, EMA, AdamW's two moments), a scanned one's ~180. Before
the device starts, JAX checks and hands over every argument; when each step
is waited for (as the peer's CUDA events time it) the device idles through
that. Here the call does almost nothing (each array of 8 floats plus one,
donated, as a train step donates its state), so the time until the call
returns (``dispatch_ms``) is the host's alone; ``waited_ms`` adds the wait.
One JSON line per count. On the 2-core CPU here (2026-12-04, three runs):
0.19-0.33 ms for 180 arrays, 4.4-5.6 ms for 3,000, 1.5-1.9 us an array
(experiments/PERF.md row 10).

``--phases`` also traces 5 more calls per count (``measure.profiled_runs``)
and adds the call's host phases (``trace_summary.host_timeline``: parsing the
arguments, JAX's untraced C++ path from there to the execution, the inputs'
handling ...), to see which of them grow with the arrays; on a GPU the same
phases of a real step are in ``bench_dit.py --profile``'s record.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from measure import parse_list, profiled_runs  # (experiments/ is the script's own folder)

TRACED_CALLS = 5


def traced_phases(step, state, calls: int = TRACED_CALLS):
    """``(state, host)``: ``calls`` more waited calls of ``step`` traced, and their host side (medians)."""
    holder = {"state": state}

    def run():
        holder["state"] = jax.block_until_ready(step(holder["state"]))

    with tempfile.TemporaryDirectory(prefix="vidiff-dispatch-") as out:
        _, _, summary = profiled_runs(run, calls, out, "dispatch")
    return holder["state"], summary["host"]


def dispatch_times(arrays: int, steps: int, phases: bool = False) -> dict:
    step = jax.jit(lambda state: [x + 1 for x in state], donate_argnums=0)
    state = jax.block_until_ready(step([jnp.zeros((8,), jnp.float32) for _ in range(arrays)]))  # compiled
    host, waited = [], []
    for _ in range(steps):
        start = time.perf_counter()
        state = step(state)
        host.append(time.perf_counter() - start)
        jax.block_until_ready(state)
        waited.append(time.perf_counter() - start)
    record = dict(arrays=arrays, steps=steps, backend=jax.default_backend(),
                  device_kind=jax.devices()[0].device_kind, dispatch_ms=round(statistics.median(host) * 1e3, 3),
                  waited_ms=round(statistics.median(waited) * 1e3, 3),
                  per_array_us=round(statistics.median(host) / arrays * 1e6, 2))
    if phases:
        state, traced = traced_phases(step, state)
        record.update(traced_calls=traced["calls"], traced_call_ms=traced.get("call_ms"),
                      phases_ms=traced.get("phases_ms"))
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arrays", default="44,180,746,3000", help="comma-separated argument counts")
    p.add_argument("--steps", type=int, default=20, help="timed calls per count (median reported)")
    p.add_argument("--phases", action="store_true",
                   help=f"also trace {TRACED_CALLS} calls per count: the call's host phases (trace_summary.py)")
    args = p.parse_args(argv)
    try:
        counts = parse_list(args.arrays, int, flag="--arrays")
    except ValueError as error:
        p.error(str(error))
    if min(counts) < 1 or args.steps < 1:
        raise SystemExit(f"bench_dispatch.py: --arrays needs counts >= 1 (got {args.arrays!r}), --steps >= 1")
    records = []
    for count in counts:
        records.append(dispatch_times(count, args.steps, args.phases))
        print(json.dumps(records[-1]), flush=True)
    return records


if __name__ == "__main__":
    main()
