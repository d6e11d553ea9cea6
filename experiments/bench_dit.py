"""Throughput of vidiff's DiT training step and sampling forward, counted like the PyTorch peer.

    PYTHONPATH=. python experiments/bench_dit.py --preset XL --batch 4 --tokens 4096 --text 128 --mode both
    PYTHONPATH=. python experiments/bench_dit.py --preset XL --batch 1 --tokens 16384 --remat block --mode train
    PYTHONPATH=. python experiments/bench_dit.py --tiny                       # CPU smoke run (tiny preset, float32)

Training times the step ``vidiff train`` runs: ``make_train_step`` over a loss
that wraps ``vidiff.train.dit_loss.dit_flow_loss`` (rectified flow, logit-normal
timesteps, token-count shift), AdamW with clipping and the EMA, built with
``create_state`` and ``jit_train_step`` on a ``vidiff.parallel.make_mesh``
mesh, state donated (``--update full``, the default). ``--update adamw``
times the same step with the peer's optimizer work instead: AdamW alone (no
clipping, no EMA update, no non-finite guard), as the peer's fused AdamW; the
EMA copy still sits in memory, untouched. Inputs are random normalised
latents and random text embeddings (every text token valid, passed as
lengths as the trainer does; ``bench_dit_inputs.py`` builds them, the config and the mesh).
The forward times one jitted ``VideoDiT.apply`` (no gradient) at the same
shapes, float32 parameters and the compute ``--dtype``, as sampling runs it.

Token count -> latent shape: ``vidiff.models.patches.latent_shape_for_tokens``
(square frames, their count the divisor nearest the cube root of the tokens;
4096 -> latents 16x32x32 with patch 1,2,2), or ``--latent-shape t,h,w``.

Timing (experiments/PERF.md, "Method"): AOT compilation, ``--warmup`` untimed
steps, then ``--steps`` steps each waited for on one output; the median is
``step_s``, the per-step rate the peer's CUDA events measure.
``step_s_pipelined``: ``--steps`` more steps queued back to back, a training
loop's rate, with the run's start and final wait spread over them;
``step_s_steady``: the same rate with those cancelled (a run of twice as many
steps, less the first: ``measure.queued_step_s``); null for waited steps over
``STEADY_MAX_STEP_S``, where the fixed costs (tens of ms) do not matter and
the run would cost minutes (``bench_max_tokens.py``'s 30 s steps), and where
the longer run came out no slower (``--steps`` steps too short for the timer's
noise, as ``--tiny`` ones can be: raise ``--steps``). ``dispatch_s``: the median
time a timed call took to return (the host's argument checks and launch,
``bench_dispatch.py``; on a GPU part of it can overlap the device's work: the
device's idle share of ``step_s`` is ``step_s - step_s_steady`` when the
queued steps keep it busy).
Model FLOPs are the peer's (``vidiff.models.dit.dit_flops``, recomputation not
counted); MFU is against ``--peak-tflops`` per device (989: H100 SXM dense bf16).

Prints one JSON line per mode (``--mode both`` runs the forward first, so its
peak memory is its own): status ("ok" | "oom"), the shapes and config,
params_M, init_s (parameters or train state built), init_on ("host": built by
the host's CPU and copied over; ``--init-on auto`` picks it where
``vidiff.train.state.host_init_pays``, as ``vidiff train`` does),
compile_s, compile_cached (null without ``JAX_COMPILATION_CACHE_DIR``; true: the
program was loaded from that cache, so compile_s is a load), step_s (min, max,
pipelined, steady), tokens_per_s, model_tflops, mfu,
process_s (seconds since the process started), peak_mem_GiB (the process's
``peak_bytes_in_use``; null on CPU), compiled_mem_GiB (XLA's estimate),
cudnn_attention and cudnn_attention_kernels (forward and backward
``__cudnn$fmha`` calls in the compiled HLO: remat adds forward ones only
under ``block``), update (train). ``--profile DIR`` then traces
``--profile-steps`` more steps (each waited for, or with ``--profile-queued``
back to back) and prints a mode="profile" line: the trace files copied flat
into DIR, those over a device call's 15 MiB left_behind, and one step's GPU
kernel time by kind with the calls' host side (``trace_summary.py``); the
timing record comes first, so a profiler failure costs no measurement.
``bench_max_tokens.py`` runs it at growing lengths to find the longest that
trains.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types

PROCESS_START = time.perf_counter()
# JAX preallocates 75% of GPU memory by default; PyTorch may use all of it. Let vidiff have the same
# room (set before jax initialises a backend; an explicit setting in the environment wins).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ablations  # noqa: E402
from measure import (compiled_memory_gib, cudnn_attention_kernels, dump_hlo, is_oom, peak_memory_gib,  # noqa: E402
                     profiled_runs, queued_run, queued_step_s, timed_compile, timed_runs,
                     waited_run)  # (experiments/ is the script's own folder)
from bench_dit_inputs import (count_params, param_init, param_shapes, parse_ints, put_batch,  # noqa: E402
                              random_batch, shapes_and_mesh, where_built)
from vidiff import parallel  # noqa: E402
from vidiff.diffusion import shift_for_tokens  # noqa: E402
from vidiff.models.dit import REMAT_POLICIES, DiTConfig, VideoDiT, dit_flops  # noqa: E402
from vidiff.train.optimizer import make_optimizer  # noqa: E402
from vidiff.train.state import INIT_ON, build_sharded, create_state, jit_train_step, make_train_step  # noqa: E402
from vidiff.train.dit_loss import dit_flow_loss  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
# Defaults of the full run and of --tiny (a CPU smoke test); explicit flags win.
DEFAULTS = dict(preset="XL", batch=4, tokens=4096, text=128, text_dim=4096, latent_channels=16, dtype="bfloat16",
                remat="none", steps=8, warmup=3)
TINY_DEFAULTS = dict(preset="tiny", batch=2, tokens=32, text=8, text_dim=32, latent_channels=4, dtype="float32",
                     remat="none", steps=2, warmup=1)
STEADY_MAX_STEP_S = 1.0  # waited steps longer than this get no step_s_steady run (see the docstring)
# Optimizer as the experiment configs set it (AdamW, clipping); constant LR so every timed step is alike.
OPTIM = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, b1=0.9, b2=0.999,
                              eps=1e-8, weight_decay=0.01, grad_clip=1.0, accumulate=1)
FLOW = types.SimpleNamespace(timestep_sampler="logit_normal", weighting="none")
EMA_DECAY = 0.9999
UPDATES = ("full", "adamw")  # vidiff train's update; the peer's (AdamW only)


# --------------------------------------------------------------------------- records


def summary(args, cfg: DiTConfig, mode: str, latent_shape, tokens: int, params: int, times: list[float],
            init_s: float, compile_s: float, compile_cached: bool | None, compiled, queued: dict[str, float],
            host_s: list[float]) -> dict:
    step_s = statistics.median(times)
    flops = dit_flops(cfg, tokens, args.text, batch=args.batch, training=mode == "train")
    hlo_text = compiled.as_text()  # an unscanned XL step's is ~19 MB: printed once, read twice
    kernels = cudnn_attention_kernels(hlo_text)
    devices = jax.device_count()
    return dict(
        base_record(args, cfg, mode, latent_shape, tokens), status="ok",
        params_M=params / 1e6, init_s=init_s, compile_s=compile_s, compile_cached=compile_cached, step_s=step_s,
        step_s_min=min(times),
        step_s_max=max(times), **queued, tokens_per_pipelined_s=args.batch * tokens / queued["step_s_pipelined"],
        dispatch_s=statistics.median(host_s[-len(times):]),  # the timed steps' (warm-up calls excluded)
        tokens_per_s=args.batch * tokens / step_s, model_tflops=flops / step_s / 1e12,
        peak_tflops=args.peak_tflops, mfu=flops / step_s / 1e12 / (args.peak_tflops * devices),
        peak_mem_GiB=peak_memory_gib(), compiled_mem_GiB=compiled_memory_gib(compiled),
        cudnn_attention=kernels["forward"] > 0, cudnn_attention_kernels=kernels,
        process_s=time.perf_counter() - PROCESS_START,
        hlo=dump_hlo(args.dump_hlo, f"{mode}_{args.batch}x{tokens}", hlo_text),
    )


def base_record(args, cfg: DiTConfig, mode: str, latent_shape, tokens: int) -> dict:
    return dict(
        impl="vidiff", mode=mode, preset=args.preset, batch=args.batch, tokens=tokens, text=args.text,
        dim=cfg.width, heads=cfg.heads, layers=cfg.depth, mlp_ratio=cfg.mlp_ratio, text_dim=cfg.text_dim,
        latent_shape=list(latent_shape), latent_channels=cfg.latent_channels, patch=list(cfg.patch),
        remat=cfg.remat_policy, scan=cfg.scan_blocks, scan_unroll=cfg.scan_unroll, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        attention=args.attention,
        attention_head_pad=cfg.attention_head_pad, fused_qk_rope=cfg.fused_qk_rope, init_on=args.init_on,
        mesh=list(args.mesh_sizes), steps=args.steps, warmup=args.warmup, ablate=args.ablate,
        backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, devices=jax.device_count(),
        jax_version=jax.__version__,
    )


def adamw_only_step(loss_fn, tx):
    """The step with the peer's optimizer work: gradients, then AdamW. No clipping (``tx`` is built with
    ``grad_clip=0``), no EMA update, no non-finite guard, no gradient norm (``make_train_step`` has all four)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch, frozen):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = grad_fn(state.params, batch, rng, frozen, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {**metrics, "loss": loss}

    return step


def tracer(mesh, run, dispatch, args, name: str, compiled):
    """A call that traces ``--profile-steps`` steps under the benchmark's mesh (run after the timing record is
    printed): each waited for, as ``run`` does, or with ``--profile-queued`` queued back to back from
    ``dispatch``, as ``vidiff train`` runs them."""
    def trace():
        with jax.set_mesh(mesh), parallel.axis_rules():
            if args.profile_queued:
                return profiled_runs(queued_run(dispatch, args.profile_steps), 1, args.profile, name,
                                     hlo_text=compiled.as_text(), steps_per_run=args.profile_steps)
            return profiled_runs(run, args.profile_steps, args.profile, name, hlo_text=compiled.as_text())
    return trace


def bench_train(args, cfg: DiTConfig, mesh, latent_shape, tokens: int):
    dit = VideoDiT(cfg)
    shift = shift_for_tokens(tokens)

    def loss_fn(params, batch, rng, frozen, step):
        return dit_flow_loss(dit, params, batch["latents"], batch, rng, FLOW, shift)

    optim = OPTIM if args.update == "full" else types.SimpleNamespace(**{**vars(OPTIM), "grad_clip": 0.0})
    tx, _ = make_optimizer(optim, total_steps=args.warmup + args.steps)
    init_on = where_built(args, cfg)  # decided once, as bench_forward does: auto traces the init to decide
    start = time.perf_counter()
    state, state_shardings = jax.block_until_ready(create_state(param_init(cfg), tx, args.seed, mesh,
                                                                on_host=init_on == "host"))
    init_s = time.perf_counter() - start
    params = count_params(state.params)
    batch, batch_shardings = put_batch(random_batch(cfg, args.batch, latent_shape, args.text, args.seed), mesh)
    frozen = {}
    step = make_train_step(loss_fn, tx, ema_decay=EMA_DECAY) if args.update == "full" else adamw_only_step(loss_fn,
                                                                                                         tx)
    step_fn = jit_train_step(step, state_shardings, batch_shardings, {}, mesh)
    with jax.set_mesh(mesh), parallel.axis_rules():  # as the trainer's loop traces its step
        compiled, compile_s, cached = timed_compile(step_fn, state, batch, frozen)
        holder = {"state": state}
        del state  # donated on every call: only the holder may keep the live state

        def dispatch():
            holder["state"], holder["metrics"] = compiled(holder["state"], batch, frozen)
            return holder["metrics"]["loss"]

        host_s = []  # one execution's outputs are all ready together: waiting on the loss waits for the state
        run = waited_run(dispatch, host_s)
        times = timed_runs(run, args.warmup, args.steps)
        queued = queued_step_s(dispatch, args.steps, steady=statistics.median(times) <= STEADY_MAX_STEP_S)
    loss = float(holder["metrics"]["loss"])
    if not math.isfinite(loss):
        raise RuntimeError(f"training loss is not finite ({loss}); the timings would not be of a real step")
    record = dict(summary(args, cfg, "train", latent_shape, tokens, params, times, init_s, compile_s, cached,
                          compiled, queued, host_s), init_on=init_on, update=args.update)
    return record, tracer(mesh, run, dispatch, args, f"train_{args.batch}x{tokens}", compiled)


def bench_forward(args, cfg: DiTConfig, mesh, latent_shape, tokens: int):
    dit = VideoDiT(cfg)
    init = param_init(cfg)
    key = jax.random.key(args.seed)
    shapes = param_shapes(cfg)
    init_on = where_built(args, cfg)
    shardings = parallel.param_shardings(shapes, mesh)
    start = time.perf_counter()
    params = jax.block_until_ready(build_sharded(init, key, shardings, mesh, on_host=init_on == "host"))
    init_s = time.perf_counter() - start
    host = random_batch(cfg, args.batch, latent_shape, args.text, args.seed)
    host["t"] = np.random.default_rng(args.seed + 1).uniform(size=(args.batch,)).astype(np.float32)
    batch, batch_shardings = put_batch(host, mesh)

    def velocity(params, batch):
        return dit.apply({"params": params}, batch["latents"], batch["t"], batch["text_tokens"],
                         batch["text_lengths"], batch["pooled"])

    forward = jax.jit(velocity, in_shardings=(shardings, batch_shardings),
                      out_shardings=parallel.batch_sharding(mesh, 5))
    with jax.set_mesh(mesh), parallel.axis_rules():
        compiled, compile_s, cached = timed_compile(forward, params, batch)
        dispatch = lambda: compiled(params, batch)
        host_s = []
        run = waited_run(dispatch, host_s)
        times = timed_runs(run, args.warmup, args.steps)
        queued = queued_step_s(dispatch, args.steps, steady=statistics.median(times) <= STEADY_MAX_STEP_S)
    # run_modes drops the tracer (the last reference to the parameters), so --mode both trains with the memory free.
    return (dict(summary(args, cfg, "forward", latent_shape, tokens, count_params(params), times, init_s, compile_s,
                         cached, compiled, queued, host_s), init_on=init_on),
            tracer(mesh, run, dispatch, args, f"forward_{args.batch}x{tokens}", compiled))


def run_modes(args) -> list[dict]:
    try:  # a flag the model, the shapes or the mesh cannot take is one line, before anything compiles
        cfg, mesh, latent_shape, tokens = shapes_and_mesh(args)
    except ValueError as error:
        raise SystemExit(f"bench_dit.py: {error}") from None
    benches = {"forward": bench_forward, "train": bench_train}
    modes = ["forward", "train"] if args.mode == "both" else [args.mode]
    records = []
    for mode in modes:
        trace = None
        try:
            with ablations.ablated(args.ablate):  # (none unless --ablate: a diagnosis, not vidiff's model)
                record, trace = benches[mode](args, cfg, mesh, latent_shape, tokens)
        except Exception as error:  # an OOM is a result (the shape does not fit), anything else a bug
            if not is_oom(error):
                raise
            record = dict(base_record(args, cfg, mode, latent_shape, tokens), status="oom",
                          init_on=where_built(args, cfg),
                          error=str(error).strip().splitlines()[0][:300], peak_mem_GiB=peak_memory_gib())
        print(json.dumps(record), flush=True)  # before any tracing: a profiler failure cannot lose it
        records.append(record)
        if trace is not None and args.profile and args.profile_steps > 0:
            records.append(profile_record(args, mode, tokens, trace))
        del trace
    return records


def profile_record(args, mode: str, tokens: int, trace) -> dict:
    """Trace more steps of ``mode``; a line of its own, with the error if the profiler failed."""
    record = dict(impl="vidiff", mode="profile", of_mode=mode, batch=args.batch, tokens=tokens,
                  steps=args.profile_steps, queued=args.profile_queued, dir=args.profile)
    try:
        files, left, kernels = trace()
        record.update(status="ok", files=files, left_behind=left, kernels=kernels)
    except Exception as error:  # a trace is a diagnosis, not a result: report it and carry on
        lines = str(error).strip().splitlines() or [""]
        record.update(status="error", files=[], error=f"{type(error).__name__}: {lines[0]}"[:300])
    print(json.dumps(record), flush=True)
    return record


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny preset and shapes, float32 (CPU smoke run)")
    p.add_argument("--mode", choices=("train", "forward", "both"), default="train")
    p.add_argument("--preset", help="DiT preset (tiny, small, B, L, XL, 1.5B); default XL")
    p.add_argument("--dim", type=int, help="model width override")
    p.add_argument("--heads", type=int, help="attention heads override")
    p.add_argument("--layers", type=int, help="depth override")
    p.add_argument("--batch", type=int)
    p.add_argument("--tokens", type=int, help="video tokens per sample (latent shape chosen from it)")
    p.add_argument("--latent-shape", help="latent t,h,w (overrides --tokens)")
    p.add_argument("--text", type=int, help="text tokens per sample (default 128)")
    p.add_argument("--text-dim", type=int, help="text-encoder feature size (default 4096, T5-XXL)")
    p.add_argument("--latent-channels", type=int, help="latent channels (default 16, the base VAE's)")
    p.add_argument("--remat", choices=tuple(REMAT_POLICIES), help="default none")
    p.add_argument("--scan", action="store_true", help="nn.scan over the blocks")
    p.add_argument("--scan-unroll", type=int, default=1,
                   help="DiTConfig.scan_unroll (implies --scan): blocks per loop iteration; the depth unrolls it "
                        "whole: stacked weights (few arrays per call), straight-line program")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="DiTConfig.param_dtype: bfloat16 stores the weights as the compute reads them (a forward: "
                        "sampling with bf16 weights, PERF.md row 6; train: bf16 master weights, not vidiff's)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="auto: cuDNN flash attention on GPU for bf16/fp16, XLA otherwise")
    p.add_argument("--init-on", choices=tuple(INIT_ON), default="auto",
                   help="where parameters and train state are built (create_state(on_host=...)); auto: as "
                        "vidiff train's init_on (vidiff.train.state.host_init_pays): the host's CPU for >= 64 "
                        "random draws to compile (the DiT: 16, it initialises scanned) on accelerators of one "
                        "process, else the devices")
    p.add_argument("--pad-head-dim", type=int, default=0,
                   help="DiTConfig.attention_head_pad: heads zero-padded to this size for the kernel (0: off)")
    p.add_argument("--fused-qk-rope", action="store_true",
                   help="DiTConfig.fused_qk_rope: q/k norms and RoPE in one pass with its own backward (PERF.md 14)")
    p.add_argument("--mesh", default="-1,1,1,1", help="mesh sizes data,fsdp,tensor,context (one may be -1)")
    p.add_argument("--steps", type=int, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="per-device peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--update", choices=UPDATES, default="full",
                   help="train: full = vidiff train's (clip, AdamW, EMA, guard); adamw = the peer's (AdamW only)")
    p.add_argument("--ablate", default="", help="comma-separated work to leave out, a diagnosis: rope, text-mask "
                                                "(experiments/ablations.py)")
    p.add_argument("--profile", metavar="DIR",
                   help="after the timing record, trace --profile-steps more steps into DIR (own JSON line)")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--profile-queued", action="store_true",
                   help="trace the --profile-steps steps queued back to back (as vidiff train runs them), not each "
                        "waited for: the trace's host section then shows the GPU's idle time between steps")
    p.add_argument("--dump-hlo", metavar="DIR", help="write each mode's optimised HLO to DIR/<mode>_<B>x<T>.hlo.txt.gz")
    args = p.parse_args(argv)
    for name, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ablate = [name for name in args.ablate.split(",") if name]
    try:
        args.mesh_sizes = parse_ints(args.mesh, 4, "--mesh")
        ablations.check(args.ablate)
    except ValueError as error:
        p.error(str(error))
    if args.fused_qk_rope and "rope" in args.ablate:
        p.error("--ablate rope takes out the unfused RoPE, which --fused-qk-rope does not run; drop one of the two")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    for flag, value in (("--tokens", args.tokens), ("--batch", args.batch)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    run_modes(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
