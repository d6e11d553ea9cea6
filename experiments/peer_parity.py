"""Same work as the peer: vidiff's DiT block against the PyTorch peer's ``Block``, run side by side in float32.

    PYTHONPATH=. python experiments/peer_parity.py                                   # tiny shapes, CPU
    PYTHONPATH=. python experiments/peer_parity.py --dim 1152 --heads 16 --layers 2 --tokens 256 --text 32

Builds one vidiff ``DiTBlock`` and the stack of ``--layers`` blocks as ``bench_dit.py`` runs them
(``VideoDiT``'s own unscanned blocks), draws every parameter at random (zero-initialised gates and
output projections would hide a wrong mapping), copies them into the peer's ``Block`` and ``Net``
(``../shared/bench/torch_dit_reference.py``, imported from its path; ``PEER_LINEARS`` and
``PEER_NORMS`` are the mapping) and runs both on the same ``x``, conditioning vector ``c`` and text
tokens, with vidiff's extras the peer lacks switched off: no RoPE, no text mask or lengths, one clip per
row. The peer's norms use torch's default epsilons (``PEER_LAYER_NORM_EPS``, ``PEER_RMS_EPS``), vidiff's
1e-6: the differences are reported as vidiff runs (``as_is``) and with vidiff's epsilons set to the
peer's (``eps_matched``), where only float32 rounding is left. Gradients are of ``sum(out * r)`` for a
random ``r``, with respect to ``x``, ``c``, the text and every parameter (the peer's mapped back).

It also reports ``peer_work.py``'s counts: ``bench_dit.py``'s model FLOPs against the peer's
``model_flops`` at the goal shapes (both called), every structural difference of the timed steps with the
work it adds (at ``bench_dit.py``'s XL 4 x 4096 shapes unless the flags say otherwise), and with
``--xla-count`` that list against XLA's own count of the vidiff step.
Prints one JSON line. Torch is imported only by ``main`` (``tests/`` run without it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import bench_dit  # noqa: E402  (experiments/ is the script's own folder)
from bench_dit_inputs import build_config
from peer_work import differences, flops_check, xla_count
from vidiff.models import attention, dit, layers
from vidiff.models.dit import DiTBlock, VideoDiT, dit_flops, dit_preset, init_params
from vidiff.models.patches import latent_shape_for_tokens

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_CANDIDATES = [root / "shared" / "bench" / "torch_dit_reference.py" for root in (REPO_ROOT.parent, REPO_ROOT)]
DEFAULT_PEER = next((p for p in PEER_CANDIDATES if p.exists()), PEER_CANDIDATES[0])

# torch's defaults, which the peer keeps: F.layer_norm's eps, and F.rms_norm(eps=None)'s machine epsilon of
# the input's dtype (float32 here; bfloat16's is 7.8e-3, if the peer's q/k norms run in bf16 under autocast).
PEER_LAYER_NORM_EPS = 1e-5
PEER_RMS_EPS = float(np.finfo(np.float32).eps)

# The peer's Linear <- vidiff's kernels, concatenated along the peer's output axis in this order. A vidiff
# head projection (embed, heads, head_dim) flattens head-major, as the peer's view(B, N, heads, -1) splits;
# the adaLN vector's six chunks are in the same order on both sides (shift, scale, gate of attention, then
# of the MLP), so "mod" needs no permutation. torch stores a Linear's weight as (out, in): transposed.
PEER_LINEARS = {
    "mod": (("modulation", "proj"),),
    "qkv": (("self_attn", "query"), ("self_attn", "key"), ("self_attn", "value")),
    "proj": (("self_attn", "out"),),
    "cq": (("cross_attn", "query"),),
    "ckv": (("cross_attn", "key"), ("cross_attn", "value")),
    "cproj": (("cross_attn", "out"),),
    "fc1": (("mlp", "fc1"),),
    "fc2": (("mlp", "fc2"),),
}
# Without RoPE the logits see only the product of a q and a k norm's scales, so swapping the two would pass
# every check here unseen; the names pin them (RoPE between scale and product breaks the symmetry in vidiff).
PEER_NORMS = {"qn.w": ("self_attn", "query_norm"), "kn.w": ("self_attn", "key_norm"),
              "cqn.w": ("cross_attn", "query_norm"), "ckn.w": ("cross_attn", "key_norm")}

# What the numbers below prove the same on both sides (a wrong one shows as an O(1) difference).
SAME = ["adaLN-Zero: 6 vectors from one Linear of silu(c), order shift/scale/gate (attention), then (MLP)",
        "LayerNorm without affine parameters before self-attention, cross-attention and the MLP",
        "self-attention: q, k, v with biases, per-head RMS qk-norm with a learned scale, scale head_dim^-0.5, "
        "output projection with bias, gated by the attention gate",
        "cross-attention: query from the LayerNorm of x (not modulated), key and value from the text, per-head "
        "RMS qk-norm, output projection with bias, ungated", "MLP: Linear, GELU (tanh), Linear, gated",
        "residual stream in float32 on both sides (the peer's bf16 branch outputs add into its float32 x)"]


def peer_eps_rms_norm():
    class PeerEpsRMSNorm(layers.RMSNorm):
        eps: float = PEER_RMS_EPS
    return PeerEpsRMSNorm


@contextlib.contextmanager
def peer_eps():
    """vidiff's block with the peer's norm epsilons (module globals patched for the block's duration)."""
    with mock.patch.object(dit, "layer_norm", functools.partial(layers.layer_norm, eps=PEER_LAYER_NORM_EPS)), \
            mock.patch.object(attention, "RMSNorm", peer_eps_rms_norm()):
        yield


# --------------------------------------------------------------------------- parameters and their mapping


def block_config(dim: int, heads: int, layers_: int, text_dim: int):
    """A float32 vidiff config of the peer's geometry (MLP ratio 4, cross-attention, XLA attention)."""
    return dit_preset("tiny", width=dim, heads=heads, depth=layers_, text_dim=text_dim, pooled_dim=text_dim,
                      attention_impl="xla", dtype="float32")


def random_params(cfg, seed: int) -> dict:
    """The DiT's parameters (unscanned, as bench_dit.py runs them) with every leaf drawn anew: kernels
    ~N(0, 1/fan_in), biases ~N(0, 0.2^2), norm scales ~1 + N(0, 0.2^2). Init's zeros would hide the gates'
    and output projections' mapping, and its ones the norms'."""
    params = nn.meta.unbox(init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "scale":
            return 1 + 0.2 * rng.standard_normal(leaf.shape, np.float32)
        if names[-1] == "bias":
            return 0.2 * rng.standard_normal(leaf.shape, np.float32)
        fan_in = math.prod(leaf.shape[:-1]) if names[-2] == "out" else leaf.shape[0]
        return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, params)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _as_matrix(module: str, kernel):
    """A vidiff kernel as (in, out): head projections flatten their (heads, head_dim) axes head-major."""
    kernel = np.asarray(kernel)
    return kernel.reshape(-1, kernel.shape[-1]) if module == "out" else kernel.reshape(kernel.shape[0], -1)


def peer_state(block: dict) -> dict[str, np.ndarray]:
    """One vidiff block's parameters as the peer ``Block``'s state dict (``PEER_LINEARS``, ``PEER_NORMS``)."""
    state = {}
    for name, paths in PEER_LINEARS.items():
        state[f"{name}.weight"] = np.concatenate([_as_matrix(p[-1], _leaf(block, p)["kernel"]) for p in paths], 1).T
        state[f"{name}.bias"] = np.concatenate([np.asarray(_leaf(block, p)["bias"]).reshape(-1) for p in paths])
    for name, path in PEER_NORMS.items():
        state[name] = np.asarray(_leaf(block, path)["scale"])
    return state


def vidiff_block_tree(state: dict, like: dict) -> dict:
    """The inverse of :func:`peer_state`: the peer's tensors (its gradients) in the layout of vidiff's ``like``."""
    out = jax.tree_util.tree_map(lambda x: None, like)
    for name, paths in PEER_LINEARS.items():
        kernels = np.split(np.asarray(state[f"{name}.weight"]).T, len(paths), axis=1)
        biases = np.split(np.asarray(state[f"{name}.bias"]), len(paths))
        for path, kernel, bias in zip(paths, kernels, biases):
            target, ref = _leaf(out, path), _leaf(like, path)
            target["kernel"] = kernel.reshape(ref["kernel"].shape)
            target["bias"] = bias.reshape(ref["bias"].shape)
    for name, path in PEER_NORMS.items():
        _leaf(out, path)["scale"] = np.asarray(state[name])
    return out


def unmapped(block: dict) -> list[str]:
    """vidiff block parameters the mapping leaves out (each would be a structure the peer does not have)."""
    mapped = {p for paths in PEER_LINEARS.values() for p in paths} | set(PEER_NORMS.values())
    names = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(block)[0]]
    return [n for n in names if not any(n.startswith("/".join(p) + "/") for p in mapped)]


