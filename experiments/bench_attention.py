"""Attention kernels alone: forward and forward + backward time of each ``attention_impl``.

    PYTHONPATH=. python experiments/bench_attention.py --impls xla,chunked --tokens 2048 --heads 4   # CPU, ~1 min
    PYTHONPATH=. python3 experiments/bench_attention.py --impls cudnn,xla,chunked --tokens 4096,16384 --batch 1
                                                                                          # GPU, bf16 by default
    XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. python experiments/bench_attention.py \
        --impls ring,ulysses --context 4 --tokens 4096 --heads 4 --head-dim 64        # context parallel, 4 CPU devices

Times ``vidiff.models.attention.attention`` (the one entry point the DiT calls) on
random ``(batch, tokens, heads, head_dim)`` q, k, v; ``train`` is the value and
gradient of a sum of the output (what a training step asks of the kernel). Each
prints one JSON line per impl, mode and length: median ms of ``--steps`` after
``--warmup``, and attention TFLOP/s counted as ``bench_dit.py`` and the peer count
the attention term (``4 T^2 d`` per sample forward, x3 for training; no masked or
recomputed work counted). ``chunked`` is the local form of ring attention's
online softmax with its flash VJP: on one device it prices what ring attention
computes per block. ``--context N`` runs on a ``context = N`` mesh with q, k, v
split along the tokens, as the DiT's residual stream is, so ``ring`` and
``ulysses`` really split the work (virtual CPU devices share the cores: their
times are the total work, not a multi-device speed-up). A length an impl
cannot fit prints ``status: oom``.

``--pad-head-dim 80,96,128`` also times each impl with its heads zero-padded to
each size (``attention(pad_head_dim=...)``, ``xla`` and ``cudnn``: same
result, FLOPs still counted at the true head dim), to find a size the flash
kernel runs faster at than the one it picks for 72. ``--impls torch`` times
the peer's kernel, PyTorch SDPA in bf16 on the same shapes (GPU image only;
PyTorch is no vidiff dependency).
"""
from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import measure
from vidiff import parallel
from vidiff.models import attention
from vidiff.models import context_attention  # noqa: F401  (registers "chunked", "ring" and "ulysses")


def attention_flops(batch: int, tokens: int, heads: int, head_dim: int, training: bool) -> float:
    """Scores and values of full (unmasked) self-attention: ``2 T^2 d`` multiply-adds per sample and pass."""
    return 4.0 * batch * tokens**2 * heads * head_dim * (3 if training else 1)


def compiled_call(impl: str, mode: str, q, mesh, pad_head_dim: int | None = None):
    """A jitted, blocking call of ``impl`` in ``mode`` ('forward' or 'train') on q = k = v shapes, under ``mesh``
    with the tokens split over its ``context`` axis."""
    def forward(q, k, v):
        return attention.attention(q, k, v, implementation=impl, pad_head_dim=pad_head_dim)

    def train(q, k, v):
        loss = lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    fn = jax.jit(forward if mode == "forward" else train)
    keys = jax.random.split(jax.random.key(0), 3)
    tokens_split = NamedSharding(mesh, PartitionSpec(None, "context"))
    q, k, v = (jax.device_put(jax.random.normal(key, q.shape, q.dtype), tokens_split) for key in keys)
    with jax.set_mesh(mesh), parallel.axis_rules():
        compiled = fn.lower(q, k, v).compile()
    return lambda: jax.block_until_ready(compiled(q, k, v))


def torch_call(mode: str, shape: tuple[int, ...]):
    """The peer's kernel: ``torch.nn.functional.scaled_dot_product_attention`` in bf16 on CUDA, on heads laid
    out as the peer's ``Block.heads`` makes them (a transposed view of ``(B, T, H, D)``)."""
    import torch  # the peer's framework, on the GPU image only
    import torch.nn.functional as F

    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_(mode == "train")
               for _ in range(3))

    def run():
        out = F.scaled_dot_product_attention(q, k, v)
        if mode == "train":
            out.float().sum().backward()
        torch.cuda.synchronize()
    return run


