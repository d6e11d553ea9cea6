"""Samplers for the rectified-flow model and classifier-free guidance.

All samplers integrate ``dx/dt = v(x, t)`` from ``t = t_start`` (1 = pure
noise) down to 0 over a shifted schedule, inside one ``jax.lax.fori_loop`` so
the whole loop jits to a single program. A velocity function has the signature
``velocity_fn(x, t) -> v`` with ``x (B, t, h, w, c)`` and ``t (B,)``.

- ``euler``: first order, one model call a step.
- ``heun``: second order (trapezoid), two calls a step, Euler on the last step.
- ``dpmpp_2m``: DPM-Solver++(2M) in the flow parametrisation
  (``alpha_t = 1 - t``, ``sigma_t = t``), one call a step, second order from the
  second step on by reusing the previous data prediction.

Known frames (image-to-video, extension, connection) are held at their clean
latents throughout: the model was trained to see them clean.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vidiff.diffusion.flow import predict_x0, shift_timesteps

SAMPLERS = ("euler", "heun", "dpmpp_2m")


def timestep_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0):
    """``steps + 1`` times from ``t_start`` to 0, spaced by the same shift as training."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start={t_start} must be in (0, 1]")
    return t_start * shift_timesteps(jnp.linspace(1.0, 0.0, steps + 1), shift)


def classifier_free_guidance(
    velocity_fn: Callable,
    cond,
    uncond,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Callable:
    """Wrap ``velocity_fn(x, t, context)`` into ``v(x, t)`` with classifier-free guidance.

    ``cond`` / ``uncond`` are context pytrees (text embeddings, masks, ...) with
    the batch as leading axis; both branches run as one doubled batch. Guidance
    ``v_u + scale (v_c - v_u)`` applies only for ``t`` inside ``interval``
    (guiding the noisiest or cleanest steps hurts some models), the conditional
    prediction elsewhere. ``scale == 1`` skips the unconditional branch.
    """
    if scale == 1.0:
        return lambda x, t: velocity_fn(x, t, cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)

    def guided(x, t):
        v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        v_cond, v_uncond = jnp.split(v, 2)
        inside = (t >= interval[0]) & (t <= interval[1])
        inside = inside.reshape(inside.shape + (1,) * (x.ndim - 1))
        return jnp.where(inside, v_uncond + scale * (v_cond - v_uncond), v_cond)

    return guided


def sample(
    velocity_fn: Callable,
    x_start,
    *,
    steps: int,
    sampler: str = "euler",
    shift: float = 1.0,
    t_start: float = 1.0,
    known_latents=None,
    known_mask=None,
):
    """Integrate from ``x_start`` (noise, or noised input at ``t_start``) to ``t = 0``.

    ``known_mask (B, t)`` marks latent frames fixed to ``known_latents``.
    Deterministic: all randomness is in ``x_start``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown; use one of {SAMPLERS}")
    ts = timestep_schedule(steps, shift, t_start).astype(x_start.dtype)
    batch = x_start.shape[0]

    if known_mask is None:
        clamp = lambda x: x
    else:
        keep = known_mask.astype(bool)[:, :, None, None, None]
        clamp = lambda x: jnp.where(keep, known_latents.astype(x.dtype), x)

    def velocity(x, t):
        return velocity_fn(x, jnp.full((batch,), t, x.dtype)).astype(x.dtype)

    def euler_step(i, x):
        t, t_next = ts[i], ts[i + 1]
        return clamp(x + (t_next - t) * velocity(x, t))

    def heun_step(i, x):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, t)
        x_euler = clamp(x + (t_next - t) * v)
        # The last step ends at t = 0, where a second evaluation adds nothing.
        v_next = jax.lax.cond(t_next > 0, lambda: velocity(x_euler, t_next), lambda: v)
        return clamp(x + (t_next - t) * 0.5 * (v + v_next))

    def dpmpp_2m_step(i, carry):
        x, x0_prev, h_prev = carry
        t, t_next = ts[i], ts[i + 1]
        x0 = predict_x0(x, velocity(x, t), t)
        h = _log_snr(t_next) - _log_snr(t)
        r = h_prev / h
        second_order = (i > 0) & jnp.isfinite(h)
        d = jnp.where(second_order, (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev, x0)
        # x_{next} = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D; at t_next = 0 this is D.
        x_next = jnp.where(t_next > 0, (t_next / t) * x - (1 - t_next) * jnp.expm1(-h) * d, d)
        return clamp(x_next), x0, h

    x = clamp(x_start)
    if sampler == "euler":
        return jax.lax.fori_loop(0, steps, euler_step, x)
    if sampler == "heun":
        return jax.lax.fori_loop(0, steps, heun_step, x)
    init = (x, jnp.zeros_like(x), jnp.ones((), x.dtype))
    return jax.lax.fori_loop(0, steps, dpmpp_2m_step, init)[0]


def _log_snr(t):
    """``lambda = log(alpha / sigma)`` for ``alpha = 1 - t``, ``sigma = t`` (+inf at t = 0)."""
    return jnp.log1p(-t) - jnp.log(t)
