"""Which latent frames are known: random conditioning masks for training one model for every prompting mode.

Sora-style modes (image-to-video, extend forward / backward, connect two
clips, fill in random frames) all reduce to "some latent frames are given
clean". Training draws one mode per clip with configured probabilities and
the DiT sees the known frames as clean latents plus a mask channel
(``VideoDiT(cond_latents=..., cond_mask=...)``); ``flow_loss(known_frames=)``
then scores only the unknown frames. ``none`` is plain text-to-video.

Masks are per latent frame, shape ``(B, t)``, 1 = known. A clip always keeps
at least one unknown frame, so every sample contributes to the loss; 1-frame
latents (images) are never conditioned.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

# Order fixes the meaning of a mode's index in the drawn categorical; each mode's mask is built by name in
# sample_condition_masks.
MODES = ("none", "first_frame", "first_k", "last_k", "first_last", "random")


def mode_probabilities(probs: Mapping[str, float] | None) -> jax.Array:
    """Validated probabilities over ``MODES`` (missing modes get 0; ``None`` means text-to-video only)."""
    probs = dict(probs or {"none": 1.0})
    if unknown := sorted(set(probs) - set(MODES)):
        raise ValueError(f"dit_train.condition has unknown mode(s) {unknown}; valid modes: {', '.join(MODES)}")
    values = [float(probs.get(m, 0.0)) for m in MODES]
    if not all(0 <= v < math.inf for v in values) or sum(values) <= 0:  # NaN fails every comparison
        raise ValueError(f"dit_train.condition probabilities must be finite and >= 0 with a positive sum, got {probs}")
    total = sum(values)
    return jnp.asarray([v / total for v in values], jnp.float32)


def sample_condition_masks(key, batch: int, num_frames: int, probs: Mapping[str, float] | None,
                           random_frame_rate: float = 0.5) -> jax.Array:
    """Float masks ``(batch, num_frames)``: one mode per clip drawn from ``probs``.

    ``first_k`` / ``last_k`` know ``k`` frames with ``k`` uniform in ``[1, t - 1]``;
    ``first_last`` knows frame 0 and frame ``t - 1``; ``random`` knows each frame
    with probability ``random_frame_rate``.
    """
    p = mode_probabilities(probs)
    if not 0.0 <= random_frame_rate <= 1.0:  # bernoulli would clip it silently
        raise ValueError(f"random_frame_rate={random_frame_rate} must be a probability in [0, 1]")
    key_mode, key_k, key_rand = jax.random.split(key, 3)
    mode = jax.random.choice(key_mode, len(MODES), (batch,), p=p)
    if num_frames < 2:
        return jnp.zeros((batch, num_frames), jnp.float32)
    frame = jnp.arange(num_frames)[None, :]
    k = jax.random.randint(key_k, (batch, 1), 1, num_frames)  # in [1, t - 1]
    # A new mode goes in MODES and in this dict. Keyed by name, a mode without its mask is a KeyError naming it;
    # a list matched by position read past its end, which jnp fills (every frame known but the last), silently.
    by_mode = {
        "none": jnp.zeros((batch, num_frames), bool),
        "first_frame": frame == 0,
        "first_k": frame < k,
        "last_k": frame >= num_frames - k,
        "first_last": (frame == 0) | (frame == num_frames - 1),
        "random": jax.random.bernoulli(key_rand, random_frame_rate, (batch, num_frames)),
    }
    masks = jnp.stack([jnp.broadcast_to(by_mode[m], (batch, num_frames)) for m in MODES], axis=1)  # (B, modes, t)
    mask = jnp.take_along_axis(masks, mode[:, None, None], axis=1)[:, 0]
    # Keep one frame to predict: a fully known random mask drops its last frame.
    full = jnp.all(mask, axis=1, keepdims=True)
    mask = mask & ~(full & (frame == num_frames - 1))
    return mask.astype(jnp.float32)
