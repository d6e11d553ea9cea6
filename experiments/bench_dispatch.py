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
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def dispatch_times(arrays: int, steps: int) -> dict:
    step = jax.jit(lambda state: [x + 1 for x in state], donate_argnums=0)
    state = jax.block_until_ready(step([jnp.zeros((8,), jnp.float32) for _ in range(arrays)]))  # compiled
    host, waited = [], []
    for _ in range(steps):
        start = time.perf_counter()
        state = step(state)
        host.append(time.perf_counter() - start)
        jax.block_until_ready(state)
        waited.append(time.perf_counter() - start)
    return dict(arrays=arrays, steps=steps, backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                dispatch_ms=round(statistics.median(host) * 1e3, 3), waited_ms=round(statistics.median(waited) * 1e3, 3),
                per_array_us=round(statistics.median(host) / arrays * 1e6, 2))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arrays", default="44,180,746,3000", help="comma-separated argument counts")
    p.add_argument("--steps", type=int, default=20, help="timed calls per count (median reported)")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.arrays.split(",") if n]
    if not counts or min(counts) < 1 or args.steps < 1:
        raise SystemExit(f"bench_dispatch.py: --arrays needs counts >= 1 (got {args.arrays!r}), --steps >= 1")
    records = []
    for count in counts:
        records.append(dispatch_times(count, args.steps))
        print(json.dumps(records[-1]), flush=True)
    return records


if __name__ == "__main__":
    main()
