"""The DiT's training loss: rectified flow on the VAE's normalised latents, with prompting-mode conditioning.

``dit_loss_fn`` is the step's ``loss_fn(params, batch, rng, frozen, step)`` that ``vidiff train`` runs and
``vidiff plan`` compiles: a batch brings prepared ``latents`` or uint8 ``video`` encoded inside the step; each
bucket gets its own flow shift; ``dit_train.condition`` draws the frames given clean. ``dit_flow_loss`` is
that loss on clean latents alone (the benchmarks time it), ``encode_latents`` what ``vidiff prepare --latents``
and the latent cache store.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vidiff import io
from vidiff.diffusion import flow_loss, resolve_shift
from vidiff.diffusion.conditioning import mode_probabilities, sample_condition_masks
from vidiff.models.dit import VideoDiT
from vidiff.models.vae import VideoVAE, compiled


def dit_condition(config) -> dict | None:
    """``dit_train.condition`` checked: the prompting modes' probabilities, or None (text-to-video only)."""
    condition = dict(config.dit_train.get("condition") or {}) or None
    mode_probabilities(condition)
    return condition


def dit_loss_fn(dit: VideoDiT, vae: VideoVAE, config):
    """The DiT step's ``loss_fn(params, batch, rng, frozen, step)``, for ``DiTTask`` and ``vidiff plan`` alike: on
    ``latents`` or on uint8 ``video`` encoded in the step, each bucket's flow shift, ``dit_train.condition``'s modes."""
    condition = dit_condition(config)

    def loss_fn(params, batch, rng, frozen, step):
        key_vae, key_flow = jax.random.split(rng)
        x0 = batch["latents"] if "latents" in batch else latents_in_step(vae, frozen["vae"], batch["video"], key_vae)
        shift = resolve_shift(config.flow.shift, x0.shape[1:], dit.config.patch)
        return dit_flow_loss(dit, params, x0, batch, key_flow, config.flow, shift, condition=condition)

    return loss_fn


def dit_flow_loss(dit: VideoDiT, params, x0, text: dict, rng, flow, shift: float, condition=None):
    """The DiT's training loss on clean normalised latents ``x0`` (the step ``vidiff train`` and the benchmarks run).

    ``text`` holds ``text_tokens (B, L, D)``, ``text_lengths (B,)`` and ``pooled (B, D')``.
    ``condition``: probabilities of the prompting modes (``vidiff.diffusion.conditioning``);
    the drawn known frames are given clean and left out of the loss.
    """
    key_mask, key_flow = jax.random.split(rng)
    known = None
    if condition is not None and dit.config.conditioning_frames:
        known = sample_condition_masks(key_mask, x0.shape[0], x0.shape[1], condition)

    def velocity(x, t):
        return dit.apply({"params": params}, x, t, text["text_tokens"], text["text_lengths"], text["pooled"],
                         cond_latents=None if known is None else x0, cond_mask=known)

    loss, _ = flow_loss(velocity, x0, key_flow, timestep_sampler=flow.timestep_sampler, shift=shift,
                        weighting=flow.weighting, known_frames=known)
    metrics = {} if known is None else {"known_frames": jnp.mean(known)}
    return loss, metrics


def latents_in_step(vae, variables, video, rng):
    """uint8 clips -> normalised latents sampled from the posterior, inside a jitted train step (``on_the_fly``)."""
    return jax.lax.stop_gradient(vae.apply(variables, io.unit_range(video), rng, method=vae.encode_normalized))


def encode_latents(vae, variables, video):
    """uint8 clips -> normalised latents of the posterior mode (what ``vidiff prepare --latents`` stores),
    through the same compiled encoder the pipeline conditions on."""
    return compiled(vae, "encode_normalized")(variables, io.to_float(video))