def run_case(impl: str, mode: str, batch: int, tokens: int, args, pad_head_dim: int | None = None) -> dict:
    record = dict(impl=impl, mode=mode, batch=batch, tokens=tokens, heads=args.heads, head_dim=args.head_dim,
                  pad_head_dim=pad_head_dim, dtype=args.dtype, context=args.context,
                  device=jax.devices()[0].device_kind)
    q = jax.ShapeDtypeStruct((batch, tokens, args.heads, args.head_dim), jnp.dtype(args.dtype))
    try:
        if impl == "torch":
            run = torch_call(mode, q.shape)
        else:
            run = compiled_call(impl, mode, q, args.mesh, pad_head_dim)
        times = measure.timed_runs(run, args.warmup, args.steps)
    except Exception as error:  # noqa: BLE001 (an out-of-memory length is a result; anything else is raised)
        if not measure.is_oom(error):
            raise
        return {**record, "status": "oom", "error": measure.last_exception_line(str(error))}
    step = statistics.median(times)
    flops = attention_flops(batch, tokens, args.heads, args.head_dim, mode == "train")
    significant = lambda x: float(f"{x:.4g}")  # noqa: E731 (tiny CPU cases are fractions of a ms and a TFLOP/s)
    return {**record, "status": "ok", "ms": significant(step * 1e3), "min_ms": significant(min(times) * 1e3),
            "tflops": significant(flops / step / 1e12)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="xla,chunked", help="comma-separated attention_impl names")
    parser.add_argument("--modes", default="forward,train")
    parser.add_argument("--tokens", default="1024", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72, help="72: DiT-XL's (1152 / 16)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                        help="default: bfloat16 on GPU, float32 elsewhere")
    parser.add_argument("--context", type=int, default=1, help="devices the tokens are split over (mesh.context)")
    parser.add_argument("--pad-head-dim", default="", help="comma-separated sizes to also time each impl's heads "
                                                           "zero-padded to (xla and cudnn)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    try:  # before the mesh: a malformed list is one line, and no backend starts for it
        lengths = measure.parse_list(args.tokens, int, flag="--tokens")
        pads = measure.parse_list(args.pad_head_dim, int, flag="--pad-head-dim") if args.pad_head_dim else []
    except ValueError as error:
        parser.error(str(error))
    if min(lengths) < 1:
        parser.error(f"--tokens: lengths must be >= 1, got {lengths}")
    args.dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    try:
        args.mesh = parallel.make_mesh(data=1, context=args.context, devices=jax.devices()[:args.context])
    except ValueError as error:
        raise SystemExit(f"--context={args.context}: {error}; on a CPU, set XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={args.context}") from None
    if any(size < args.head_dim for size in pads):
        raise SystemExit(f"--pad-head-dim: every size must be >= --head-dim {args.head_dim}, got {pads}")
    impls = args.impls.split(",")
    for impl in impls:  # a bad name fails before anything compiles
        if impl == "torch":
            check_torch_cuda()
            continue
        try:
            attention.resolve_attention_impl(impl, jnp.dtype(args.dtype), args.head_dim)
        except ValueError as error:
            raise SystemExit(f"--impls: {error}") from None
    for mode in args.modes.split(","):
        if mode not in ("forward", "train"):
            raise SystemExit(f"--modes: {mode!r} is not forward or train")
    records = []
    for tokens in lengths:
        for impl in impls:
            for pad in [None] + (pads if impl in ("xla", "cudnn") else []):
                for mode in args.modes.split(","):
                    records.append(run_case(impl, mode, args.batch, tokens, args, pad))
                    print(json.dumps(records[-1]), flush=True)
    return records


def check_torch_cuda() -> None:
    try:
        import torch
    except ImportError as error:
        raise SystemExit(f"--impls torch: PyTorch is not installed here ({error}); it runs on the GPU image, "
                         f"beside the peer") from None
    if not torch.cuda.is_available():
        raise SystemExit("--impls torch: PyTorch sees no CUDA device; the peer's SDPA kernel needs one")


if __name__ == "__main__":
    main()
