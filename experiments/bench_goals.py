"""Every GPU performance goal in one device call: the benchmarks, most important first, under one time budget.

    PYTHONPATH=. python3 experiments/bench_goals.py --budget 540 --profile --out-dir $OUT
    PYTHONPATH=. python3 experiments/bench_goals.py --budget 300 --only max_tokens,vae_decode --out-dir $OUT
    python experiments/bench_goals.py --tiny --peer-cmd "python fake.py torch 2" ...   # CPU smoke run

A lent GPU comes with about 15 minutes of device time, its start included, and
10 minutes per call, so the goals must be measured by one prepared command,
not by the dozen separate ones in ``experiments/PERF.md``. This script runs
the jobs below in order. A job starts only if its estimated duration fits in
what is left of ``--budget``; one that does not fit is skipped (the next,
smaller job may still fit) and named at the end with the ``--only`` flag that
runs what was left, so a second call picks up where the first stopped. A job
still running at the deadline is stopped and recorded as "timeout".

| job | runs | goal |
|---|---|---|
| compare_4x4096 | bench_compare.py 4x4096, train + forward | vidiff/peer tokens/s >= 1.2 (train and forward) |
| compare_1x16384 | bench_compare.py 1x16384, train (remat: the peer whole blocks, vidiff `attention`) | vidiff/peer tokens/s >= 1.0 |
| max_tokens | bench_dit.py: one XL step at batch 1, 131,072 tokens | it runs in 80 GB (remat block, scanned, bf16) |
| vae_decode | bench_vae.py: chunked decode, 256 px, 17 and 257 frames | peak memory ratio <= 1.2 |
| compare_64x256 | bench_compare.py 64x256, train | vidiff/peer tokens/s >= 1.2 |
| forward_64x256, forward_1x16384 | bench_compare.py, forward only | vidiff/peer tokens/s >= 1.2 |

On a GPU with more memory than an H100 80GB (an H200), ``max_tokens`` runs
with JAX's allocator capped at ``--memory-cap-mib`` (the H100's 81,559 MiB),
so the goal is measured in an H100's memory, not extrapolated to it.

The estimates (``est_s``) are guesses from the preliminary H100 figures in
PERF.md (XL compile ~69 s unscanned, ~23 s scanned; the peer's
``torch.compile`` assumed a minute); each job's measured ``elapsed_s`` is
printed so they can be corrected.

Writes to ``--out-dir`` (three files, within the device tool's limits):
``goals.jsonl`` (one line per job as it ends: status, elapsed, every record
its benchmark printed, its goal rows), ``goals.log`` (the benchmarks' own
output, for diagnosis) and ``goals.md`` (the goal table, also printed last).
``--profile`` adds four: a trace of vidiff's forward and training steps in the
first job (``bench_dit.py --profile``), for Perfetto and TensorBoard.
The parent never imports jax or torch: every benchmark runs in its own
process and owns the whole GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_compare import fmt, json_lines, vidiff_env  # noqa: E402  (imports neither jax nor torch)

LONG_SEQUENCE_GOAL = 131_072
H100_MEMORY_MIB = 81_559  # what nvidia-smi reports for an H100 80GB: the long-sequence goal's memory
BENCH_MEM_FRACTION = 0.95  # the share of a GPU bench_dit.py gives JAX (its XLA_PYTHON_CLIENT_MEM_FRACTION)
STOP_MARGIN_S = 5.0  # kept back from each job's timeout to write its results


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    est_s: float  # expected duration on an H100/H200, start-up and compilation included
    kind: str  # "compare", "max_tokens" or "vae"
    config: str = ""  # compare: bench_compare config (full size)
    tiny_config: str = ""  # compare: the --tiny stand-in
    modes: tuple[str, ...] = ()
    min_ratio: dict = dataclasses.field(default_factory=dict)  # mode -> vidiff/peer tokens/s goal


JOBS = (
    Job("compare_4x4096", 240, "compare", "4x4096", "2x32", ("train", "forward"), {"train": 1.2, "forward": 1.2}),
    Job("compare_1x16384", 190, "compare", "1x16384", "1x64", ("train",), {"train": 1.0}),
    Job("max_tokens", 110, "max_tokens"),
    Job("vae_decode", 90, "vae"),
    Job("compare_64x256", 170, "compare", "64x256", "2x32", ("train",), {"train": 1.2}),
    Job("forward_64x256", 110, "compare", "64x256", "2x32", ("forward",), {"forward": 1.2}),
    Job("forward_1x16384", 110, "compare", "1x16384", "1x64", ("forward",), {"forward": 1.2}),
)
JOB_NAMES = [job.name for job in JOBS]


# --------------------------------------------------------------------------- each job's command and goals


def job_command(job: Job, args, results_path: Path, timeout: float) -> list[str]:
    """The job's benchmark command line; ``timeout`` bounds each of its own subprocesses."""
    python = [sys.executable]
    inner = str(round(max(1.0, timeout - STOP_MARGIN_S)))  # so the benchmark still prints what it measured
    if job.kind == "compare":
        cmd = [*python, str(HERE / "bench_compare.py"), "--configs", job.tiny_config if args.tiny else job.config,
               "--modes", ",".join(job.modes), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--peak-tflops", str(args.peak_tflops), "--out", str(results_path), "--timeout", inner]
        for flag in ("peer", "peer_cmd", "peer_forward_cmd", "vidiff_cmd"):
            if getattr(args, flag):
                cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        extra = args.vidiff_extra or ""
        if args.profile and job is JOBS[0]:  # a trace of the first job's steps, after they are timed
            extra += f" --profile {shlex.quote(str(results_path.parent))}"
        if extra.strip():
            cmd += ["--vidiff-extra", extra.strip()]
        return cmd + (["--tiny"] if args.tiny else [])
    if job.kind == "max_tokens":
        tokens = 16 if args.tiny else LONG_SEQUENCE_GOAL
        return [*python, str(HERE / "bench_dit.py"), *(["--tiny"] if args.tiny else []), "--max-tokens-search",
                "--scan", "--search-start", str(tokens), "--search-max", str(tokens), "--steps", "1", "--warmup", "0",
                "--peak-tflops", str(args.peak_tflops), "--search-timeout", inner]
    size, frames = ("32", "5,9") if args.tiny else ("256", "17,257")
    return [*python, str(HERE / "bench_vae.py"), *(["--tiny"] if args.tiny else []), "--ops", "decode",
            "--ways", "chunked", "--sizes", size, "--frames", frames, "--case-timeout", inner]


def goal_rows(job: Job, records: list[dict], tiny: bool) -> list[dict]:
    """The goals a job measures: what was asked, what came out, and whether it was met (None: no figure)."""
    if job.kind == "compare":
        rows = []
        for mode, target in job.min_ratio.items():
            result = next((r for r in records if r.get("mode") == mode and "ratio_tokens_per_s" in r), None)
            ratio = result and result["ratio_tokens_per_s"]
            rows.append(dict(goal=f"{mode} {result['config'] if result else job.config} vidiff/peer tokens/s",
                             target=f">= {target}", measured=ratio, met=None if ratio is None else ratio >= target))
        return rows
    if job.kind == "max_tokens":
        search = next((r for r in records if r.get("mode") == "max_tokens_search"), {})
        tokens = 16 if tiny else LONG_SEQUENCE_GOAL
        tried = search.get("tried") or [{}]
        status = tried[0].get("status")
        met = None if status in (None, "timeout", "error") else search.get("max_tokens") == tokens
        return [dict(goal="longest trainable sequence, batch 1, remat, H100 memory", target=f">= {tokens} tokens",
                     measured=search.get("max_tokens") or status, met=met)]
    summary = next((r for r in records if r.get("kind") == "summary"), {})
    memory = {"device": "device", "host_run": "host memory, no device stats"}.get(summary.get("memory"), "device")
    return [dict(goal=f"chunked decode peak memory ({memory}), longest / shortest clip", target="<= 1.2",
                 measured=summary.get("peak_ratio"), met=summary.get("met"))]


def memory_fraction(gpu_mib: int | None, cap_mib: int) -> str | None:
    """``XLA_PYTHON_CLIENT_MEM_FRACTION`` that gives JAX of a larger GPU what it gets of ``cap_mib`` (None: no cap).

    The long-sequence goal is for an H100 (80 GB); on an H200 (141 GB) the allocator is capped
    there, so a length that trains has trained within an H100's memory, not merely been estimated to.
    """
    if not gpu_mib or gpu_mib <= cap_mib:
        return None
    return f"{BENCH_MEM_FRACTION * cap_mib / gpu_mib:.4f}"


def run_job(job: Job, args, timeout: float, out_dir: Path, log) -> dict:
    """Run one job in a subprocess with a hard timeout; its record (status, elapsed, records, goals)."""
    env, cap = vidiff_env(), None
    if job.kind == "max_tokens":
        cap = memory_fraction(args.gpu_mib, args.memory_cap_mib)
        if cap:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = cap
    results_path = out_dir / f".{job.name}.json"  # bench_compare's own report (hidden: not one of the 3 outputs)
    cmd = job_command(job, args, results_path, timeout)
    log.write(f"\n===== {job.name}: {shlex.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    # A session of its own, so a timeout stops the benchmark's children too: one left holding the GPU
    # would spoil every later job.
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=REPO_ROOT, start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        status = "ok" if child.returncode == 0 else "error"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        status = "timeout"
    elapsed = time.perf_counter() - start
    log.write(stdout + stderr)
    log.flush()
    if job.kind == "compare" and results_path.exists():
        records = json.loads(results_path.read_text())["results"]
        results_path.unlink()
    else:
        records = json_lines(stdout)
    return dict(job=job.name, status=status, elapsed_s=round(elapsed, 1), est_s=job.est_s, cmd=shlex.join(cmd),
                **({"mem_fraction": cap} if cap else {}), records=records, goals=goal_rows(job, records, args.tiny),
                **({"stderr_tail": stderr.strip().splitlines()[-10:]} if status != "ok" else {}))


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


def run_goals(args) -> list[dict]:
    deadline = time.perf_counter() + args.budget
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [job for job in JOBS if job.name in args.only and job.name not in args.skip]
    done = []
    with open(out_dir / "goals.jsonl", "a") as results, open(out_dir / "goals.log", "a") as log:
        machine = environment()
        args.gpu_mib = gpu_memory_mib(machine["gpus"])
        results.write(json.dumps(dict(job="environment", **machine, budget_s=args.budget,
                                      tiny=args.tiny, steps=args.steps, warmup=args.warmup)) + "\n")
        for job in jobs:
            left, estimate = deadline - time.perf_counter(), job.est_s * args.estimate_scale
            if estimate > left:
                record = dict(job=job.name, status="skipped", reason=f"estimated {estimate:.0f} s, {left:.0f} s left",
                              goals=[dict(goal=job.name, target="-", measured="skipped", met=None)])
            else:
                print(f"[{job.name}] starting, {left:.0f} s left, estimated {estimate:.0f} s", file=sys.stderr,
                      flush=True)
                record = run_job(job, args, max(1.0, left - STOP_MARGIN_S), out_dir, log)
                print(f"[{job.name}] {record['status']} after {record['elapsed_s']} s", file=sys.stderr, flush=True)
            results.write(json.dumps(record) + "\n")
            results.flush()
            done.append(record)
    report = goal_table(done)
    left_over = [r["job"] for r in done if r["status"] in ("skipped", "timeout")]
    if left_over:
        report += f"\n\nnot measured: run again with --only {','.join(left_over)}"
    (out_dir / "goals.md").write_text(report + "\n")
    print(report)
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
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all jobs together (a call may run 600)")
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
                   help="also write a profile of vidiff's steps in the first job (4 files: trace.json.gz, xplane.pb)")
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes (CPU smoke run; fake the peer)")
    p.add_argument("--peer", help="path of torch_dit_reference.py (default: bench_compare.py's)")
    for flag in ("--peer-cmd", "--peer-forward-cmd", "--vidiff-cmd", "--vidiff-extra"):
        p.add_argument(flag, help=f"passed to bench_compare.py {flag}")
    args = p.parse_args(argv)
    names = {}
    for flag, text in (("--only", args.only or ",".join(JOB_NAMES)), ("--skip", args.skip)):
        names[flag] = [n for n in text.split(",") if n]
        unknown = [n for n in names[flag] if n not in JOB_NAMES]
        if unknown:
            raise SystemExit(f"{flag}: unknown jobs {unknown}; choose from {JOB_NAMES}")
    args.only, args.skip = names["--only"], names["--skip"]
    args.gpu_mib = None  # read from nvidia-smi when the session starts
    if args.budget <= 0:
        raise SystemExit(f"--budget must be positive seconds, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    return run_goals(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
