"""The work vidiff's timed DiT step does beyond the PyTorch peer's, counted: ``experiments/peer_parity.py`` reports it.

``flops_check``: ``bench_dit.py``'s model-FLOP count against the peer's ``model_flops`` at the goal shapes.
``differences``: every structural difference of the two timed steps, with the FLOPs and bytes vidiff adds.
``xla_count``: XLA's own FLOP count of vidiff's step (lowered, not compiled), per block and outside the blocks,
which the "outside" entries of ``differences`` must account for (``tests/test_peer_parity.py`` checks they do).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
from flax import linen as nn

import bench_dit  # noqa: E402  (experiments/ is the script's own folder)
from bench_dit_inputs import build_config
from vidiff.models.dit import VideoDiT, dit_flops, init_params
from vidiff.train.dit_loss import dit_flow_loss

GOAL_SHAPES = ((4, 4096), (64, 256), (1, 16384))


def flops_check(peer_model_flops, text: int = 128) -> list[dict]:
    """bench_dit.py's model FLOPs (its config from its own flags) against the peer's ``model_flops``."""
    rows = []
    for batch, tokens in GOAL_SHAPES:
        args = bench_dit.parse_args(["--batch", str(batch), "--tokens", str(tokens), "--text", str(text)])
        cfg = build_config(args)  # as bench_dit.py's shapes_and_mesh, less the mesh (nothing runs)
        ours = dit_flops(cfg, tokens, args.text, batch=args.batch, training=True)
        theirs = peer_model_flops(args.batch, tokens, args.text, cfg.width, cfg.depth, int(cfg.mlp_ratio))
        rows.append(dict(batch=batch, tokens=tokens, text=text, vidiff=ours, peer=theirs, equal=ours == theirs))
    return rows


def differences(cfg, batch: int, tokens: int, text: int, act_bytes: int = 2) -> list[dict]:
    """Every structural difference of vidiff's timed step from the peer's, with the work vidiff adds.

    FLOPs per training step: 2 per multiply-add; a matmul costs 3x its forward, 2x where its input is data
    (no input gradient). ``act_bytes``: bytes per activation element (bf16 compute) for the elementwise work.
    """
    d, L, B, T, depth = cfg.width, text, batch, tokens, cfg.depth
    patch_in = math.prod(cfg.patch) * cfg.in_channels
    patch_out = math.prod(cfg.patch) * cfg.latent_channels
    mm = lambda rows, k, n, factor=3: 2 * rows * k * n * factor  # noqa: E731
    blocks, outside, step = "blocks", "outside", "step"
    return [
        dict(name="rope", where=blocks, flops=2 * 6 * B * T * d * depth, bytes=8 * B * T * d * act_bytes * depth,
             priced_by="bench_dit.py --ablate rope",
             note="q and k rotated in every self-attention, forward and backward (3 FLOPs per element, each read "
                  "and written once if not fused); the peer has none"),
        dict(name="text_lengths", where=blocks, flops=0, bytes=0, priced_by="bench_dit.py --ablate text-mask",
             note="cross-attention told every caption's length (all valid here); the peer attends to all tokens"),
        dict(name="norm_eps", where=blocks, flops=0, bytes=0,
             note="vidiff 1e-6 in LayerNorm and qk-norm; the peer torch's defaults (peer_parity.PEER_LAYER_NORM_EPS, "
                  "PEER_RMS_EPS): numerics only (peer_parity's eps_matched)"),
        dict(name="text_gradient", where=blocks, flops=2 * B * L * 2 * d * d * depth, bytes=0,
             note="every block's text k/v backward also runs the input gradient (the text is trained through "
                  "the projection); the peer's text is data, so it runs 2 of the 3 passes its model_flops counts"),
        dict(name="conditioning_gradient", where=blocks, flops=2 * B * 6 * d * d * depth, bytes=0,
             note="every block's adaLN Linear also runs its input gradient (c is trained); the peer's c is data"),
        dict(name="text_projection", where=outside, flops=mm(B * L, cfg.text_dim, d, 2) + mm(B * L, d, d),
             bytes=B * L * cfg.text_dim * 4,
             note=f"text tokens {cfg.text_dim} -> {d} -> {d} (ProjectionMLP); the peer takes them at width d"),
        dict(name="conditioning", where=outside,
             flops=mm(B, 256, d, 2) + mm(B, d, d) + mm(B, cfg.pooled_dim, d, 2) + mm(B, d, d), bytes=0,
             note="timestep MLP (256 -> d -> d) and pooled-text MLP (-> d -> d) make c; the peer is given c"),
        dict(name="patch_embedding", where=outside, flops=mm(B * T, patch_in, d, 2), bytes=B * T * patch_in * 4,
             note=f"latents (+ {cfg.in_channels - cfg.latent_channels} conditioning-frame channels, zeros "
                  f"here) -> width, {patch_in} inputs a token; the peer's x is given at width d"),
        dict(name="final_layer", where=outside, flops=mm(B, d, 2 * d) + mm(B * T, d, patch_out) + 10 * B * T * d,
             bytes=3 * B * T * d * 4,
             note=f"adaLN (shift, scale), LayerNorm, projection to {patch_out} patch values; the peer has none"),
        dict(name="flow_loss", where=outside, flops=12 * B * T * patch_out, bytes=6 * B * T * patch_out * 4,
             note="noise draw, logit-normal timesteps, noising, velocity target, MSE over the latents; the "
                  "peer's MSE is over its B x T x d output (more elements, no draws)"),
        dict(name="optimizer", where=step, flops=None, bytes=None,
             priced_by="bench_dit.py --update adamw; bench_update.py",
             note="vidiff train's update adds clipping, the EMA and the non-finite guard; the goal rows run "
                  "--update adamw, the peer's work"),
    ]


def xla_count(cfg, batch: int, latent_shape, text: int) -> dict:
    """XLA's FLOP count of vidiff's timed loss gradient (bench_dit.py's loss, lowered, not compiled) at depth 1
    and 2: per block, and outside the blocks, which :func:`differences`' "outside" entries must account for."""
    flow = types.SimpleNamespace(timestep_sampler="logit_normal", weighting="none")
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    data = dict(latents=spec(batch, *latent_shape, cfg.latent_channels), text_tokens=spec(batch, text, cfg.text_dim),
                text_lengths=jax.ShapeDtypeStruct((batch,), jnp.int32), pooled=spec(batch, cfg.pooled_dim))

    def counted(depth):
        c = dataclasses.replace(cfg, depth=depth, attention_impl="xla", dtype="float32", scan_blocks=False,
                                remat_policy="none")
        params = nn.meta.unbox(jax.eval_shape(functools.partial(init_params, c), jax.random.key(0)))

        def loss(p, b):
            return dit_flow_loss(VideoDiT(c), p, b["latents"], b, jax.random.key(0), flow, 1.0)[0]
        return int(jax.jit(jax.grad(loss)).lower(params, data).cost_analysis()["flops"])

    one, two = counted(1), counted(2)
    return dict(per_block=two - one, outside_blocks=2 * one - two)
