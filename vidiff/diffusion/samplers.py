"""Samplers for the rectified-flow model and classifier-free guidance.

All samplers integrate ``dx/dt = v(x, t)`` from ``t = t_start`` (1 = pure
noise) down to 0 over a shifted schedule, inside one ``jax.lax.fori_loop`` so
the whole loop jits to a single program. A velocity function has the signature
``velocity_fn(x, t) -> v`` with ``x (B, t, h, w, c)`` and ``t (B,)``.

- ``euler``: first order, one model call a step.
- ``heun``: second order (trapezoid), two calls a step, Euler on the last step.
- ``dpmpp_2m``: DPM-Solver++(2M) in the flow parametrisation
  (``alpha_t = 1 - t``, ``sigma_t = t``), one call a step. Its multistep
  update is second order in the log-SNR for smooth data predictions; it reuses
  the previous data prediction once both lie below ``t = 1`` (from the third
  step when starting from pure noise, where the log-SNR is -inf; from the
  second when ``t_start < 1``), and the first step and the last (to t = 0)
  are first order. On these evenly spaced (then shifted) flow times the
  log-SNR steps next to t = 1 and t = 0 do not shrink as steps grow, and the
  order observed was lower: on a Gaussian flow with a known exact solution
  (matching an independent implementation of Lu et al. 2022, Alg. 2, to 1e-15)
  it was 0.75-1.6 per doubling from 8 to 64 steps with shift 1 (2.9 from 4 to
  8), and between the doublings the error is not monotone in steps, even with
  shift 1: on N(0, 0.5^2) data 12 steps were 1.3x closer than 32, on N(0, 0.3^2)
  16 steps 8x closer than 32; with shift 3 the error at 48 steps was twice that
  at 32. ``heun`` measured 2.04-2.18 on the same problem, every step count
  better than the one below it: it is the reliable second-order choice.

Known frames (image-to-video, extension, connection) are held at their clean
latents throughout: the model was trained to see them clean. A ``tie`` holds
target frames at the current clean estimate of source frames instead (loops:
the frame after the last is the second one, see ``vidiff.pipeline``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vidiff.diffusion.flow import predict_x0, shift_timesteps

SAMPLERS = ("euler", "heun", "dpmpp_2m")
# What a config's ``sample`` section (training's preview clips, an export's) and TextToVideo use where they say nothing.
SAMPLE_DEFAULTS = {"steps": 20, "sampler": "euler", "guidance": 4.0}


def timestep_schedule(steps: int, shift: float = 1.0, t_start: float = 1.0):
    """``steps + 1`` times from ``t_start`` to 0, spaced by the same shift as training.

    From ``t_start < 1`` (SDEdit) they are the tail of that spacing: even in unshifted time from the time
    that shifts to ``t_start``, rather than the whole schedule squeezed into ``[0, t_start]``."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:  # a float would fail deep in fori_loop
        raise ValueError(f"steps={steps!r} must be an int, at least 1")
    if not 0.0 < shift < math.inf:  # also false for NaN
        raise ValueError(f"shift={shift} must be a positive number (1 = no shift)")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start={t_start} must be in (0, 1]")
    # t = s u / (1 + (s - 1) u) inverted. In float64, with the ends set exactly: a float32 shift put the first
    # time at 1 + 1.2e-7 for some shifts (95 of 406 tried; 754 "auto" token counts up to 20,000), where DPM++'s
    # log(1 - t) is NaN and the whole clip came out black.
    u_start = 1.0 if t_start == 1.0 else t_start / (shift - (shift - 1.0) * t_start)
    ts = shift_timesteps(np.linspace(u_start, 0.0, steps + 1, dtype=np.float64), float(shift))
    ts[0], ts[-1] = t_start, 0.0
    return jnp.asarray(np.clip(ts, 0.0, 1.0), jnp.float32)


