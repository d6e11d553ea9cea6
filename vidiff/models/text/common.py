"""Pieces shared by the text encoders: output type, dense layers with logical
axis names, attention, activations, pooling and Hugging Face weight layout.

The text package stays self-contained (it does not use ``vidiff.models.layers``)
so that its numerics are pinned to the reference PyTorch implementations by the
golden tests alone.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# Activation sharding at block boundaries (no-op without active axis rules).
TOKEN_AXES = ("batch", "text_length", "act_embed")


class TextOutput(NamedTuple):
    """What every text encoder returns (a pytree, so it passes through ``jit``).

    tokens: (B, L, D) float32 last hidden states, zero at padded positions.
    mask:   (B, L) bool, True for real tokens (the cross-attention key mask).
    pooled: (B, D') float32 sentence vector (model specific, see each model).
    """

    tokens: jax.Array
    mask: jax.Array
    pooled: jax.Array


# Hugging Face ``ACT2FN`` names -> jax functions. "gelu" is the exact erf form;
# "gelu_new" (T5 v1.1 / umT5) and friends are the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` in a Hugging Face config (one-line error if unknown)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"text encoder config: hidden_act '{name}' is not supported; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _init(axes: Sequence[str | None], init=nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    features: int | tuple[int, ...],
    axes: Sequence[str | None],
    *,
    contract: int = 1,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.DenseGeneral:
    """A ``DenseGeneral`` whose kernel (and bias) carry logical axis names.

    ``axes`` names the kernel dims: the ``contract`` input dims, then the output
    dims. Attention projections keep heads as their own axis, e.g. a query is
    ``dense((H, Dh), ("embed", "heads", "head_dim"))`` and an output projection
    ``dense(D, ("heads", "head_dim", "embed"), contract=2)``, so tensor
    parallelism can split heads without reshapes.
    """
    axis = -1 if contract == 1 else tuple(range(-contract, 0))
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_init(axes),
        bias_init=_init(tuple(axes)[-n_out:], nn.initializers.zeros),
        name=name,
    )


def embed(num: int, features: int, axes: Sequence[str | None], name: str) -> nn.Embed:
    """An embedding table with logical axis names. Looks up in float32: the residual
    stream stays float32 and only matmuls run in the compute dtype."""
    return nn.Embed(num, features, dtype=jnp.float32, param_dtype=jnp.float32,
                    embedding_init=_init(axes), name=name)


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
    """LayerNorm computed in float32 (cheap, and keeps bfloat16 runs close to float32)."""
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                        scale_init=_init(("embed",), nn.initializers.ones),
                        bias_init=_init(("embed",), nn.initializers.zeros), name=name)


def attention(q, k, v, *, mask=None, bias=None, scale: float | None = None) -> jax.Array:
    """Multi-head attention on (B, L, H, Dh) inputs via ``jax.nn.dot_product_attention``.

    ``mask`` is boolean and broadcastable to (B, H, Lq, Lk); ``bias`` is added to the
    logits (T5's relative position bias). Softmax runs in float32 whatever the dtype.
    """
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)


def key_mask(mask: jax.Array) -> jax.Array:
    """(B, L) token mask -> (B, 1, 1, L) attention mask: queries see real keys only."""
    return mask.astype(bool)[:, None, None, :]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens, as sentence-transformers does (denominator clamped at 1e-9)."""
    m = mask.astype(jnp.float32)[..., None]
    return (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``torch.nn.functional.normalize``: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def finish(tokens: jax.Array, mask: jax.Array, pooled: jax.Array) -> TextOutput:
    """Zero padded positions (so cached and fresh outputs agree exactly and cross-attention
    never reads garbage), return float32."""
    mask = mask.astype(bool)
    tokens = jnp.where(mask[..., None], tokens, 0).astype(jnp.float32)
    return TextOutput(tokens, mask, pooled.astype(jnp.float32))


# --- Hugging Face (PyTorch) weight layout -> Flax ------------------------------------
# torch ``nn.Linear`` stores weight as (out, in); Flax kernels are (in, out). Attention
# projections are additionally split into (heads, head_dim).


class StateDict:
    """Read-only view of a checkpoint's tensors with one-line errors for missing names."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, prefixes: Sequence[str] = ()):
        self.tensors, self.source = tensors, source
        # Checkpoints of wrapper models prefix names ("bert.", "text_model."): try each.
        self.prefixes = tuple(prefixes) + ("",)

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds ``name`` under any of the prefixes."""
        return any(p + name in self.tensors for p in self.prefixes)

    def __getitem__(self, name: str) -> np.ndarray:
        for p in self.prefixes:
            if p + name in self.tensors:
                return np.asarray(self.tensors[p + name], dtype=np.float32)
        raise ValueError(f"{self.source}: checkpoint has no tensor '{name}' (is this the right kind of text encoder?)")

    def linear(self, name: str, bias: bool = True) -> dict:
        """torch ``nn.Linear`` ``name`` -> Flax ``Dense`` params (kernel transposed to (in, out))."""
        out = {"kernel": self[name + ".weight"].T}
        if bias:
            out["bias"] = self[name + ".bias"]
        return out

    def heads_in(self, name: str, heads: int, bias: bool = True) -> dict:
        """q/k/v projection: (H*Dh, D) -> kernel (D, H, Dh), bias (H, Dh)."""
        w = self._split(name, heads, axis=0)
        out = {"kernel": w.T.reshape(w.shape[1], heads, -1)}
        if bias:
            out["bias"] = self[name + ".bias"].reshape(heads, -1)
        return out

    def heads_out(self, name: str, heads: int, bias: bool = True) -> dict:
        """Output projection: (D, H*Dh) -> kernel (H, Dh, D)."""
        w = self._split(name, heads, axis=1)
        out = {"kernel": w.T.reshape(heads, -1, w.shape[0])}
        if bias:
            out["bias"] = self[name + ".bias"]
        return out

    def _split(self, name: str, heads: int, axis: int) -> np.ndarray:
        """``name.weight``, checked that its ``axis`` splits into ``heads`` heads."""
        w = self[name + ".weight"]
        if w.shape[axis] % heads:
            raise ValueError(f"{self.source}: tensor '{name}.weight' {w.shape} does not split into {heads} heads; "
                             "check config.json's head count")
        return w

    def norm(self, name: str, bias: bool = True) -> dict:
        """A torch norm's weight (and bias) -> Flax ``LayerNorm`` params."""
        out = {"scale": self[name + ".weight"]}
        if bias:
            out["bias"] = self[name + ".bias"]
        return out

    def embedding(self, name: str) -> dict:
        """A torch embedding table -> Flax ``Embed`` params."""
        return {"embedding": self[name]}
