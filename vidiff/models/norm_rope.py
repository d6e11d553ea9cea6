"""The q/k RMS norm and RoPE as one float32 pass with a hand-written backward (``DiTConfig.fused_qk_rope``).

Composed from :func:`vidiff.models.layers.rms_normalize` and :func:`vidiff.models.rope.apply_rope`,
the pair rounds to the compute dtype between the norm and the rotation, and autodiff keeps three
float32 copies of each query and key for backward (the upcast, its square, the normalised value).
Here the norm, its scale and the rotation run in float32 and round once; backward keeps the
compute-dtype input and one float32 rsqrt per row, and rebuilds the rest from them. A rotation's
transpose is the rotation by minus the angles, so the cotangent is turned back first, then goes
through the norm's backward as one row reduction and one elementwise pass.
``experiments/PERF.md`` (optimisation 14) has the trace this comes from and its predicted effect.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _rotate(x, cos, sin):
    """Rotate the pairs ``(x[i], x[i + D/2])`` by the angles whose cosines and sines are given."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _sum_to(x, shape):
    """``x`` summed over the axes broadcasting added or stretched to reach its shape from ``shape``."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def rms_norm_rope(x, scale, cos, sin, eps: float = 1e-6):
    """``apply_rope(RMSNorm(x) * scale, cos, sin)`` of ``x (..., D)`` in one float32 pass, in ``x``'s dtype.

    ``scale``: ``(D,)``; ``cos``, ``sin``: the tables of :func:`vidiff.models.rope.rope_3d`,
    broadcastable to ``x``'s shape with the last axis halved."""
    return _forward(x, scale, cos, sin, eps)[0]


def _forward(x, scale, cos, sin, eps):
    xf = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    out = _rotate(xf * inv_rms * scale.astype(jnp.float32), cos, sin).astype(x.dtype)
    return out, (x, inv_rms, scale, cos, sin)


def _backward(eps, saved, cotangent):
    x, inv_rms, scale, cos, sin = saved
    normed = x.astype(jnp.float32) * inv_rms
    scaled = normed * scale.astype(jnp.float32)
    g1, g2 = jnp.split(cotangent.astype(jnp.float32), 2, axis=-1)
    s1, s2 = jnp.split(scaled, 2, axis=-1)
    d_cos, d_sin = _sum_to(g1 * s1 + g2 * s2, cos.shape), _sum_to(g2 * s1 - g1 * s2, sin.shape)
    d_scaled = _rotate(cotangent.astype(jnp.float32), cos, -sin)
    d_scale = jnp.sum(d_scaled * normed, axis=tuple(range(x.ndim - 1)))
    d_normed = d_scaled * scale.astype(jnp.float32)
    # d/dx of x * rsqrt(mean(x^2) + eps): the direction along the normalised row is taken out.
    d_x = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return (d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_cos.astype(cos.dtype), d_sin.astype(sin.dtype))


rms_norm_rope.defvjp(_forward, _backward)
