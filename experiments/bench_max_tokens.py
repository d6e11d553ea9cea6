"""The longest sequence vidiff's DiT trains at batch 1: ``bench_dit.py`` at 16k, 32k, ... tokens until one does not fit.

    PYTHONPATH=. python experiments/bench_max_tokens.py --scan                   # XL, remat block, doubling from 16k
    PYTHONPATH=. python experiments/bench_max_tokens.py --scan --search-start 131072 --search-max 131072 \\
        --steps 1 --warmup 0                                                     # the goal's one length
    PYTHONPATH=. python experiments/bench_max_tokens.py --tiny --search-start 16 --search-max 64   # CPU smoke run

Each length runs as one ``bench_dit.py --mode train --batch 1 --tokens N`` in
a fresh process: a failed allocation cannot fragment the next try, and each
``peak_bytes_in_use`` is that length's own. This process never initialises a
JAX backend, so the GPU is the child's alone. Flags this script does not know
go to every child (``--preset``, ``--scan``, ``--dtype``, ``--tiny`` ...);
``--remat`` (default ``block``), ``--steps`` (2) and ``--warmup`` (1) default
to what a long sequence needs (remat, seconds per step, and the question is
whether it fits). ``bench_goals.py``'s ``max_tokens`` job runs it at the
goal's length with JAX held to an H100's memory.

Prints a JSON line per length as it ends (mode="max_tokens_length": a search cut
at a device call's limit still leaves what it measured in a ``tee``'d file),
then one JSON line: mode="max_tokens_search", max_tokens (the largest length that trained, null
if none), tried (per length: status "ok" | "oom" | "error" | "timeout",
step_s, tokens_per_s, mfu, peak_mem_GiB, error), and the preset, scan and
dtype the children reported.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import run_isolated  # (experiments/ is the script's own folder; it imports jax, no backend starts)

BENCH_DIT = Path(__file__).resolve().with_name("bench_dit.py")
SET_PER_LENGTH = ("--mode", "--batch", "--tokens", "--latent-shape")  # the search's to choose, not the caller's
TRIED_KEYS = ("status", "step_s", "tokens_per_s", "mfu", "peak_mem_GiB", "error")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--search-start", type=int, default=16384, help="first length tried (tokens)")
    p.add_argument("--search-max", type=int, default=1 << 20, help="longest length tried")
    p.add_argument("--search-timeout", type=float, default=300.0, help="seconds per length tried")
    p.add_argument("--remat", default="block", help="bench_dit.py --remat (default block)")
    p.add_argument("--steps", type=int, default=2, help="bench_dit.py --steps")
    p.add_argument("--warmup", type=int, default=1, help="bench_dit.py --warmup")
    args, args.passthrough = p.parse_known_args(argv)
    taken = [flag for flag in SET_PER_LENGTH for arg in args.passthrough if arg.split("=")[0] == flag]
    if taken:
        p.error(f"{taken[0]}: the search runs each length as --mode train --batch 1 --tokens N; leave it out")
    if not 1 <= args.search_start <= args.search_max:
        p.error(f"--search-start {args.search_start} and --search-max {args.search_max}: need 1 <= start <= max")
    return args


def search(args) -> dict:
    """Double the length from ``--search-start`` while it trains and stays within ``--search-max``."""
    tried, largest, reported = [], None, {}
    tokens = args.search_start
    while tokens <= args.search_max:
        cmd = [sys.executable, str(BENCH_DIT), *args.passthrough, "--mode", "train", "--batch", "1",
               "--tokens", str(tokens), "--remat", args.remat, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        result = run_isolated(cmd, args.search_timeout)
        reported = reported or {k: result[k] for k in ("preset", "scan", "dtype") if k in result}
        tried.append(dict(tokens=tokens, **{k: result.get(k) for k in TRIED_KEYS}))
        print(json.dumps(dict(impl="vidiff", mode="max_tokens_length", batch=1, remat=args.remat, **reported,
                              **tried[-1])), flush=True)
        if result.get("status") != "ok":
            break
        largest = tokens
        tokens *= 2
    record = dict(impl="vidiff", mode="max_tokens_search", batch=1, remat=args.remat, **reported,
                  max_tokens=largest, tried=tried)
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> dict:
    return search(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
