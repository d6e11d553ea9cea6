"""Rectified flow: noising, velocity targets, timestep sampling and shift, the loss.

Convention (SD3 / Open-Sora 2.0): ``x_t = (1 - t) x_0 + t eps`` with ``t`` in
[0, 1]; ``t = 0`` is data, ``t = 1`` is noise; the network predicts the
velocity ``v = eps - x_0`` (so ``dx_t / dt = v``). Larger latents need more
noise to destroy the same structure, so the timestep distribution is shifted
towards 1 by a factor that grows with the number of latent tokens.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from vidiff.models.gaussian import standard_normal
from vidiff.models.patches import token_count

TIMESTEP_SAMPLERS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "cosmap")


def noise_latents(x0, eps, t):
    """``x_t = (1 - t) x_0 + t eps`` with ``t`` broadcast over the trailing axes."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * eps


def velocity_target(x0, eps):
    """The rectified-flow regression target ``v = eps - x_0``."""
    return eps - x0


def predict_x0(x_t, v, t):
    """Clean sample implied by a velocity prediction: ``x_0 = x_t - t v``."""
    return x_t - _expand(t, x_t) * v


def shift_timesteps(t, shift: float):
    """SD3's resolution shift ``t' = s t / (1 + (s - 1) t)``; ``s > 1`` moves mass towards noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def shift_for_tokens(
    num_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Timestep shift for a latent of ``num_tokens`` patches: ``exp(mu)``, mu linear in tokens (Flux/SD3)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (num_tokens - base_tokens))


def resolve_shift(shift, latent_shape, patch) -> float:
    """A config's ``flow.shift``: a number as given, or for ``"auto"`` the shift of this clip's token count
    (``latent_shape`` ``(t, h, w, ...)`` cut into ``patch`` ``(pt, ph, pw)``). Training resolves it per batch
    and sampling per requested size, so images, short and long clips each keep the shift they trained with."""
    if shift == "auto":
        return shift_for_tokens(token_count(latent_shape, patch))
    return float(shift)


def sample_timesteps(
    key,
    batch: int,
    kind: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
):
    """Training timesteps ``(batch,)`` in (0, 1): uniform or logit-normal, then shifted."""
    if kind == "uniform":
        t = jax.random.uniform(key, (batch,), minval=1e-5, maxval=1.0 - 1e-5)
    elif kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))
    else:
        raise ValueError(f"timestep sampler {kind!r} is unknown; use one of {TIMESTEP_SAMPLERS}")
    return shift_timesteps(t, shift)


def loss_weight(t, kind: str = "none"):
    """Per-sample loss weights (SD3 section 3.1); ``none`` is plain velocity MSE."""
    if kind == "none":
        return jnp.ones_like(t)
    if kind == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    raise ValueError(f"loss weighting {kind!r} is unknown; use one of {LOSS_WEIGHTINGS}")


def flow_loss(
    velocity_fn: Callable,
    x0,
    key,
    *,
    timestep_sampler: str = "logit_normal",
    shift: float = 1.0,
    weighting: str = "none",
    known_frames=None,
):
    """Rectified-flow loss of ``velocity_fn(x_t, t) -> v`` on clean latents ``x0 (B, t, h, w, c)``.

    ``known_frames`` (B, t) marks latent frames given to the model as clean
    conditioning: they are not noised and not counted in the loss, so the model
    learns to fill in only the unknown frames.
    Returns ``(loss, aux)`` with per-sample losses and the timesteps used.
    """
    if known_frames is not None and jnp.shape(known_frames) != x0.shape[:2]:
        raise ValueError(f"known_frames: must be per latent frame {x0.shape[:2]}, got {jnp.shape(known_frames)}")
    key_t, key_eps = jax.random.split(key)
    t = sample_timesteps(key_t, x0.shape[0], timestep_sampler, shift=shift)
    # The mix and the target are float32 whatever x0's dtype: a bfloat16 t would mix x_t at a time up to
    # 2e-3 away from the float32 t the model is told. The model gets x_t in x0's dtype.
    clean = x0.astype(jnp.float32)
    eps = standard_normal(key_eps, x0.shape)
    x_t = noise_latents(clean, eps, t)
    weight = jnp.ones(x0.shape[:2], jnp.float32)
    if known_frames is not None:
        known = known_frames.astype(jnp.float32)
        x_t = known[:, :, None, None, None] * clean + (1.0 - known[:, :, None, None, None]) * x_t
        weight = 1.0 - known
    v = velocity_fn(x_t.astype(x0.dtype), t)
    per_frame = jnp.mean(jnp.square(v.astype(jnp.float32) - velocity_target(clean, eps)), axis=(2, 3, 4))
    per_sample = jnp.sum(per_frame * weight, axis=1) / jnp.maximum(jnp.sum(weight, axis=1), 1.0)
    loss = jnp.mean(per_sample * loss_weight(t, weighting))
    return loss, {"per_sample": per_sample, "t": t}


def _expand(t, x):
    t = jnp.asarray(t, x.dtype)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
