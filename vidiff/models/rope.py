"""3D positional encodings of (time, height, width) token positions: rotary (RoPE) and absolute sinusoids.

Positions may be fractional and come per token, so any duration, resolution or
aspect ratio, and any packed row of clips, uses the same parameter-free tables.
The head dimension is split between the three axes by ``fractions``
(:func:`rope_axis_dims`); :func:`sincos_3d` splits the model width the same way.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from vidiff.models.layers import sinusoidal_embedding


def rope_axis_dims(head_dim: int, fractions: Sequence[float] = (0.25, 0.375, 0.375),
                   name: str = "head_dim") -> tuple[int, int, int]:
    """Split ``head_dim`` into even (time, height, width) parts; height/width are rounded, time gets the rest.
    ``name``: what is split, for the error (``sincos_3d`` splits the model width the same way)."""
    if head_dim % 2 or len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"rope_fractions: need 3 fractions summing to 1, even {name}; got {fractions}, {head_dim}")
    dh, dw = (2 * round(f * head_dim / 2) for f in fractions[1:])
    dims = (head_dim - dh - dw, dh, dw)
    if min(dims) < 2:
        raise ValueError(f"rope_fractions: {fractions} of {name} {head_dim} gives parts {dims}; each needs >= 2 dims")
    return dims


def rope_3d(positions, head_dim: int, fractions=(0.25, 0.375, 0.375), theta: float = 10000.0):
    """Rotary angles of (time, height, width) ``positions (B, N, 3)`` -> ``(cos, sin)``, each ``(B, N, 1, head_dim/2)``.

    Positions may be fractional, so any duration, resolution or aspect ratio uses the same
    (parameter-free) table; packed clips simply carry their own positions.
    """
    angles = []
    for axis, dim in enumerate(rope_axis_dims(head_dim, fractions)):
        freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
        angles.append(positions[..., axis:axis + 1].astype(jnp.float32) * freqs)
    angles = jnp.concatenate(angles, axis=-1)[..., None, :]
    return jnp.cos(angles), jnp.sin(angles)


def sincos_3d(positions, width: int, fractions=(0.25, 0.375, 0.375)):
    """Absolute (time, height, width) sinusoids ``(B, N, width)`` of ``positions (B, N, 3)``, split like RoPE.

    Added to patch embeddings (as in DiT / Latte) so a token knows which frame it is in; RoPE
    alone gives attention only relative offsets, and a trajectory ``p0 + k v`` needs ``k``.
    """
    return jnp.concatenate([sinusoidal_embedding(positions[..., axis], dim)
                            for axis, dim in enumerate(rope_axis_dims(width, fractions, "width"))], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate pairs ``(x[i], x[i + D/2])`` of ``x (B, N, H, D)`` by the angles of :func:`rope_3d`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)

