"""Every GPU performance goal in one or two device calls: the benchmarks, most important first, under one budget.

    PYTHONPATH=. python3 experiments/bench_goals.py --budget 560 --out-dir $OUT                  # call 1
    PYTHONPATH=. python3 experiments/bench_goals.py --budget 260 --device-left 260 --only <jobs left> \
        --out-dir $OUT  # call 2: the command call 1 printed
    python experiments/bench_goals.py --tiny --peer-cmd "python fake.py torch 2" ...   # CPU smoke run

A lent GPU comes with 15 minutes (900 s) of device time, the machine's start
(33-36 s on an H200 here) and every idle second included, at most 10 minutes
per call, and goes back 30 s after a call unless the next one comes. So the
goals are measured by at most two prepared commands, not by the dozen
separate ones in ``experiments/PERF.md``: call 1 with ``--budget 560``, then
at once, while the machine is warm, call 2 with what is left (the command
call 1 prints last, its ``--budget`` sized from ``--device-left``;
``status``'s ``budget_left_s - 40`` is the exact figure).

This script runs the jobs below in order. A job starts only if its estimated
duration fits in what is left of ``--budget``; one that does not fit is
skipped (a later, smaller job may still fit) and named at the end with the
``--only`` flag that runs what was left. A job gets all the time left before
the budget's deadline, not only its estimate; one still running at the
deadline is stopped with its child processes and recorded as "timeout", with
whatever its benchmark had already finished (``bench_compare.py`` keeps each
subprocess's records as it goes, and every subprocess ends by the same
deadline). ``goals.md`` and ``goals.jsonl`` are rewritten after every job.

| job | est. s | runs | goal |
|---|---:|---|---|
| compare_64x256 | 500 | bench_compare.py 64x256, train + forward | vidiff/peer tokens/s >= 1.2 (train and forward) |
| compare_1x16384_block | 300 | bench_compare.py 1x16384, train, vidiff remat ``block`` (the peer's policy) | train >= 1.0 |
| vae_decode_512 | 120 | bench_vae.py: chunked decode, 512 px, 17 and 257 frames | memory added, 257 / 17 frames <= 1.2 |
| compare_4x4096 | 520 | bench_compare.py 4x4096, train + forward | vidiff/peer tokens/s >= 1.2 (train and forward) |
| compare_1x16384 | 420 | bench_compare.py 1x16384, train (remat: the peer whole blocks, vidiff ``--vidiff-remat``, default ``attention``) + forward | train >= 1.0, forward >= 1.2 |
| max_tokens | 70 | bench_max_tokens.py: one XL step at batch 1, 131,072 tokens | it runs in 80 GB (remat block, scanned, bf16) |
| vae_decode | 85 | bench_vae.py: chunked decode, 256 px, 17 and 257 frames | memory added, 257 / 17 frames <= 1.2 |

The order is the one the goals were first measured in: first those no H200
run had measured, then those measured once. By 2026-12-04 every job has run
once (PERF.md, "Results"); a later session names the jobs it wants with
``--only``. The estimates are measured, with a margin: ``compare_64x256``
took 385.9 s (vidiff's process 166 s, the peer's training 145 s, its forward
75 s), ``compare_1x16384_block`` 280.7 s, ``vae_decode_512`` 105.2 s,
``compare_1x16384`` 369 s (vidiff's process 150 s with the state built on
the host, the peer's training 148 s, its forward 71 s), ``max_tokens``
57.5 s, ``vae_decode`` 74.6 s; ``compare_4x4096`` used all of its 460 s when
vidiff still built its state on the GPU (~50 s more).
Each job's measured ``elapsed_s`` is printed, and each benchmark
subprocess's own ``elapsed_s`` is in its records, so they can be corrected.
A compare job is about one call: call 1 runs one, call 2 (~260 s) the short
jobs, or the single measurements of PERF.md. A job named in ``--only`` whose
estimate exceeds the whole ``--budget`` (with ``--profile``'s trace for the
first compare job) could never start: that stops the script in one line
before the device is used. What each job runs and how its records become
goal rows is in ``experiments/goal_jobs.py``.

The forwards run in the compare jobs (``bench_dit.py --mode both``: one
process, one parameter initialisation, one more compile), not in jobs of
their own.

Like for like: the goal rows time vidiff's training step with the peer's
optimizer work, AdamW only (``--vidiff-update adamw``, passed on as
``bench_dit.py --update adamw``: no clipping, EMA update or non-finite guard,
which the peer does not do); ``--vidiff-update full`` times the step ``vidiff
train`` runs (``experiments/bench_update.py`` times those extras alone). Each
goal row names the remat policy of each side and vidiff's update.
``XLA_FLAGS`` set for this script reaches both sides' subprocesses (PyTorch
ignores it) and is recorded in the environment line.

On a GPU with more memory than an H100 80GB (an H200), ``max_tokens`` runs
with JAX's allocator capped at ``--memory-cap-mib`` (the H100's 81,559 MiB),
so the goal is measured in an H100's memory, not extrapolated to it; the goal
row says which memory it ran in, and is not marked met or missed when
nvidia-smi's total could not be read (no cap could be set).

Writes to ``--out-dir`` (three files, within the device tool's limits):
``goals.jsonl`` (one line per job as it ends: status, elapsed, every record
its benchmark printed, its goal rows), ``goals.log`` (the benchmarks' own
output, for diagnosis) and ``goals.md`` (the goal table, also printed last).
``--profile`` (not in call 1: it is not in the estimates' plan) adds up to
four: a trace of one step of vidiff's forward and training in the first
compare job run (``bench_dit.py --profile``, printed after the timing
records, so a profiler failure costs no measurement).
The parent never imports jax or torch: every benchmark runs in its own
process and owns the whole GPU. It checks that the peer's file is there
before anything runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import DEFAULT_PEER, fmt  # noqa: E402  (neither imports jax nor torch)
from goal_jobs import (H100_MEMORY_MIB, JOB_NAMES, JOBS, PROFILE_EST_S, STOP_MARGIN_S, Job, estimate_s,  # noqa: E402
                       run_job)

# The device session (experiments/PERF.md, "Commands (GPU)"): 900 s in all, a machine start included.
SESSION_DEVICE_S = 900.0
MACHINE_START_S = 40.0  # 33-36 s measured on an H200, 2026-12-04 (start and transfers)
CALL_OVERHEAD_S = 40.0  # per call: the tree's transfer, this script's start and end, the way back of the files
CALL_MAX_BUDGET_S = 560.0  # a call runs at most 600 s
START_SLACK_S = 5.0  # a call's seconds before its first job (nvidia-smi, the result files): not a job's to use
# Settings a follow-up call must share with the call that printed it (its estimates and its measurements).
CARRIED = ("estimate_scale", "steps", "warmup", "peak_tflops", "memory_cap_mib", "vidiff_remat", "vidiff_update",
           "tiny", "peer", "peer_cmd", "peer_forward_cmd", "vidiff_cmd", "vidiff_extra")


# --------------------------------------------------------------------------- the session


def environment() -> dict:
    """GPU and package versions, without importing jax or torch (the parent stays off the device)."""
    env = dict(python=sys.version.split()[0])
    for package in ("jax", "jaxlib", "flax", "optax", "torch"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        env["gpus"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        env["gpus"] = []
    return env


def gpu_memory_mib(gpus: list[str]) -> int | None:
    """Total memory of the first GPU from nvidia-smi's ``name, 143771 MiB, driver`` line."""
    try:
        return int(gpus[0].split(",")[1].split()[0])
    except (IndexError, ValueError):
        return None