# --------------------------------------------------------------------------- vidiff's side


def block_ctx(c):
    """A block's per-forward context with the peer's work only: no RoPE, no text mask, one clip per row."""
    return dict(cond=c[:, None, :], clip_index=None, text_clip_index=None, rope=None, segment_ids=None,
                text_segment_ids=None, cross_segment_ids=None, text_mask=None, text_lengths=None)


def vidiff_block_fn(cfg):
    block = DiTBlock(cfg)

    def run(params, x, c, txt):
        (out, _), _ = block.apply({"params": params}, (x, txt), block_ctx(c))
        return out
    return run


def vidiff_stack_fn(cfg):
    """``VideoDiT``'s own blocks, in forward_tokens' order (unscanned, as bench_dit.py runs them by default)."""
    def blocks_only(module, carry, ctx):
        for block in module.blocks:
            carry, _ = block(carry, ctx)
        return carry[0]

    def run(params, x, c, txt):
        return VideoDiT(cfg).apply({"params": params}, (x, txt), block_ctx(c), method=blocks_only)
    return run


def vidiff_vjp(fn, params, x, c, txt, r):
    """Output and gradients of ``sum(fn(...) * r)``, under float32 matmuls at full precision (TF32 on a GPU
    would be a difference of its own)."""
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(fn, params, x, c, txt)
        grads = vjp(jnp.asarray(r))
    return np.asarray(out), jax.tree_util.tree_map(np.asarray, grads)


