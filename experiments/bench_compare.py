"""vidiff's DiT against the PyTorch peer on the same GPU and shapes: training step and sampling forward.

    PYTHONPATH=. python experiments/bench_compare.py --out compare.json
    PYTHONPATH=. python experiments/bench_compare.py --configs 1x16384 --out compare_16k.json
    python experiments/bench_compare.py --tiny --peer-cmd "python fake.py" --peer-forward-cmd "python fake.py"

Configs (DiT-XL width: d=1152, 16 heads, 28 layers, 128 text tokens, bf16):
``4x4096`` (batch 4 x 4096 tokens), ``64x256`` and ``1x16384``; the last
trains with remat (the peer ``--remat``: whole blocks recomputed; vidiff
``--remat attention`` by default, which recomputes the block but keeps the
flash attention kernel's outputs, ``--vidiff-remat block`` for the peer's
policy; forwards need none). For each config, one after another in fresh
subprocesses (so each owns the whole GPU): ``experiments/bench_dit.py --mode
both`` (vidiff forward, then train), the peer's training script (``--peer``; default
``../shared/bench/torch_dit_reference.py`` from the repo root, else
``shared/bench/`` inside it), and a forward of the peer's own ``Net``
(imported from that file at run time, ``torch.compile``d, run under
``torch.no_grad()`` and bf16 autocast, timed with CUDA events like the
peer's training step; FLOPs = the peer's ``model_flops / 3``).

``--tiny`` runs the same plumbing at CPU sizes; with ``--peer-cmd`` /
``--peer-forward-cmd`` (and ``--vidiff-cmd``) pointing at stand-ins it tests
the wrapper without torch or a GPU.

``--vidiff-update adamw`` times vidiff's step with the peer's optimizer work
(AdamW only: ``bench_dit.py --update adamw``); the default ``full`` is the
step ``vidiff train`` runs (clipping, AdamW, EMA, non-finite guard).

Results are kept as they come: after each subprocess, ``--out`` is rewritten
with every row so far (a row whose other side has not run yet has that side
as ``{"status": "not_run"}``), and each finished (config, mode) row is printed
to stdout as one JSON line. Each subprocess gets ``--timeout`` seconds, or
less: what is left before ``--deadline`` (a ``time.time()`` value shared by
the whole run), so a caller's deadline stops nothing that already finished.
Each side's record carries ``elapsed_s``, the wall time of its whole
subprocess (start-up and compiles included): what a config costs in device
time. A subprocess that fails or times out is recorded with its status and
stderr tail (a timeout's also with the seconds it had); the others still
run, and one with no time left is recorded as
"timeout" without being started. At the end: a table (config, mode, tokens/s
of each, vidiff/peer ratio, MFU, peak memory, whether vidiff used cuDNN
attention).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The peer lives beside the repository (../shared/bench); some checkouts carry shared/ inside it instead.
PEER_CANDIDATES = [root / "shared" / "bench" / "torch_dit_reference.py" for root in (REPO_ROOT.parent, REPO_ROOT)]
DEFAULT_PEER = next((p for p in PEER_CANDIDATES if p.exists()), PEER_CANDIDATES[0])
H100_BF16_DENSE_TFLOPS = 989.0

MODEL = dict(preset="XL", dim=1152, heads=16, layers=28, text=128)
CONFIGS = {
    "4x4096": dict(batch=4, tokens=4096, remat=False),
    "64x256": dict(batch=64, tokens=256, remat=False),
    "1x16384": dict(batch=1, tokens=16384, remat=True),
}
# --tiny: the same plumbing at CPU-sized shapes (smoke tests; the peer is faked there).
TINY_MODEL = dict(preset="tiny", dim=64, heads=4, layers=2, text=8)
TINY_CONFIGS = {
    "2x32": dict(batch=2, tokens=32, remat=False),
    "1x64": dict(batch=1, tokens=64, remat=True),
}


# --------------------------------------------------------------------------- the peer's forward (subprocess)


def torch_forward(peer_path: str, batch: int, tokens: int, text: int, dim: int, heads: int, layers: int,
                  steps: int, warmup: int, compile_model: bool = True) -> dict:
    """Time the peer's ``Net`` forward (sampling: no grad, bf16 autocast), built from the peer's own file."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("torch_dit_reference", peer_path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    device = "cuda"
    net = peer.Net(dim, heads, layers, False).to(device).eval()
    forward = torch.compile(net) if compile_model else net
    x = torch.randn(batch, tokens, dim, device=device)
    c = torch.randn(batch, dim, device=device)
    txt = torch.randn(batch, text, dim, device=device)

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return forward(x, c, txt)

    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    step_s = statistics.median(times)
    flops = peer.model_flops(batch, tokens, text, dim, layers) // 3  # the peer counts x3 for training
    return dict(impl="torch", mode="forward", batch=batch, tokens=tokens, text=text, dim=dim, heads=heads,
                layers=layers, steps=steps, warmup=warmup, compiled=compile_model,
                params_M=sum(p.numel() for p in net.parameters()) / 1e6, step_s=step_s,
                tokens_per_s=batch * tokens / step_s, model_tflops=flops / step_s / 1e12,
                peak_mem_GiB=torch.cuda.max_memory_allocated() / 2**30, torch_version=torch.__version__)