def call_jobs(args) -> list[Job]:
    """The jobs this call may run, in order: ``--only`` less ``--skip``."""
    return [job for job in JOBS if job.name in args.only and job.name not in args.skip]


def check_peer(args, jobs: list[Job]) -> None:
    """Stop, in one line and before any device time is spent, if a compare job would run without the peer."""
    modes = {mode for job in jobs if job.kind == "compare" for mode in job.modes}
    needs_file = ("train" in modes and not args.peer_cmd) or ("forward" in modes and not args.peer_forward_cmd)
    peer = Path(args.peer or DEFAULT_PEER)
    if needs_file and not peer.exists():
        raise SystemExit(f"bench_goals: the peer {peer} is missing; copy ../shared/bench/torch_dit_reference.py "
                         f"into shared/bench/ of the checkout (or pass --peer PATH)")


def next_call(left_over: list[str], args, elapsed: float) -> str:
    """The follow-up command for what was not measured, its --budget sized from the device time left.

    Its ``--only`` names just the jobs whose estimates fit that budget (a named job that cannot fit stops
    the script); the longer ones are named for another session.
    """
    if not left_over:
        return ""
    lines = [f"not measured: run again with --only {','.join(left_over)}"]
    left = args.device_left - elapsed - CALL_OVERHEAD_S  # device time after this call and the next one's overhead
    budget = math.floor(min(CALL_MAX_BUDGET_S, left))  # as printed: a job fits the --budget the command gives
    estimate = {job.name: estimate_s(job, args) for job in JOBS}
    fits = [name for name in left_over if estimate[name] <= budget - START_SLACK_S]  # as --only's check judges
    if not fits:
        lines.append(f"next call: ~{max(0, left):.0f} s of device time left by --device-left {args.device_left:.0f} "
                     f"(this call ran {elapsed:.0f} s), less than the smallest job left "
                     f"({min(estimate[name] for name in left_over):.0f} s): run them in another session")
        return "\n".join(lines)
    lines.append(f"next call, at once while the machine is warm (--budget: status's budget_left_s - "
                 f"{CALL_OVERHEAD_S:.0f}; here from --device-left {args.device_left:.0f} less this call's "
                 f"{elapsed:.0f} s), timeout_s {budget + 30:.0f}:")
    # --device-left: what the next call's own next call is sized by (call 14 of PERF.md, without it, offered a
    # third call of 539 s with 89 s of device time left)
    lines.append(f"PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/bench_goals.py --budget {budget:.0f} "
                 f"--device-left {math.floor(left)} --only {','.join(fits)} --out-dir $OUT"
                 + "".join(f" {shlex.quote(flag)}" for flag in args.carried))
    later = [name for name in left_over if name not in fits]
    if later:
        lines.append(f"estimated longer than that budget, for another session: --only {','.join(later)}")
    return "\n".join(lines)


