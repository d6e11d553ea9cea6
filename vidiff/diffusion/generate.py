"""Sampling latents from a VideoDiT: the velocity function, guidance and the sampler, jitted together.

``sample_latents`` is what both the training loop (periodic sample clips) and
``vidiff.pipeline.TextToVideo`` call. Text conditioning arrives as a context
dict ``{"tokens" (B, L, D), "lengths" (B,), "pooled" (B, D')}``, plus optional
``"cond_latents"`` / ``"cond_mask"`` for known frames (image-to-video,
extension, connection); the unconditional context is the empty prompt's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vidiff.diffusion.samplers import classifier_free_guidance, sample


def text_context(embeddings) -> dict:
    """``TextEmbeddings`` (host, from ``TextEncoder.encode``) -> the model's context dict."""
    return {
        "tokens": jnp.asarray(embeddings.tokens),
        "lengths": jnp.asarray(embeddings.mask.sum(-1), jnp.int32),
        "pooled": jnp.asarray(embeddings.pooled),
    }


def dit_velocity_fn(dit, params):
    """``velocity(x, t, context)`` for a VideoDiT with ``params`` (conditioning frames from the context)."""

    def velocity(x, t, context):
        return dit.apply(
            {"params": params}, x, t, context["tokens"], context["lengths"], context["pooled"],
            cond_latents=context.get("cond_latents"), cond_mask=context.get("cond_mask"),
        )

    return velocity


@functools.partial(jax.jit, static_argnames=("dit", "steps", "sampler", "guidance", "interval", "shift", "t_start"))
def sample_latents(dit, params, context, uncond_context, x_start, *, steps: int, sampler: str = "euler",
                   guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), shift: float = 1.0,
                   t_start: float = 1.0):
    """Integrate from ``x_start`` (noise at ``t_start``) to clean normalised latents, with CFG.

    Known frames in ``context["cond_mask"]`` stay at ``context["cond_latents"]``.
    """
    # Both guidance branches see the same known frames; only the text differs.
    known = {k: context[k] for k in ("cond_latents", "cond_mask") if k in context}
    uncond_context = {**uncond_context, **known}
    velocity = classifier_free_guidance(dit_velocity_fn(dit, params), context, uncond_context, guidance, interval)
    return sample(velocity, x_start, steps=steps, sampler=sampler, shift=shift, t_start=t_start,
                  known_latents=context.get("cond_latents"), known_mask=context.get("cond_mask"))