# --------------------------------------------------------------------------- running the benchmarks


def shape_args(model: dict, config: dict) -> list[str]:
    return ["--batch", str(config["batch"]), "--tokens", str(config["tokens"]), "--text", str(model["text"]),
            "--dim", str(model["dim"]), "--heads", str(model["heads"]), "--layers", str(model["layers"])]


def commands(args, model: dict, config: dict) -> dict[str, list[str]]:
    """The three subprocess command lines of one config: vidiff (both modes), peer train, peer forward."""
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    shapes = shape_args(model, config)
    vidiff_prefix = shlex.split(args.vidiff_cmd) if args.vidiff_cmd else [
        sys.executable, str(REPO_ROOT / "experiments" / "bench_dit.py")]
    vidiff = [*vidiff_prefix, *(["--tiny"] if args.tiny else []), "--preset", model["preset"], *shapes, *timing,
              "--mode", "both" if len(args.modes) == 2 else args.modes[0],
              "--remat", args.vidiff_remat if config["remat"] else "none",
              *(["--update", args.vidiff_update] if "train" in args.modes else []),
              "--peak-tflops", str(args.peak_tflops), *shlex.split(args.vidiff_extra)]
    peer_prefix = shlex.split(args.peer_cmd) if args.peer_cmd else [sys.executable, str(args.peer)]
    peer_train = [*peer_prefix, *shapes, *timing, *(["--remat"] if config["remat"] else [])]
    forward_prefix = shlex.split(args.peer_forward_cmd) if args.peer_forward_cmd else [
        sys.executable, str(Path(__file__).resolve()), "--torch-forward", "--peer", str(args.peer)]
    peer_forward = [*forward_prefix, *shapes, *timing]
    return {"vidiff": vidiff, "peer_train": peer_train, "peer_forward": peer_forward}