def difference(a, b) -> dict:
    """Max abs difference, and that over the peer's largest magnitude."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b)))
    return dict(max_abs=err, max_rel=err / max(float(np.max(np.abs(b))), 1e-30))


def compare(ours, theirs) -> dict:
    """Output, input gradients and the worst parameter gradient: ``ours`` and ``theirs`` are (out, grads)."""
    (out, (gp, gx, gc, gt)), (p_out, (p_gp, p_gx, p_gc, p_gt)) = ours, theirs
    per_param = {"/".join(str(k.key) for k in path): difference(g, _leaf(p_gp, [k.key for k in path]))
                 for path, g in jax.tree_util.tree_flatten_with_path(gp)[0]}
    worst = max(per_param, key=lambda n: per_param[n]["max_rel"])
    return dict(out=difference(out, p_out), grad_x=difference(gx, p_gx), grad_c=difference(gc, p_gc),
                grad_text=difference(gt, p_gt), grad_params=dict(per_param[worst], worst=worst,
                                                                  count=len(per_param)))


# --------------------------------------------------------------------------- the peer's side (torch)


def load_peer(path: Path):
    if not path.exists():
        raise SystemExit(f"peer_parity.py: the peer {path} does not exist; pass --peer PATH of "
                         f"torch_dit_reference.py")
    spec = importlib.util.spec_from_file_location("torch_dit_reference", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    return peer


def peer_vjp(torch, module, state, x, c, txt, r, device: str):
    """The peer module's output and gradients of ``sum(out * r)``: inputs' and its state dict's."""
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    module.to(device).float()
    inputs = [torch.tensor(np.asarray(a), device=device, requires_grad=True) for a in (x, c, txt)]
    out = module(*inputs)
    out.backward(torch.from_numpy(np.asarray(r)).to(device))
    grads = {name: p.grad.cpu().numpy() for name, p in module.named_parameters()}
    return out.detach().cpu().numpy(), grads, [a.grad.cpu().numpy() for a in inputs]