def check_guidance(scale: float, interval) -> None:
    """Raise a one-line ValueError for a guidance scale or interval that would fail late or do nothing silently."""
    if not math.isfinite(scale):  # NaN guidance gives an all-NaN clip, which decodes to black
        raise ValueError(f"guidance={scale} must be a finite number (1 = no guidance)")
    if (np.ndim(interval) != 1 or len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0):
        raise ValueError(f"guidance_interval={interval!r} must be (lo, hi) with 0 <= lo <= hi <= 1: the flow times "
                         "at which guidance applies")


def classifier_free_guidance(
    velocity_fn: Callable,
    cond,
    uncond,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Callable:
    """Wrap ``velocity_fn(x, t, context)`` into ``v(x, t)`` with classifier-free guidance.

    ``cond`` / ``uncond`` are context pytrees (text embeddings, masks, ...) with
    the batch as leading axis; both branches run as one doubled batch. An
    ``uncond`` of batch 1 (one empty prompt) serves every row of ``cond``. Guidance
    ``v_u + scale (v_c - v_u)`` applies only for ``t`` inside ``interval``
    (guiding the noisiest or cleanest steps hurts some models), the conditional
    prediction elsewhere. ``scale == 1`` skips the unconditional branch.
    """
    check_guidance(scale, interval)
    if scale == 1.0:
        return lambda x, t: velocity_fn(x, t, cond)
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(f"uncond: its structure {jax.tree.structure(uncond)} differs from cond's "
                         f"{jax.tree.structure(cond)}; build both contexts the same way")
    both = jax.tree_util.tree_map_with_path(_side_by_side, cond, uncond)

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
    tie: tuple[Sequence[int], Sequence[int]] | None = None,
    progress: Callable[[jax.Array], None] | None = None,
):
    """Integrate from ``x_start`` (noise, or noised input at ``t_start``) to ``t = 0``.

    ``known_mask (B, t)`` marks latent frames fixed to ``known_latents``.
    ``tie = (targets, sources)``: after every step latent frame ``targets[i]``
    is set to the current clean estimate ``x0 = x - t v`` of frame
    ``sources[i]`` (both generated, so the constraint moves with the sample);
    targets hold 0, the mean of normalised latents, until the first estimate,
    and equal their sources exactly at the end. Put targets in the model's
    conditioning mask too, so it treats them as given.
    ``progress(step)`` runs on the host after each step (``jax.debug.callback``).
    Deterministic: all randomness is in ``x_start``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown; use one of {SAMPLERS}")
    # The schedule, the solvers' coefficients and the state stay float32 whatever the latents' dtype: in
    # bfloat16 neighbouring times near t = 1 round to one value (a zero step that makes DPM++'s ratio r = 0),
    # and a bfloat16 state rounds small steps away (200 Euler steps drift 0.15 from the float32 path).
    # The model still sees latents of the caller's dtype; the result is cast back to it at the end.
    ts = timestep_schedule(steps, shift, t_start)
    dtype = x_start.dtype
    _check_known_frames(x_start.shape, known_latents, known_mask, tie)
    batch = x_start.shape[0]
    x_start = x_start.astype(jnp.float32)

    if known_mask is None:
        clamp = lambda x: x
    else:
        keep = known_mask.astype(bool)[:, :, None, None, None]
        known = jnp.zeros_like(x_start) if known_latents is None else known_latents.astype(jnp.float32)
        clamp = lambda x: jnp.where(keep, known, x)
    targets, sources = (list(tie[0]), list(tie[1])) if tie else ([], [])

    def constrain(x, x0):
        """Known frames and ties, given the step's clean estimate ``x0``."""
        x = clamp(x)
        return x.at[:, targets].set(x0[:, sources]) if targets else x

    def report(i, x):
        if progress is not None:
            jax.debug.callback(progress, i)
        return x

    def velocity(x, t):  # the model gets float32 times, as in training, whatever the latents' dtype
        return velocity_fn(x.astype(dtype), jnp.full((batch,), t, jnp.float32)).astype(jnp.float32)

    def euler_step(i, x):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, t)
        return report(i, constrain(x + (t_next - t) * v, predict_x0(x, v, t)))

    def heun_step(i, x):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, t)
        x0 = predict_x0(x, v, t)
        x_euler = constrain(x + (t_next - t) * v, x0)
        # The last step ends at t = 0, where a second evaluation adds nothing.
        v_next = jax.lax.cond(t_next > 0, lambda: velocity(x_euler, t_next), lambda: v)
        return report(i, constrain(x + (t_next - t) * 0.5 * (v + v_next), x0))

    def dpmpp_2m_step(i, carry):
        x, x0_prev, h_prev = carry
        t, t_next = ts[i], ts[i + 1]
        x0 = predict_x0(x, velocity(x, t), t)
        h = _log_snr(t_next) - _log_snr(t)
        half_over_r = h / (2 * h_prev)  # 1 / (2 r), r = h_prev / h
        second_order = (i > 0) & jnp.isfinite(h) & (h_prev > 0)
        d = jnp.where(second_order, (1 + half_over_r) * x0 - half_over_r * x0_prev, x0)
        # x_{next} = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D; at t_next = 0 this is D.
        x_next = (t_next / t) * x - (1 - t_next) * jnp.expm1(-h) * d
        return report(i, constrain(jnp.where(t_next > 0, x_next, d), x0)), x0, h

    x = clamp(x_start)
    if targets:
        x = x.at[:, targets].set(0.0)
    if sampler == "euler":
        x = jax.lax.fori_loop(0, steps, euler_step, x)
    elif sampler == "heun":
        x = jax.lax.fori_loop(0, steps, heun_step, x)
    else:
        init = (x, jnp.zeros_like(x), jnp.ones((), jnp.float32))
        x = jax.lax.fori_loop(0, steps, dpmpp_2m_step, init)[0]
    # The last estimate of a source can differ from where the solver ended (DPM++ extrapolates).
    x = x.at[:, targets].set(x[:, sources]) if targets else x
    return x.astype(dtype)


