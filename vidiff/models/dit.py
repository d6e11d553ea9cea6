"""Spacetime diffusion transformer: config and presets, model FLOPs, DiT blocks, VideoDiT (remat: ``remat.py``).

Latents ``(B, t, h, w, c)`` (plus optional conditioning-frame channels) are cut into
spacetime patches ``(pt, ph, pw)`` (:mod:`vidiff.models.patches`) and embedded as
tokens; a stack of adaLN-Zero blocks (self-attention with 3D RoPE and RMS
qk-norm, cross- or joint attention to text, GELU MLP) predicts the
rectified-flow velocity ``v = eps - x0`` per patch. Output layers, modulation
gates and cross-attention outputs are zero-initialised, so a fresh model
outputs exactly zero and every block starts as the identity.

Two entry points share one network:
  * ``VideoDiT(cfg).apply(variables, x_t, t, text, text_mask_or_lengths, pooled_text)``
    for a padded batch of same-shape latents; returns the velocity, shaped like ``x_t``.
  * ``VideoDiT(cfg).apply(variables, tokens, t, text, ..., positions=..., segment_ids=...,
    method=VideoDiT.forward_tokens)`` for NaViT-style packed rows: several clips of
    different shapes in one sequence (build rows with ``patches.pack_clips`` /
    ``patches.pack_texts``, split outputs with ``patches.unpack_clips``). Per-clip ``t`` and
    pooled text are indexed by segment id; attention never crosses clips.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vidiff.checks import is_int, is_number
from vidiff.models import context_attention  # noqa: F401  (registers "ulysses", "ring" and "chunked" attention_impl)
from vidiff.models.attention import Attention, JointAttention, local_attention_impl, resolve_attention_impl
from vidiff.models.block_layout import LAYERS_AXIS, with_block_layout
from vidiff.models.dit_inputs import (  # noqa: F401  (concat_conditioning, dummy_inputs: part of the DiT's API)
    check_token_inputs, concat_conditioning, dummy_inputs, text_mask_and_lengths,
)
from vidiff.models.layers import (Mlp, Modulation, ProjectionMLP, TimestepEmbedder, dense, layer_norm, modulate,
                                  rms_normalize)
from vidiff.models.patches import patch_positions, patchify, unpatchify
from vidiff.models.presets import from_preset
from vidiff.models.remat import REMAT_POLICIES, recomputes_norms, remat_block
from vidiff.models.rope import rope_3d, rope_axis_dims, sincos_3d

VIDEO_AXES = ("batch", "length", "act_embed")
TEXT_AXES = ("batch", "text_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of :class:`VideoDiT` (frozen, so it can be a module attribute)."""

    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    patch: tuple[int, int, int] = (1, 2, 2)  # (time, height, width) latent cells per token
    latent_channels: int = 4  # c of the VAE latents; the output has the same channels
    conditioning_frames: bool = True  # extra inputs: clean cond latents (c) + mask (1)
    text_dim: int = 384  # per-token text-encoder features (MiniLM-L6: 384, T5-XXL: 4096)
    pooled_dim: int = 384  # pooled text features for adaLN
    text_mode: str = "cross"  # "cross": cross-attention | "joint": MM-DiT joint attention
    rope_fractions: tuple[float, float, float] = (0.25, 0.375, 0.375)  # head_dim split (t, h, w)
    rope_theta: float = 10000.0
    # Also add absolute (t, h, w) sinusoids to the patch embeddings: tokens then know their frame index,
    # which makes motion (a position that changes with the frame) far quicker to learn at small scale.
    abs_pos_embed: bool = False
    # RMS-normalise text tokens and the pooled vector before their projections. Encoders differ in
    # output scale (MiniLM's pooled vector is unit-norm: per-dim RMS 0.05), and with Adam a tiny input
    # means a slowly learned projection: caption differences ("left" vs "right") then barely steer.
    normalize_text: bool = False
    # None: cuDNN flash on GPU (bf16), XLA otherwise; "ulysses" | "ring": self-attention split over the mesh's
    # context axis (vidiff.models.context_attention); cross-attention to text then stays local.
    attention_impl: str | None = None
    # 0: off. Else the size q, k and v heads are zero-padded to for the attention kernel (same result): a
    # flash kernel built for that size may beat the one it rounds the true size up to (XL's 72). 'xla' and
    # 'cudnn' (or None) only. experiments/bench_attention.py --pad-head-dim measures the candidates.
    attention_head_pad: int = 0
    remat_policy: str = "none"  # "none" | "norms" | "block" | "attention" | "dots" (REMAT_POLICIES)
    # The q/k RMS norms and RoPE as one float32 pass whose backward keeps only its input and one rsqrt per row
    # (vidiff.models.norm_rope); same parameters and, in float32, the same values. Off until a GPU A/B (PERF.md 14).
    fused_qk_rope: bool = False
    # nn.scan over blocks: one compiled block (XL: ~3x faster compile), params get a leading 'layers' axis.
    # Scanned blocks keep every residual, so pair scan with remat for big models.
    scan_blocks: bool = False
    # With scan_blocks: blocks per loop iteration; depth unrolls the loop whole, stacked weights kept (few
    # arrays for the host to pass per step) but one straight-line program, as unscanned blocks compile.
    scan_unroll: int = 1
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators); residuals stay float32
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("depth", "width", "heads", "latent_channels", "text_dim", "pooled_dim", "scan_unroll"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive int, got {getattr(self, name)!r}")
        for name in ("mlp_ratio", "rope_theta"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        for name in ("conditioning_frames", "abs_pos_embed", "normalize_text", "scan_blocks", "fused_qk_rope"):
            if not isinstance(getattr(self, name), bool):  # a config string "no" would otherwise read as True
                raise ValueError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        if (isinstance(self.patch, (int, str)) or len(self.patch) != 3
                or not all(is_int(p) and p >= 1 for p in self.patch)):
            raise ValueError(f"patch: need three positive ints (pt, ph, pw), got {self.patch!r}")
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        try:
            object.__setattr__(self, "rope_fractions", tuple(float(f) for f in self.rope_fractions))
        except (TypeError, ValueError):
            raise ValueError(f"rope_fractions: need 3 numbers summing to 1, got {self.rope_fractions!r}") from None
        if self.width % self.heads:
            raise ValueError(f"heads: width {self.width} is not divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"heads: head_dim = width / heads = {self.head_dim} must be even for RoPE; pick heads "
                             f"so that width / heads is even")
        rope_axis_dims(self.head_dim, self.rope_fractions)
        if self.abs_pos_embed:  # the absolute sinusoids split the whole width as RoPE splits a head
            rope_axis_dims(self.width, self.rope_fractions, "width (abs_pos_embed)")
        if int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio: width {self.width} x {self.mlp_ratio} leaves the MLP no hidden unit")
        choices = dict(text_mode=("cross", "joint"), remat_policy=tuple(REMAT_POLICIES),
                       dtype=("float32", "bfloat16", "float16"), param_dtype=("float32", "bfloat16"))
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {valid}")
        resolve_attention_impl(self.attention_impl, jnp.float32, self.head_dim)
        pad = self.attention_head_pad
        if not is_int(pad) or (pad and (pad < self.head_dim or self.attention_impl not in (None, "xla", "cudnn"))):
            raise ValueError(f"attention_head_pad: must be 0 (off) or an int >= head_dim {self.head_dim} with "
                             f"attention_impl None, 'xla' or 'cudnn'; got {pad!r} with {self.attention_impl!r}")
        kernel_dim = pad or self.head_dim  # the head size the kernel sees
        if self.attention_impl == "cudnn" and (self.dtype == "float32" or kernel_dim > 128 or kernel_dim % 8):
            raise ValueError(f"attention_impl: 'cudnn' needs dtype bfloat16 or float16 and a head_dim <= 128 that "
                             f"is a multiple of 8 (here {self.dtype}, {kernel_dim}); use None (auto) to fall back "
                             f"to XLA attention")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def in_channels(self) -> int:
        return 2 * self.latent_channels + 1 if self.conditioning_frames else self.latent_channels

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


# Geometry of the DiT paper (S/B/L/XL) plus a 1.3B-class video model. Parameter counts with the
# defaults (text/pooled dim 384, c=4, cross mode; `python -m vidiff.models.dit` prints them):
# tiny 0.27M, small 40.2M, B 159.7M, L 560.5M, XL 826.0M, 1.5B 1571.5M. They exceed DiT's
# (XL 675M) by the cross-attention (4 d^2 per block) and the text/pooled projections.
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(depth=2, width=64, heads=4),  # CPU tests and the tiny end-to-end demo
    "small": dict(depth=12, width=384, heads=6),  # DiT-S
    "B": dict(depth=12, width=768, heads=12),  # DiT-B
    "L": dict(depth=24, width=1024, heads=16),  # DiT-L
    "XL": dict(depth=28, width=1152, heads=16),  # DiT-XL, the PyTorch peer's default
    # Wan2.1-1.3B geometry (30 x 1536, 12 heads of 128, cuDNN's best head size). Per-block adaLN
    # (6 d^2, Wan shares one) and MLP ratio 4 (Wan: 5.8) make it 1.57B here, hence the name.
    "1.5B": dict(depth=30, width=1536, heads=12),
}


def dit_preset(name: str, **overrides) -> DiTConfig:
    """Config of a named preset (``tiny``, ``small``, ``B``, ``L``, ``XL``, ``1.5B``) with field overrides."""
    return from_preset(DiTConfig, DIT_PRESETS, name, overrides, "DiT")


def dit_flops(config: DiTConfig, tokens: int, text_tokens: int, batch: int = 1, training: bool = True) -> int:
    """Model FLOPs counted like the PyTorch peer (per-layer matmuls + attention, x3 for training, no remat)."""
    d, r, T, L = config.width, config.mlp_ratio, tokens, text_tokens
    if config.text_mode == "cross":
        per_layer = T * (4 * d * d + 2 * r * d * d + 2 * d * d) + L * 2 * d * d + 2 * T * T * d + 2 * T * L * d
    else:  # both streams get qkv/o and an MLP; attention over T + L tokens
        per_layer = (T + L) * (4 * d * d + 2 * r * d * d) + 2 * (T + L) ** 2 * d
    return int(2 * per_layer * config.depth * batch * (3 if training else 1))


# --------------------------------------------------------------------------- network


def _per_token(mod, clip_index, count: int):
    """Split modulation ``(B, S, count*D)`` into ``count`` vectors, gathered per token for packed rows."""
    # Tiny per-clip vectors: keep them whole per batch shard. Left to propagation they inherit the
    # kernel's 'mod' sharding, and under jax.set_mesh on a (data, fsdp, tensor) mesh that gave
    # wrong results (jax 0.10.2); the constraint also avoids resharding the residual stream.
    mod = nn.with_logical_constraint(mod, ("batch", None, None))
    if clip_index is not None:
        mod = jnp.take_along_axis(mod, clip_index[..., None], axis=1)
    return jnp.split(mod, count, axis=-1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention (RoPE, qk-norm) + text attention + MLP, gated by 6 modulation vectors.

    ``carry = (video (B, N, D), text (B, L, D))``; ``ctx`` holds the per-forward conditioning,
    RoPE tables and masks (broadcast across blocks). Returns ``(carry, None)`` so it can be scanned.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, carry, ctx):
        cfg = self.config
        x, txt = carry
        x = nn.with_logical_constraint(x, VIDEO_AXES)
        dt = cfg.compute_dtype
        kw = dict(dtype=dt, param_dtype=jnp.dtype(cfg.param_dtype))
        recompute = recomputes_norms(cfg.remat_policy)
        attn_kw = dict(heads=cfg.heads, head_dim=cfg.head_dim, implementation=cfg.attention_impl,
                       pad_head_dim=cfg.attention_head_pad or None, recompute_norms=recompute,
                       fuse_rope=cfg.fused_qk_rope, **kw)
        hidden = int(cfg.width * cfg.mlp_ratio)
        norm = functools.partial(layer_norm, dtype=dt, recompute=recompute)
        mod = Modulation(6, cfg.width, name="modulation", **kw)(ctx["cond"])
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = _per_token(mod, ctx["clip_index"], 6)

        if cfg.text_mode == "cross":
            y = modulate(norm(x), shift_a, scale_a)
            x = x + gate_a * Attention(name="self_attn", **attn_kw)(y, rope=ctx["rope"], segment_ids=ctx["segment_ids"])
            # Ungated, as in the peer (PixArt-style); its zero output projection keeps the block an identity at init.
            cross_kw = {**attn_kw, "implementation": local_attention_impl(cfg.attention_impl)}
            x = x + Attention(zero_out=True, name="cross_attn", **cross_kw)(
                norm(x), txt, mask=ctx["text_mask"], kv_lengths=ctx["text_lengths"],
                segment_ids=ctx["cross_segment_ids"], kv_segment_ids=ctx["text_segment_ids"])
        else:
            txt = nn.with_logical_constraint(txt, TEXT_AXES)
            tmod = Modulation(6, cfg.width, name="text_modulation", **kw)(ctx["cond"])
            t_shift_a, t_scale_a, t_gate_a, t_shift_m, t_scale_m, t_gate_m = _per_token(tmod, ctx["text_clip_index"], 6)
            out_x, out_t = JointAttention(name="joint_attn", **attn_kw)(
                modulate(norm(x), shift_a, scale_a), modulate(norm(txt), t_shift_a, t_scale_a),
                rope=ctx["rope"], text_mask=ctx["text_mask"], text_lengths=ctx["text_lengths"],
                segment_ids=ctx["segment_ids"], text_segment_ids=ctx["text_segment_ids"])
            x = x + gate_a * out_x
            txt = txt + t_gate_a * out_t
            text_mlp = Mlp(hidden, act_names=("batch", "text_length", "act_mlp"), name="text_mlp", **kw)
            txt = txt + t_gate_m * text_mlp(modulate(norm(txt), t_shift_m, t_scale_m))
            txt = nn.with_logical_constraint(txt, TEXT_AXES)

        x = x + gate_m * Mlp(hidden, name="mlp", **kw)(modulate(norm(x), shift_m, scale_m))
        return (nn.with_logical_constraint(x, VIDEO_AXES), txt), None


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-initialised projection to patch values."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, cond, clip_index):
        cfg = self.config
        dt = cfg.compute_dtype
        kw = dict(dtype=dt, param_dtype=jnp.dtype(cfg.param_dtype))
        shift, scale = _per_token(Modulation(2, cfg.width, name="modulation", **kw)(cond), clip_index, 2)
        y = modulate(layer_norm(x, dtype=dt, recompute=recomputes_norms(cfg.remat_policy)), shift, scale)
        out_features = math.prod(cfg.patch) * cfg.latent_channels
        return dense(out_features, ("embed", "patch"), zero_init=True, name="proj", **kw)(y)


class VideoDiT(nn.Module):
    """Text-conditioned spacetime DiT predicting the rectified-flow velocity (see the module docstring)."""

    config: DiTConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))
        self.patch_embed = dense(cfg.width, ("patch", "embed"), **kw)
        self.time_embed = TimestepEmbedder(cfg.width, **kw)
        self.pooled_embed = ProjectionMLP(cfg.width, **kw)
        self.text_embed = ProjectionMLP(cfg.width, **kw)
        block = remat_block(DiTBlock, cfg.remat_policy, looped=cfg.scan_blocks and cfg.scan_unroll < cfg.depth)
        if cfg.scan_blocks:
            self.blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast,), length=cfg.depth, unroll=min(cfg.scan_unroll, cfg.depth),
                                  metadata_params=LAYERS_AXIS)(cfg)
        else:
            self.blocks = [block(cfg) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(cfg)

    def __call__(self, x_t, t, text_emb, text_mask_or_lengths, pooled_text, *, cond_latents=None, cond_mask=None,
                 positions=None, segment_ids=None, text_segment_ids=None):
        """Velocity ``(B, t, h, w, c)`` for noisy latents ``x_t (B, t, h, w, c)`` at flow times ``t (B,)`` in [0, 1].

        Args:
          text_emb: text-encoder tokens ``(B, L, text_dim)``.
          text_mask_or_lengths: valid text tokens as int lengths ``(B,)`` (right padding; keeps
            cuDNN flash attention), a bool mask ``(B, L)``, or None (all valid).
          pooled_text: ``(B, pooled_dim)`` pooled caption embedding for adaLN.
          cond_latents, cond_mask: known clean latents and their per-frame mask (see
            :func:`concat_conditioning`); zeros when omitted.
          positions: optional RoPE positions ``(B, N, 3)`` (default: the patch grid from 0).
          segment_ids, text_segment_ids: optional, as in :meth:`forward_tokens`.
        """
        cfg = self.config
        if x_t.ndim != 5 or x_t.shape[-1] != cfg.latent_channels:
            raise ValueError(f"latent_channels: x_t must be (B, t, h, w, {cfg.latent_channels}), got {x_t.shape}")
        if not jnp.issubdtype(x_t.dtype, jnp.floating):  # the output would be cast to it
            raise ValueError(f"x_t: the DiT takes float latents, got {x_t.dtype}; encode frames with the VAE first")
        if not cfg.conditioning_frames and (cond_latents is not None or cond_mask is not None):
            raise ValueError("conditioning_frames: cond_latents/cond_mask given but conditioning_frames=False")
        x = concat_conditioning(x_t, cond_latents, cond_mask) if cfg.conditioning_frames else x_t
        tokens = patchify(x, cfg.patch)
        if positions is None:
            grid = [s // p for s, p in zip(x_t.shape[1:4], cfg.patch)]
            positions = jnp.broadcast_to(patch_positions(grid), (x_t.shape[0], tokens.shape[1], 3))
        out = self.forward_tokens(tokens, t, text_emb, text_mask_or_lengths, pooled_text, positions=positions,
                                  segment_ids=segment_ids, text_segment_ids=text_segment_ids)
        return unpatchify(out, cfg.patch, x_t.shape[1:4]).astype(x_t.dtype)

    def forward_tokens(self, tokens, t, text_emb, text_mask_or_lengths, pooled_text, *, positions,
                       segment_ids=None, text_segment_ids=None):
        """Token-level (packed) forward: patch tokens ``(B, N, pt*ph*pw*in_channels)`` -> ``(B, N, pt*ph*pw*c)``.

        Args:
          t: flow times ``(B,)``, or ``(B, S)`` for ``S`` clips per row (indexed by segment id).
          pooled_text: ``(B, pooled_dim)`` or per clip ``(B, S, pooled_dim)``.
          positions: per-token (time, height, width) RoPE positions ``(B, N, 3)``.
          segment_ids: ``(B, N)`` clip index of each token (``0..S-1``, -1 = padding); tokens
            attend only within their clip. Required when ``S > 1``.
          text_segment_ids: ``(B, L)`` clip index of each text token (-1 = padding), so each
            clip sees only its own caption; None = every token sees all valid text.
        """
        cfg = self.config
        check_token_inputs(cfg, tokens, t, text_emb, text_mask_or_lengths, pooled_text, segment_ids,
                            text_segment_ids)
        b, n, _ = tokens.shape
        t = jnp.asarray(t, jnp.float32).reshape(b, -1)
        clips = t.shape[1]
        pooled = pooled_text if pooled_text.ndim == 3 else pooled_text[:, None]
        if clips > 1 and segment_ids is None:
            raise ValueError(f"segment_ids: required when t has {clips} clips per row")
        if text_segment_ids is not None and segment_ids is None:  # the text's ids only act through the video's
            raise ValueError("text_segment_ids: given without segment_ids; pass segment_ids (B, N) too, the clip "
                             "of each video token")
        if cfg.text_mode == "joint" and segment_ids is not None and text_segment_ids is None:
            raise ValueError("text_segment_ids: joint text mode needs both segment_ids and text_segment_ids or neither")
        if positions is None or positions.shape != (b, n, 3):
            got = None if positions is None else tuple(positions.shape)
            raise ValueError(f"positions: need per-token RoPE positions of shape {(b, n, 3)}, got {got}")

        if cfg.normalize_text:
            pooled, text_emb = rms_normalize(pooled), rms_normalize(text_emb)
        cond = self.time_embed(t) + self.pooled_embed(pooled)  # (B, S, D): one conditioning vector per clip
        clip_index = None if clips == 1 else jnp.clip(segment_ids, 0, clips - 1)
        text_clip = None if clips == 1 or text_segment_ids is None else jnp.clip(text_segment_ids, 0, clips - 1)
        text_mask, text_lengths = text_mask_and_lengths(text_mask_or_lengths)
        ctx = dict(cond=cond, clip_index=clip_index, text_clip_index=text_clip,
                   rope=rope_3d(positions, cfg.head_dim, cfg.rope_fractions, cfg.rope_theta),
                   segment_ids=segment_ids, text_segment_ids=text_segment_ids,
                   cross_segment_ids=segment_ids if text_segment_ids is not None else None,
                   text_mask=text_mask, text_lengths=text_lengths)

        x = self.patch_embed(tokens).astype(jnp.float32)
        if cfg.abs_pos_embed:
            x = x + sincos_3d(positions, cfg.width, cfg.rope_fractions)
        x = nn.with_logical_constraint(x, VIDEO_AXES)
        txt = nn.with_logical_constraint(self.text_embed(text_emb).astype(jnp.float32), TEXT_AXES)
        carry = (x, txt)
        if cfg.scan_blocks:
            carry, _ = self.blocks(carry, ctx)
        else:
            for block in self.blocks:
                carry, _ = block(carry, ctx)
        return self.final_layer(carry[0], cond, clip_index).astype(jnp.float32)


def init_params(config: DiTConfig, key: jax.Array) -> dict:
    """The DiT's parameters for ``key``, boxed with logical axis names, in ``config``'s block layout.

    Always initialised with the blocks scanned, then laid out as ``config`` says, so the program holds one
    block's random-number kernels instead of ``depth`` copies: an unscanned XL train state compiles in 7.2 s
    instead of 18.8 on 2 CPU cores, and a GPU compiles each such kernel on its own (experiments/PERF.md,
    row 11). One seed gives one network whichever the layout (tests/test_dit.py).
    """
    scanned = dataclasses.replace(config, scan_blocks=True, scan_unroll=1)
    return with_block_layout(VideoDiT(scanned).init(key, *dummy_inputs(scanned))["params"], config)


def param_count(config: DiTConfig) -> int:
    """Number of parameters, from ``jax.eval_shape`` (nothing is allocated)."""
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


if __name__ == "__main__":
    for preset in DIT_PRESETS:
        print(f"{preset:>5}: {param_count(dit_preset(preset)) / 1e6:9.2f} M parameters")
