"""The VAE's posterior (a diagonal Gaussian) and the flat normal draw it and the flow loss share.

Below ``vae.py`` and ``vae_codec.py``, so both import it at the top: the codec builds a
posterior from blended tiles, the model from its encoder's moments.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct


def standard_normal(key, shape, dtype=jnp.float32):
    """``jax.random.normal`` drawn flat then reshaped: the same distribution, but XLA:CPU
    compiles a 5-D draw ~15x slower (6 s per call site for a video-shaped latent)."""
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | video): per-element mean and log-variance (a pytree)."""

    mean: jax.Array
    logvar: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterised sample ``mean + std * eps``."""
        return self.mean + jnp.exp(0.5 * self.logvar) * standard_normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The posterior mean (what generation and ``vidiff prepare --latents`` use)."""
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over latent elements: shape (B,)."""
        per_element = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
        return per_element.reshape(per_element.shape[0], -1).sum(-1)
