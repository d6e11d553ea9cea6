"""The goals' jobs for ``experiments/bench_goals.py``: what each runs, how long it is expected to take, and
how its records become goal rows.

A job is one benchmark subprocess (``bench_compare.py``, ``bench_max_tokens.py`` or ``bench_vae.py``) run with
a hard timeout in a session of its own; :func:`run_job` returns its record (status, elapsed seconds, every
record the benchmark printed, the goal rows). The order of :data:`JOBS` is the order a session runs them;
``bench_goals.py``'s docstring and ``experiments/PERF.md`` table them (``tests/test_experiment_docs.py``
keeps both tables equal to :data:`JOBS`). Imports neither jax nor torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_compare import json_lines, vidiff_env  # noqa: E402  (imports neither jax nor torch)

LONG_SEQUENCE_GOAL = 131_072
H100_MEMORY_MIB = 81_559  # what nvidia-smi reports for an H100 80GB: the long-sequence goal's memory
BENCH_MEM_FRACTION = 0.95  # the share of a GPU bench_dit.py gives JAX (its XLA_PYTHON_CLIENT_MEM_FRACTION)
STOP_MARGIN_S = 5.0  # kept back from each job's timeout to write its results
PROFILE_EST_S = 30.0  # --profile: one more traced step of each mode, and writing the traces


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    est_s: float  # expected duration on an H100/H200, start-up and compilation included
    kind: str  # "compare", "max_tokens" or "vae"
    config: str = ""  # compare: bench_compare config (full size); vae: frame size in pixels
    tiny_config: str = ""  # the --tiny stand-in
    modes: tuple[str, ...] = ()
    min_ratio: dict = dataclasses.field(default_factory=dict)  # mode -> vidiff/peer tokens/s goal
    vidiff_remat: str | None = None  # compare with remat: this policy for vidiff (None: --vidiff-remat)


# In the order the goals were first measured: those no GPU run had measured, then those measured once (all have run).
JOBS = (
    Job("compare_64x256", 500, "compare", "64x256", "2x32", ("train", "forward"), {"train": 1.2, "forward": 1.2}),
    Job("compare_1x16384_block", 300, "compare", "1x16384", "1x64", ("train",), {"train": 1.0}, "block"),
    Job("vae_decode_512", 120, "vae", "512", "32"),
    Job("compare_4x4096", 520, "compare", "4x4096", "2x32", ("train", "forward"), {"train": 1.2, "forward": 1.2}),
    Job("compare_1x16384", 420, "compare", "1x16384", "1x64", ("train", "forward"), {"train": 1.0, "forward": 1.2}),
    Job("max_tokens", 70, "max_tokens"),
    Job("vae_decode", 85, "vae", "256", "32"),
)
JOB_NAMES = [job.name for job in JOBS]


def estimate_s(job: Job, args, traced: bool = False) -> float:
    """The seconds a job is expected to take (``--estimate-scale``d; ``traced``: with ``--profile``'s trace): what the
    runner skips a job by, what ``--only`` is checked against and what the next call's command is sized by."""
    return (job.est_s + (PROFILE_EST_S if traced else 0)) * args.estimate_scale


# --------------------------------------------------------------------------- each job's command and goals


def job_command(job: Job, args, results_path: Path, timeout: float, profile: bool = False) -> list[str]:
    """The job's benchmark command line; every subprocess of it ends ``timeout`` - a margin from now."""
    python = [sys.executable]
    inner = max(1.0, timeout - STOP_MARGIN_S)  # so the benchmark still prints what it measured
    if job.kind == "compare":
        cmd = [*python, str(HERE / "bench_compare.py"), "--configs", job.tiny_config if args.tiny else job.config,
               "--modes", ",".join(job.modes), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--peak-tflops", str(args.peak_tflops), "--out", str(results_path), "--timeout", str(round(inner)),
               "--deadline", f"{time.time() + inner:.1f}",  # one deadline for all its subprocesses together
               "--vidiff-remat", job.vidiff_remat or args.vidiff_remat, "--vidiff-update", args.vidiff_update]
        for flag in ("peer", "peer_cmd", "peer_forward_cmd", "vidiff_cmd"):
            if getattr(args, flag):
                cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
        extra = args.vidiff_extra or ""
        if profile:  # a trace of one more step of each mode, after the timing records are printed
            extra += f" --profile {shlex.quote(str(results_path.parent))} --profile-steps 1"
        if extra.strip():
            cmd += ["--vidiff-extra", extra.strip()]
        return cmd + (["--tiny"] if args.tiny else [])
    if job.kind == "max_tokens":
        tokens = 16 if args.tiny else LONG_SEQUENCE_GOAL
        return [*python, str(HERE / "bench_max_tokens.py"), *(["--tiny"] if args.tiny else []), "--scan",
                "--search-start", str(tokens), "--search-max", str(tokens), "--steps", "1", "--warmup", "0",
                "--peak-tflops", str(args.peak_tflops), "--search-timeout", str(round(inner))]
    size, frames = (job.tiny_config, "5,9") if args.tiny else (job.config, "17,257")
    return [*python, str(HERE / "bench_vae.py"), *(["--tiny"] if args.tiny else []), "--ops", "decode",
            "--ways", "chunked", "--sizes", size, "--frames", frames, "--case-timeout", str(round(inner))]


def policies(job: Job, mode: str, args) -> str:
    """What each side ran, for a goal row: remat where the config has it, and vidiff's update when training."""
    parts = []
    if job.kind == "compare" and job.config == "1x16384" and mode == "train":
        parts.append(f"remat: vidiff {job.vidiff_remat or args.vidiff_remat}, peer block")
    if mode == "train":
        parts.append("vidiff update: AdamW only, as the peer" if args.vidiff_update == "adamw" else
                     "vidiff update: clip + AdamW + EMA + guard, the peer AdamW only")
    return f" ({'; '.join(parts)})" if parts else ""


def goal_rows(job: Job, records: list[dict], args, memory_cap: str | None = None) -> list[dict]:
    """The goals a job measures: what was asked, what came out, and whether it was met (None: no figure)."""
    if job.kind == "compare":
        rows = []
        config = job.tiny_config if args.tiny else job.config
        for mode, target in job.min_ratio.items():
            result = next((r for r in records if r.get("mode") == mode and "ratio_tokens_per_s" in r), None)
            ratio = result and result["ratio_tokens_per_s"]
            rows.append(dict(goal=f"{mode} {config} vidiff/peer tokens/s{policies(job, mode, args)}",
                             target=f">= {target}", measured=ratio, met=None if ratio is None else ratio >= target))
        return rows
    if job.kind == "max_tokens":
        search = next((r for r in records if r.get("mode") == "max_tokens_search"), {})
        tokens = 16 if args.tiny else LONG_SEQUENCE_GOAL
        tried = search.get("tried") or [{}]
        status = tried[0].get("status")
        met = None if status in (None, "timeout", "error") else search.get("max_tokens") == tokens
        if memory_cap and memory_cap.startswith("unknown") and not args.tiny:
            met = None  # the whole of a GPU of unknown size: not an H100's memory
        return [dict(goal=f"longest trainable sequence, batch 1, remat block, memory: {memory_cap or '-'}",
                     target=f">= {tokens} tokens", measured=search.get("max_tokens") or status, met=met)]
    summary = next((r for r in records if r.get("kind") == "summary"), {})
    memory = {"device_added": "device, added over the memory in use before the warm-up",
              "device": "device, whole process", "host_run": "host memory, no device stats"}.get(
        summary.get("memory"), "device")
    size = job.tiny_config if args.tiny else job.config
    return [dict(goal=f"chunked decode peak memory at {size} px ({memory}), longest / shortest clip", target="<= 1.2",
                 measured=summary.get("peak_ratio"), met=summary.get("met"))]


def memory_fraction(gpu_mib: int | None, cap_mib: int) -> str | None:
    """``XLA_PYTHON_CLIENT_MEM_FRACTION`` that gives JAX of a larger GPU what it gets of ``cap_mib`` (None: no cap).

    The long-sequence goal is for an H100 (80 GB); on an H200 (141 GB) the allocator is capped
    there, so a length that trains has trained within an H100's memory, not merely been estimated to.
    """
    if not gpu_mib or gpu_mib <= cap_mib:
        return None
    return f"{BENCH_MEM_FRACTION * cap_mib / gpu_mib:.4f}"


def memory_cap_note(args, cap: str | None) -> str:
    """Which memory the long-sequence job ran in, for its goal row (``unknown``: nvidia-smi gave no total)."""
    if cap:
        return f"{args.memory_cap_mib} MiB of the GPU's {args.gpu_mib} (JAX fraction {cap})"
    if args.gpu_mib:
        return f"the whole GPU, {args.gpu_mib} MiB (<= {args.memory_cap_mib}: no cap needed)"
    if args.gpus:
        return f"unknown: nvidia-smi's total did not parse ({args.gpus[0][:60]!r}); no cap was set"
    return "unknown: no nvidia-smi output; no cap was set"


def run_job(job: Job, args, timeout: float, out_dir: Path, log, profile: bool = False) -> dict:
    """Run one job in a subprocess with a hard timeout; its record (status, elapsed, records, goals)."""
    env, cap, note = vidiff_env(), None, None
    if job.kind == "max_tokens":
        cap = memory_fraction(args.gpu_mib, args.memory_cap_mib)
        note = memory_cap_note(args, cap)
        if cap:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = cap
    results_path = out_dir / f".{job.name}.json"  # bench_compare's own report (hidden: not one of the 3 outputs)
    cmd = job_command(job, args, results_path, timeout, profile)
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
    records = None
    if job.kind == "compare" and results_path.exists():  # rewritten after each of its subprocesses
        try:
            records = json.loads(results_path.read_text())["results"]
        except (json.JSONDecodeError, KeyError):  # killed while writing it: the rows it printed stand in
            pass
        results_path.unlink()
    if records is None:
        records = json_lines(stdout)
    return dict(job=job.name, status=status, elapsed_s=round(elapsed, 1), est_s=job.est_s, cmd=shlex.join(cmd),
                **({"mem_fraction": cap} if cap else {}), **({"memory_cap": note} if note else {}),
                records=records, goals=goal_rows(job, records, args, note),
                **({"stderr_tail": stderr.strip().splitlines()[-10:]} if status != "ok" else {}))