def report(done: list[dict], args, elapsed: float) -> str:
    text = goal_table(done)
    left_over = [r["job"] for r in done if r["status"] in ("skipped", "timeout")]
    if left_over:
        text += "\n\n" + next_call(left_over, args, elapsed)
    return text


def run_goals(args) -> list[dict]:
    started = time.perf_counter()
    deadline = started + args.budget
    jobs = call_jobs(args)
    check_peer(args, jobs)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, profile = [], args.profile
    with open(out_dir / "goals.jsonl", "a") as results, open(out_dir / "goals.log", "a") as log:
        machine = environment()
        args.gpus = machine["gpus"]
        args.gpu_mib = gpu_memory_mib(machine["gpus"])
        results.write(json.dumps(dict(job="environment", **machine, budget_s=args.budget,
                                      device_left_s=args.device_left, tiny=args.tiny, steps=args.steps,
                                      warmup=args.warmup,
                                      vidiff_remat=args.vidiff_remat, vidiff_update=args.vidiff_update,
                                      xla_flags=os.environ.get("XLA_FLAGS", ""))) + "\n")
        for job in jobs:
            left = deadline - time.perf_counter()
            traced = profile and job.kind == "compare"  # --profile: the first compare job this call runs
            estimate = estimate_s(job, args, traced)
            if estimate > left:
                record = dict(job=job.name, status="skipped", reason=f"estimated {estimate:.0f} s, {left:.0f} s left",
                              goals=[dict(goal=job.name, target="-", measured="skipped", met=None)])
            else:
                print(f"[{job.name}] starting, {left:.0f} s left, estimated {estimate:.0f} s", file=sys.stderr,
                      flush=True)
                record = run_job(job, args, max(1.0, left - STOP_MARGIN_S), out_dir, log, traced)
                profile = profile and not traced
                print(f"[{job.name}] {record['status']} after {record['elapsed_s']} s", file=sys.stderr, flush=True)
            results.write(json.dumps(record) + "\n")
            results.flush()
            done.append(record)
            # After every job: a call cut at its limit still returns the table of what finished.
            (out_dir / "goals.md").write_text(report(done, args, time.perf_counter() - started) + "\n")
    text = report(done, args, time.perf_counter() - started)
    (out_dir / "goals.md").write_text(text + "\n")
    print(text)
    return done


