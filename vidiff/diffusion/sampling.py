"""Sampling latents from a VideoDiT: the velocity function, guidance and the sampler, jitted together.

``sample_latents`` is what both the training loop (periodic sample clips) and
``vidiff.pipeline.TextToVideo`` call. Text conditioning arrives as a context
dict ``{"tokens" (B, L, D), "lengths" (B,), "pooled" (B, D')}``, plus optional
``"cond_latents"`` / ``"cond_mask"`` for known frames (image-to-video,
extension, connection, loops); the unconditional context is the empty prompt's,
or a negative prompt's (``TextToVideo``'s ``negative_prompt``).

Progress: ``sample_latents(..., progress=True)`` reports every finished step
to the callbacks registered with :func:`on_sampler_step` (a host callback
inside the compiled loop; the flag, not the callback, is part of the compiled
program, so a new progress bar does not recompile).

Also here: per-sample seeded noise, and the text context a ``TextEmbeddings`` makes.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from vidiff.diffusion.samplers import classifier_free_guidance, sample
from vidiff.models.gaussian import standard_normal

_step_listeners: list[Callable[[int], None]] = []


def text_context(embeddings) -> dict:
    """``TextEmbeddings`` (host, from ``TextEncoder.encode``) -> the model's context dict."""
    return {
        "tokens": jnp.asarray(embeddings.tokens),
        "lengths": jnp.asarray(embeddings.mask.sum(-1), jnp.int32),
        "pooled": jnp.asarray(embeddings.pooled),
    }


def dit_velocity_fn(dit, params, *, cond_from_x: bool = False):
    """``velocity(x, t, context)`` for a VideoDiT with ``params`` (conditioning frames from the context).

    ``cond_from_x``: read the known frames' clean latents from ``x`` itself
    (the sampler holds them there), which lets tied frames change every step.
    """

    def velocity(x, t, context):
        mask = context.get("cond_mask")
        cond = x if cond_from_x and mask is not None else context.get("cond_latents")
        return dit.apply(
            {"params": params}, x, t, context["tokens"], context["lengths"], context["pooled"],
            cond_latents=cond, cond_mask=mask,
        )

    return velocity


@contextlib.contextmanager
def on_sampler_step(callback: Callable[[int], None]):
    """Within the block, ``callback(step)`` runs after each step of ``sample_latents(progress=True)``.

    Block on the result inside the block: callbacks arrive while the program runs.
    """
    _step_listeners.append(callback)
    try:
        yield
    finally:
        _step_listeners.remove(callback)


def _report_step(step) -> None:
    for callback in list(_step_listeners):
        callback(int(step))


@functools.partial(jax.jit, static_argnames=("dit", "steps", "sampler", "guidance", "interval", "shift", "t_start",
                                             "tie", "progress"))
def sample_latents(dit, params, context, uncond_context, x_start, *, steps: int, sampler: str = "euler",
                   guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), shift: float = 1.0,
                   t_start: float = 1.0, tie: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                   progress: bool = False):
    """Integrate from ``x_start`` (noise at ``t_start``) to clean normalised latents, with CFG.

    Known frames in ``context["cond_mask"]`` stay at ``context["cond_latents"]``;
    ``tie`` ties generated frames together (see ``samplers.sample``).
    """
    # Both guidance branches see the same known frames; only the text differs.
    known = {k: context[k] for k in ("cond_latents", "cond_mask") if k in context}
    uncond_context = {**uncond_context, **known}
    velocity_fn = dit_velocity_fn(dit, params, cond_from_x=True)
    velocity = classifier_free_guidance(velocity_fn, context, uncond_context, guidance, interval)
    return sample(velocity, x_start, steps=steps, sampler=sampler, shift=shift, t_start=t_start,
                  known_latents=context.get("cond_latents"), known_mask=context.get("cond_mask"), tie=tie,
                  progress=_report_step if progress else None)


@functools.partial(jax.jit, static_argnums=1)
def seeded_noise(seeds, shape):
    """Per-sample noise from each sample's own seed, so a clip does not depend on its batch."""
    return jax.vmap(lambda s: standard_normal(jax.random.key(s), shape))(seeds)