def _side_by_side(path, cond, uncond):
    """One context leaf of both branches, concatenated on the batch axis (an ``uncond`` row of batch 1
    repeated for every ``cond`` row)."""
    cond, uncond = jnp.asarray(cond), jnp.asarray(uncond)
    if uncond.shape[:1] == (1,) and uncond.shape[1:] == cond.shape[1:]:
        uncond = jnp.broadcast_to(uncond, cond.shape)
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond{jax.tree_util.keystr(path)}: shape {uncond.shape} does not fit cond's {cond.shape}; "
                         "build both the same way (or uncond with batch 1)")
    return jnp.concatenate([cond, uncond.astype(cond.dtype)])


def _log_snr(t):
    """``lambda = log(alpha / sigma)`` for ``alpha = 1 - t``, ``sigma = t`` (+inf at t = 0)."""
    return jnp.log1p(-t) - jnp.log(t)


def _check_known_frames(shape, known_latents, known_mask, tie) -> None:
    """Known frames and ties must fit ``x_start (B, t, h, w, c)``: a wrong one would broadcast or index silently."""
    if known_mask is None and known_latents is None and not tie:
        return
    if len(shape) != 5:
        raise ValueError(f"x_start: known frames need latents (B, t, h, w, c), got shape {tuple(shape)}")
    if known_latents is not None and known_mask is None:
        raise ValueError("known_latents: needs known_mask (B, t), the latent frames they fix; without it they "
                         "would be ignored")
    if known_mask is not None and np.shape(known_mask) != tuple(shape[:2]):
        raise ValueError(f"known_mask: must be per latent frame {tuple(shape[:2])}, got {np.shape(known_mask)}")
    if known_latents is not None and np.shape(known_latents) != tuple(shape):
        raise ValueError(f"known_latents: must have x_start's shape {tuple(shape)}, got {np.shape(known_latents)}")
    if tie:
        targets, sources = tie
        frames = shape[1]
        if len(targets) != len(sources) or not all(0 <= f < frames for f in (*targets, *sources)):
            raise ValueError(f"tie={tie!r}: needs (targets, sources) of equal length, latent frames in [0, {frames})")