def goal_table(done: list[dict]) -> str:
    rows = [["job", "goal", "target", "measured", "met", "elapsed s"]]
    for record in done:
        for goal in record["goals"]:
            measured = goal["measured"]
            rows.append([record["job"], goal["goal"], goal["target"],
                         fmt(measured, ".3f") if isinstance(measured, float) else str(measured),
                         {True: "yes", False: "NO", None: "-"}[goal["met"]], str(record.get("elapsed_s", "-"))])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=CALL_MAX_BUDGET_S,
                   help="seconds for all jobs together (call 1: 560; call 2: status's budget_left_s - 40)")
    p.add_argument("--device-left", type=float, default=SESSION_DEVICE_S - MACHINE_START_S,
                   help="device seconds left as this call's command starts (default 860: 900 less a machine "
                        "start): sizes the next call's --budget")
    p.add_argument("--out-dir", required=True, help="where goals.jsonl, goals.log and goals.md go")
    p.add_argument("--only", help=f"comma-separated jobs to run, in this file's order (default all: {JOB_NAMES})")
    p.add_argument("--skip", default="", help="comma-separated jobs not to run")
    p.add_argument("--estimate-scale", type=float, default=1.0, help="multiply every job's estimate (0: run all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per benchmark (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak for MFU (H100 SXM bf16 dense)")
    p.add_argument("--memory-cap-mib", type=int, default=H100_MEMORY_MIB,
                   help="GPU memory the long-sequence job may use (default: an H100 80GB's)")
    p.add_argument("--profile", action="store_true",
                   help="trace one step of vidiff's forward and training in the first compare job run "
                        f"(+{PROFILE_EST_S:.0f} s to its estimate; up to 4 files: trace.json.gz, xplane.pb)")
    p.add_argument("--vidiff-remat", default="attention", choices=("block", "attention", "dots"),
                   help="vidiff's remat at 1x16384 in compare_1x16384 (default attention; the peer recomputes "
                        "whole blocks, as block; compare_1x16384_block always runs block)")
    p.add_argument("--vidiff-update", default="adamw", choices=("adamw", "full"),
                   help="vidiff's training update in the goal rows: adamw = the peer's work (AdamW only, "
                        "default), full = vidiff train's (clip, AdamW, EMA, guard)")
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run; fake the peer)")
    p.add_argument("--peer", help="path of torch_dit_reference.py (default: bench_compare.py's)")
    for flag in ("--peer-cmd", "--peer-forward-cmd", "--vidiff-cmd", "--vidiff-extra"):
        p.add_argument(flag, help=f"passed to bench_compare.py {flag}")
    args = p.parse_args(argv)
    args.carried = [(f"--{dest.replace('_', '-')}" if getattr(args, dest) is True
                     else f"--{dest.replace('_', '-')}={getattr(args, dest)}")
                    for dest in CARRIED if getattr(args, dest) != p.get_default(dest)]
    names = {}
    for flag, text in (("--only", args.only or ",".join(JOB_NAMES)), ("--skip", args.skip)):
        names[flag] = [n for n in text.split(",") if n]
        unknown = [n for n in names[flag] if n not in JOB_NAMES]
        if unknown:
            raise SystemExit(f"{flag}: unknown jobs {unknown}; choose from {JOB_NAMES}")
    only_given = args.only is not None
    args.only, args.skip = names["--only"], names["--skip"]
    args.gpu_mib, args.gpus = None, []  # read from nvidia-smi when the session starts
    if args.budget <= 0:
        raise SystemExit(f"--budget must be positive seconds, got {args.budget}")
    if only_given:  # a job named on purpose that cannot start would waste the call: say so before it starts
        jobs = call_jobs(args)
        # --profile traces the first compare job whenever it runs, a later one only when all before it were skipped
        first_compare = next((job for job in jobs if job.kind == "compare"), None)
        for job in jobs:
            traced = args.profile and job is first_compare
            estimate = estimate_s(job, args, traced)
            if estimate > args.budget - START_SLACK_S:  # the call's start-up comes out of the budget first
                raise SystemExit(f"--only {job.name}: its estimate{' with --profile' if traced else ''}, "
                                 f"{estimate:.0f} s, exceeds --budget {args.budget:.0f} less {START_SLACK_S:.0f} s "
                                 f"of start-up, so it would be skipped; raise --budget (a call runs at most "
                                 f"{CALL_MAX_BUDGET_S:.0f} s) or leave the job for another call")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    return run_goals(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