def run_pair(torch, peer, args, cfg, params, x, c, txt, r):
    """Block and stack, vidiff as it runs and with the peer's epsilons, against the peer."""
    block_params = params["blocks_0"]
    out, grads, (gx, gc, gt) = peer_vjp(torch, peer.Block(args.dim, args.heads), peer_state(block_params),
                                        x, c, txt, r, args.device)
    peer_block = (out, (vidiff_block_tree(grads, block_params), gx, gc, gt))
    net_state = {f"blocks.{i}.{k}": v for i in range(args.layers) for k, v in peer_state(params[f"blocks_{i}"]).items()}
    out, grads, (gx, gc, gt) = peer_vjp(torch, peer.Net(args.dim, args.heads, args.layers, False), net_state,
                                        x, c, txt, r, args.device)
    stack_grads = {f"blocks_{i}": vidiff_block_tree({k.split(".", 2)[2]: v for k, v in grads.items()
                                                     if k.startswith(f"blocks.{i}.")}, params[f"blocks_{i}"])
                   for i in range(args.layers)}
    peer_stack = (out, (stack_grads, gx, gc, gt))
    blocks = {f"blocks_{i}": params[f"blocks_{i}"] for i in range(args.layers)}
    result = {}
    for label, patch in (("as_is", contextlib.nullcontext), ("eps_matched", peer_eps)):
        with patch():
            ours_block = vidiff_vjp(vidiff_block_fn(cfg), block_params, x, c, txt, r)
            out, (gp, gx, gc, gt) = vidiff_vjp(vidiff_stack_fn(cfg), params, x, c, txt, r)
        result[label] = dict(block=compare(ours_block, peer_block),
                             stack=compare((out, ({k: gp[k] for k in blocks}, gx, gc, gt)), peer_stack))
    return result


# --------------------------------------------------------------------------- FLOPs and the differences


# --------------------------------------------------------------------------- command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in dict(dim=64, heads=4, layers=2, batch=2, tokens=32, text=8, seed=0).items():
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--peer", default=str(DEFAULT_PEER), help="path of torch_dit_reference.py")
    p.add_argument("--device", default="cpu", help="torch device of the peer (the parity is float32 either way)")
    p.add_argument("--work-batch", type=int, default=4, help="shapes the differences' work is counted at")
    p.add_argument("--work-tokens", type=int, default=4096)
    p.add_argument("--work-text", type=int, default=128)
    p.add_argument("--xla-count", action="store_true", help="check the differences against XLA's count of the "
                                                           "vidiff step at the work shapes (lowered, not compiled)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch  # here only: the tests import this module without torch

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    peer = load_peer(Path(args.peer))
    cfg = block_config(args.dim, args.heads, args.layers, args.dim)
    params = random_params(cfg, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    x, c, txt, r = (rng.standard_normal(s).astype(np.float32) for s in (
        (args.batch, args.tokens, args.dim), (args.batch, args.dim), (args.batch, args.text, args.dim),
        (args.batch, args.tokens, args.dim)))
    bench = bench_dit.parse_args(["--batch", str(args.work_batch), "--tokens", str(args.work_tokens),
                                  "--text", str(args.work_text)])
    work_cfg, tokens = build_config(bench), bench.tokens
    latent_shape = latent_shape_for_tokens(tokens, work_cfg.patch)
    extras = differences(work_cfg, bench.batch, tokens, bench.text)
    counted = dit_flops(work_cfg, tokens, bench.text, batch=bench.batch)
    record = dict(impl="peer_parity", dim=args.dim, heads=args.heads, layers=args.layers, batch=args.batch,
                  tokens=args.tokens, text=args.text, torch_version=torch.__version__, jax_version=jax.__version__,
                  backend=jax.default_backend(), unmapped_vidiff_params=unmapped(params["blocks_0"]),
                  **run_pair(torch, peer, args, cfg, params, x, c, txt, r), same=SAME,
                  flops_check=flops_check(peer.model_flops, bench.text),
                  work_shapes=dict(preset=bench.preset, batch=bench.batch, tokens=tokens, text=bench.text,
                                   text_dim=work_cfg.text_dim, counted_flops=counted),
                  differences=[dict(e, share=None if e["flops"] is None else e["flops"] / counted) for e in extras])
    if args.xla_count:
        xla = xla_count(work_cfg, bench.batch, latent_shape, bench.text)
        outside = sum(e["flops"] for e in extras if e["where"] == "outside")
        record["xla_count"] = dict(xla, formula_per_block=counted // work_cfg.depth, listed_outside_blocks=outside)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
