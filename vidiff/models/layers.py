"""Building blocks of the DiT: dense layers with logical axis names, norms, adaLN modulation, MLPs, timestep embedding.

Every parameter is created with ``nn.with_logical_partitioning`` using the
logical names of :mod:`vidiff.parallel` (``embed``, ``mlp``, ``heads``,
``head_dim``, ``mod``, ``freq`` ...). Residual streams are float32; matmuls run
in the module's compute ``dtype``. Attention lives in
:mod:`vidiff.models.attention`, positional encodings in :mod:`vidiff.models.rope`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vidiff.models.norm_rope import rms_norm_rope

Dtype = Any


# --------------------------------------------------------------------------- dense layers with logical names


def dense(features: int, names: tuple[str, str], *, zero_init=False, dtype=jnp.float32,
          param_dtype=jnp.float32, name=None, init=None) -> nn.Dense:
    """``nn.Dense`` with logical names on kernel ``names`` and bias ``names[-1:]`` (xavier init, or zeros)."""
    init = nn.initializers.zeros_init() if zero_init else (init or nn.initializers.xavier_uniform())
    return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(init, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]),
        dtype=dtype, param_dtype=param_dtype, name=name,
    )


# --------------------------------------------------------------------------- norms, modulation, MLP


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis with a learned scale (used for q/k norms), computed in float32."""

    names: tuple[str, ...] = ("head_dim",)
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32
    recompute: bool = False  # see rms_normalize

    @nn.compact
    def __call__(self, x, rope=None):
        """``rope``: RoPE's ``(cos, sin)``, applied in the same float32 pass (:mod:`vidiff.models.norm_rope`)."""
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), self.names),
            (x.shape[-1],), self.param_dtype,
        )
        if rope is not None:
            return rms_norm_rope(x, scale, *rope, self.eps)
        return (rms_normalize(x, self.eps, recompute=self.recompute) * scale.astype(jnp.float32)).astype(x.dtype)


def rms_normalize(x, eps: float = 1e-6, *, recompute: bool = False):
    """RMS normalisation over the last axis without parameters, in float32.

    ``recompute``: backward reruns the norm from ``x`` instead of keeping what autodiff saves, 3-4
    float32 copies of ``x`` (the upcast, its square, the product): a bfloat16 input's memory several
    times over, for one elementwise pass more."""
    if recompute:
        return jax.checkpoint(functools.partial(rms_normalize, eps=eps))(x)
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_norm(x, eps: float = 1e-6, dtype=None, *, recompute: bool = False):
    """LayerNorm without affine parameters (adaLN supplies shift and scale); statistics in float32,
    output in ``dtype`` (default float32). Backward keeps float32 ``x - mean`` and its square whatever
    ``dtype``, unless ``recompute`` (as :func:`rms_normalize`) or a remat policy reruns the norm."""
    if recompute:
        return jax.checkpoint(functools.partial(layer_norm, eps=eps, dtype=dtype))(x)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(dtype or jnp.float32)


def modulate(x, shift, scale):
    """adaLN: ``x * (1 + scale) + shift``; shift/scale broadcast over tokens ``(B, 1|N, D)``."""
    return x * (1 + scale) + shift


class Modulation(nn.Module):
    """adaLN-Zero: ``Dense(silu(c))`` -> ``count`` vectors of ``width``, zero-initialised.

    Returns the concatenated ``(..., count * width)`` array; split it after any per-token gather
    so packed sequences gather once.
    """

    count: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond):
        return dense(self.count * self.width, ("embed", "mod"), zero_init=True, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="proj")(nn.silu(cond))


class Mlp(nn.Module):
    """Transformer MLP: Dense -> GELU(tanh) -> Dense."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    act_names: tuple[str, ...] = ("batch", "length", "act_mlp")

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.hidden, ("embed", "mlp"), name="fc1", **kw)(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), self.act_names)
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class ProjectionMLP(nn.Module):
    """Two-layer projection of an external embedding (text tokens, pooled text) to the model width."""

    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.gelu(dense(self.width, ("embed", "mlp"), name="fc1", **kw)(x), approximate=True)
        return dense(self.width, ("mlp", "embed"), name="fc2", **kw)(h)

# --------------------------------------------------------------------------- timestep embedding


def sinusoidal_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal features ``(..., dim)`` of scalar times ``t (...)`` (as in DiT / ADM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """Flow time ``t`` in [0, 1] -> ``(..., width)``: sinusoids of ``t * scale``, then an MLP."""

    width: int
    freq_dim: int = 256
    scale: float = 1000.0  # spreads [0, 1] over the frequency range tuned for integer timesteps
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init=nn.initializers.normal(0.02))
        h = dense(self.width, ("freq", "mlp"), name="fc1", **kw)(sinusoidal_embedding(t * self.scale, self.freq_dim))
        return dense(self.width, ("mlp", "embed"), name="fc2", **kw)(nn.silu(h))