def json_lines(text: str) -> list[dict]:
    """The JSON records a benchmark printed: its stdout lines that start with '{' and parse."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


MIN_RUN_S = 1.0  # a subprocess is not started with less time than this before the deadline


def time_left(args) -> float:
    """Seconds a subprocess may run: ``--timeout``, or less if the shared ``--deadline`` comes first."""
    if args.deadline is None:
        return args.timeout
    return min(args.timeout, args.deadline - time.time())


def run_json(cmd: list[str], timeout: float, env: dict | None = None) -> list[dict] | dict:
    """Run ``cmd``; its JSON lines (stdout lines starting with '{'), each with the subprocess's ``elapsed_s``, or
    a failure record (a timeout's names the seconds it had and the end of its stderr). A subprocess that printed
    records before it timed out or failed keeps them, with the failure record after them (``pick`` finds a
    mode's record first): a forward measured before the training step was cut, or timings printed before a
    profiler hung, are not lost."""
    if timeout < MIN_RUN_S:
        return dict(status="timeout", cmd=shlex.join(cmd), reason="no time left before the deadline", timeout_s=0.0)
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
        failure = None if returncode == 0 else dict(status="error", returncode=returncode, cmd=shlex.join(cmd))
    except subprocess.TimeoutExpired as expired:  # what it printed before the kill: bytes, whatever text= says
        stdout, stderr = (text.decode(errors="replace") if isinstance(text, bytes) else text or ""
                          for text in (expired.stdout, expired.stderr))
        failure = dict(status="timeout", cmd=shlex.join(cmd), timeout_s=round(timeout, 1))
    elapsed_s = round(time.perf_counter() - start, 3)  # the whole subprocess: start-up, compiles, timed steps
    records = [dict(record, elapsed_s=elapsed_s) for record in json_lines(stdout)]
    if failure is None and records:
        return records
    if failure is None:  # exited 0 without printing a record
        failure = dict(status="error", returncode=0, cmd=shlex.join(cmd))
    tail = 15 if failure["status"] == "error" else 5
    failure.update(elapsed_s=elapsed_s, stderr_tail=stderr.strip().splitlines()[-tail:])
    return records + [failure] if records else failure


def vidiff_env() -> dict:
    """Subprocess environment that imports vidiff from this checkout (it need not be pip-installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def with_mfu(record: dict, peak_tflops: float) -> dict:
    """The peer prints no MFU: add it from its model TFLOP/s, against the same peak as vidiff's."""
    if record.get("model_tflops") is not None and "mfu" not in record:
        record = dict(record, mfu=record["model_tflops"] / peak_tflops)
    return record


def pick(records, impl_mode: str) -> dict:
    """The record of ``mode`` from a subprocess's JSON lines, or its failure record."""
    if isinstance(records, dict):
        return records
    for record in records:
        if record.get("mode", impl_mode) == impl_mode:
            return record
    return dict(status="missing", got=records)


def compare(args) -> dict:
    model, configs = (TINY_MODEL, TINY_CONFIGS) if args.tiny else (MODEL, CONFIGS)
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; valid: {list(configs)}")
    done, report = [], None  # rows of finished configs; the report as last written

    def rows(name: str, cmds: dict, vidiff, peer: dict) -> list[dict]:
        out = []
        for mode in args.modes:
            ours = pick(vidiff, mode) if vidiff is not None else dict(status="not_run")
            theirs = with_mfu(pick(peer[mode], mode), args.peak_tflops) if mode in peer else dict(status="not_run")
            ok = ours.get("status", "ok") == "ok" and theirs.get("status", "ok") == "ok"
            ratio = ours["tokens_per_s"] / theirs["tokens_per_s"] if ok and theirs.get("tokens_per_s") else None
            out.append(dict(config=name, mode=mode, ratio_tokens_per_s=ratio, vidiff=ours, peer=theirs,
                            vidiff_remat=args.vidiff_remat if configs[name]["remat"] else "none",
                            peer_remat="block" if configs[name]["remat"] else "none",
                            vidiff_update=args.vidiff_update if mode == "train" else None,
                            commands={k: shlex.join(v) for k, v in cmds.items()
                                      if k == "vidiff" or k == f"peer_{mode}"}))
            traces = [r for r in vidiff if r.get("of_mode") == mode] if isinstance(vidiff, list) else []
            if traces:  # bench_dit.py --profile's line for this mode (files, or the profiler's error)
                out[-1]["vidiff_profile"] = traces[0]
        return out

    def write(results: list[dict]) -> dict:
        report = dict(model=model, configs={n: configs[n] for n in args.configs}, modes=args.modes,
                      peak_tflops=args.peak_tflops, steps=args.steps, warmup=args.warmup,
                      vidiff_remat=args.vidiff_remat, vidiff_update=args.vidiff_update, results=results)
        if args.out:  # after every subprocess, so a run cut short still leaves what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return report

    for name in args.configs:
        cmds = commands(args, model, configs[name])
        vidiff = run_json(cmds["vidiff"], time_left(args), vidiff_env())
        peer = {}
        report = write(done + rows(name, cmds, vidiff, peer))
        for mode in args.modes:  # only the peer modes compared
            peer[mode] = run_json(cmds[f"peer_{mode}"], time_left(args))
            row = rows(name, cmds, vidiff, peer)[args.modes.index(mode)]
            report = write(done + rows(name, cmds, vidiff, peer))
            print(json.dumps(row), flush=True)  # the row, as soon as both sides ran: a caller may kill us later
            print(f"[{name} {mode}] vidiff {fmt(row['vidiff'].get('tokens_per_s'))} tok/s, peer "
                  f"{fmt(row['peer'].get('tokens_per_s'))} tok/s, ratio {fmt(row['ratio_tokens_per_s'], '.3f')}",
                  file=sys.stderr, flush=True)
        done += rows(name, cmds, vidiff, peer)
    results = done
    print(table(results))
    if args.out:
        print(f"wrote {args.out}")
    return report


def fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    # "queued": vidiff's steps queued back to back (bench_dit's step_s_pipelined), as a training run goes;
    # the ratio is of steps each waited for, as the peer's CUDA events time them.
    head = ["config", "mode", "vidiff tok/s", "peer tok/s", "vidiff/peer", "vidiff queued tok/s", "vidiff MFU",
            "peer MFU", "vidiff GiB", "peer GiB", "cuDNN attn"]
    rows = [head]
    for r in results:
        ours, theirs = r["vidiff"], r["peer"]
        status = lambda rec, key, spec=".4g": fmt(rec.get(key), spec) if rec.get("status", "ok") == "ok" else (
            rec.get("status", "?"))
        rows.append([r["config"], r["mode"], status(ours, "tokens_per_s", ".0f"), status(theirs, "tokens_per_s", ".0f"),
                     fmt(r["ratio_tokens_per_s"], ".3f"), status(ours, "tokens_per_pipelined_s", ".0f"),
                     status(ours, "mfu", ".3f"), status(theirs, "mfu", ".3f"),
                     status(ours, "peak_mem_GiB", ".1f"), status(theirs, "peak_mem_GiB", ".1f"),
                     str(ours.get("cudnn_attention", "-"))])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke test; fake the peer)")
    p.add_argument("--configs", help="comma-separated config names (default: all)")
    p.add_argument("--modes", default="train,forward", help="train and/or forward")
    p.add_argument("--steps", type=int, default=7, help="timed steps (odd: the peer takes the upper median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--peer", default=str(DEFAULT_PEER), help="path of torch_dit_reference.py")
    p.add_argument("--peer-cmd", help="command prefix for the peer's training run (default: python --peer)")
    p.add_argument("--peer-forward-cmd", help="command prefix for the peer forward (default: this file's helper)")
    p.add_argument("--vidiff-cmd", help="command prefix for vidiff's run (default: python experiments/bench_dit.py)")
    p.add_argument("--vidiff-extra", default="", help="extra bench_dit.py flags, e.g. '--scan'")
    # vidiff.models.remat.REMAT_POLICIES that recompute blocks (this file imports no jax).
    p.add_argument("--vidiff-remat", default="attention", choices=("block", "attention", "dots"),
                   help="vidiff's remat policy where a config trains with remat (default attention)")
    p.add_argument("--vidiff-update", default="full", choices=("full", "adamw"),
                   help="vidiff's training update: full (vidiff train's) or adamw (the peer's work: AdamW only)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess at most")
    p.add_argument("--deadline", type=float,
                   help="time.time() by which every subprocess must end (each gets what is left of it)")
    p.add_argument("--out", help="write all results to this JSON file")
    # Internal: the peer-forward helper subprocess.
    p.add_argument("--torch-forward", action="store_true", help=argparse.SUPPRESS)
    for name in ("batch", "tokens", "text", "dim", "heads", "layers"):
        p.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in ("train", "forward") for m in args.modes):
        raise SystemExit(f"--modes: use train and/or forward, got {args.modes}")
    all_configs = TINY_CONFIGS if args.tiny else CONFIGS
    args.configs = [c for c in (args.configs.split(",") if args.configs else all_configs) if c]
    if not args.configs:
        raise SystemExit(f"--configs: name at least one of {list(all_configs)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.torch_forward:
        shapes = {k: getattr(args, k) for k in ("batch", "tokens", "text", "dim", "heads", "layers")}
        missing = [k for k, v in shapes.items() if v is None]
        if missing:
            raise SystemExit(f"--torch-forward needs --{' --'.join(missing)}")
        record = torch_forward(args.peer, **shapes, steps=args.steps, warmup=args.warmup,
                               compile_model=not args.no_compile)
        print(json.dumps(record), flush=True)
        return
    compare(args)


if __name__ == "__main__":
    main()
