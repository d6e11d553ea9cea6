"""What the DiT takes: its conditioning-frame input, text masks or lengths, shape checks, and dummy inputs.

Every check here runs at trace time on static shapes, so a wrong input fails at
the model's boundary with a one-line error naming it (``text_emb: must be
(2, L, 384) ...``) instead of deep inside a layer as a Flax or XLA shape error.
``config`` is a :class:`vidiff.models.dit.DiTConfig`.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp


def concat_conditioning(x_t, cond_latents=None, cond_mask=None):
    """Model input ``(B, t, h, w, 2c + 1)``: noisy latents, known clean latents (where mask = 1), mask.

    ``cond_mask`` is per frame ``(B, t)`` / ``(B, t, 1, 1, 1)`` or per cell ``(B, t, h, w, 1)``;
    zeros (no conditioning) when omitted. Latents under mask 0 are zeroed, so callers may pass
    whole clips.
    """
    b, t, h, w, _ = x_t.shape
    if cond_latents is not None and jnp.shape(cond_latents) != x_t.shape:
        raise ValueError(f"cond_latents: must have x_t's shape {x_t.shape}, got {jnp.shape(cond_latents)}")
    if cond_mask is not None and jnp.shape(cond_mask) not in ((b, t), (b, t, 1, 1, 1), (b, t, h, w, 1)):
        raise ValueError(f"cond_mask: must be per frame {(b, t)} / {(b, t, 1, 1, 1)} or per cell {(b, t, h, w, 1)}, "
                         f"got {jnp.shape(cond_mask)}")
    if cond_mask is not None and cond_latents is None:  # the marked frames would be "known" as zeros
        raise ValueError("cond_mask: given without cond_latents; pass the known clean latents too, or neither")
    if cond_latents is not None and cond_mask is None:  # a zero mask would drop them
        raise ValueError("cond_latents: given without cond_mask; pass the per-frame mask of known frames too, "
                         "or neither")
    mask = jnp.zeros((b, t), x_t.dtype) if cond_mask is None else jnp.asarray(cond_mask, x_t.dtype)
    mask = mask.reshape(b, t, 1, 1, 1) if mask.ndim == 2 else mask
    mask = jnp.broadcast_to(mask, (b, t, h, w, 1))
    cond = jnp.zeros_like(x_t) if cond_latents is None else jnp.asarray(cond_latents, x_t.dtype)
    return jnp.concatenate([x_t, cond * mask, mask], axis=-1)


def check_token_inputs(cfg, tokens, t, text_emb, text_mask_or_lengths, pooled_text, segment_ids,
                       text_segment_ids) -> None:
    """Shape checks at the model's boundary: a wrong input fails here, naming itself, not deep inside a layer."""
    patch_features = math.prod(cfg.patch) * cfg.in_channels
    if tokens.ndim != 3 or tokens.shape[-1] != patch_features:
        raise ValueError(f"tokens: must be (B, N, {patch_features}) (pt*ph*pw*in_channels), got {tokens.shape}")
    b, n, _ = tokens.shape
    if b == 0:  # else jax's reshape of t fails as "integer modulo by zero"
        raise ValueError(f"tokens: the batch is empty, got {tokens.shape}; give at least one clip")
    shape = lambda x: tuple(jnp.shape(x))
    if shape(t)[:1] != (b,) or len(shape(t)) > 2:
        raise ValueError(f"t: flow times must be ({b},), one per sample (or ({b}, S) for packed clips), got {shape(t)}")
    if text_emb.ndim != 3 or text_emb.shape[0] != b or text_emb.shape[-1] != cfg.text_dim:
        raise ValueError(f"text_emb: must be ({b}, L, {cfg.text_dim}) (text_dim={cfg.text_dim}; build the config "
                         f"with the text encoder's size), got {text_emb.shape}")
    length = text_emb.shape[1]
    if text_mask_or_lengths is not None and shape(text_mask_or_lengths) not in ((b,), (b, length)):
        raise ValueError(f"text_mask_or_lengths: must be lengths ({b},) or a mask ({b}, {length}), "
                         f"got {shape(text_mask_or_lengths)}")
    clips = shape(t)[1:] or (1,)
    if shape(pooled_text) not in ((b, cfg.pooled_dim), (b, *clips, cfg.pooled_dim)):
        raise ValueError(f"pooled_text: must be ({b}, {cfg.pooled_dim}) (pooled_dim={cfg.pooled_dim}), "
                         f"got {shape(pooled_text)}")
    for name, ids, size in (("segment_ids", segment_ids, n), ("text_segment_ids", text_segment_ids, length)):
        if ids is not None and shape(ids) != (b, size):
            raise ValueError(f"{name}: must be ({b}, {size}), one clip index per token, got {shape(ids)}")


def text_mask_and_lengths(text_mask_or_lengths):
    """``None`` | bool/0-1 mask ``(B, L)`` | int lengths ``(B,)`` -> ``(mask or None, lengths or None)``."""
    if text_mask_or_lengths is None:
        return None, None
    m = jnp.asarray(text_mask_or_lengths)
    if m.ndim == 1:
        return None, m.astype(jnp.int32)
    return m.astype(bool), None


def dummy_inputs(config, batch: int = 1, latent_shape: Sequence[int] | None = None, text_len: int = 4):
    """Zero ``(x_t, t, text_emb, text_lengths, pooled_text)`` for ``init`` / shape checks.

    ``latent_shape``: the latent clip's ``(t, h, w)``, without batch or channels (``config.latent_channels``
    are added); default one patch, ``config.patch``."""
    shape = tuple(latent_shape or config.patch)
    if len(shape) != 3:
        raise ValueError(f"dummy_inputs: latent_shape is (t, h, w), got {shape}; leave out the batch and the "
                         f"{config.latent_channels} channels (e.g. VAEConfig.latent_shape(...)[1:4])")
    return (jnp.zeros((batch, *shape, config.latent_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, text_len, config.text_dim)), jnp.full((batch,), text_len, jnp.int32),
            jnp.zeros((batch, config.pooled_dim)))
