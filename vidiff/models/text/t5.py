"""T5 / T5 v1.1 / umT5 encoder in Flax (linen), loading Hugging Face weights.

The encoder half of T5 is the text encoder of many video models (umT5-XXL in
Wan, T5-XXL in PixArt / SD3 / CogVideoX). Differences from BERT worth knowing:

* no absolute positions: a learned scalar bias per (relative-position bucket,
  head) is added to the attention logits, and logits are *not* scaled by
  1/sqrt(head_dim) (the scale is folded into the initialisation);
* RMS LayerNorm without mean subtraction or bias, pre-norm residual blocks;
* feed-forward: ``relu`` for the original T5, gated tanh-gelu
  (``wo(gelu(wi_0 x) * wi_1 x)``) for T5 v1.1 and umT5;
* T5 computes the position bias in layer 0 and shares it with every layer;
  umT5 gives every layer its own bias table.

The pooled vector is the mean of the final states over the mask.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vidiff.models.text import common


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 encoder hyper-parameters; ``from_hf`` reads a HF T5/umT5 config.json."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    layer_norm_eps: float = 1e-6
    act: str = "relu"
    gated: bool = False
    per_layer_bias: bool = False  # umT5: a relative-position bias table in every layer

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "T5Config":
        """From a HF ``T5Config`` / ``UMT5Config`` dict, deriving the activation the way
        transformers does: ``feed_forward_proj`` "gated-gelu" means gated tanh-gelu."""
        proj = cfg.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"t5 config: feed_forward_proj '{proj}' must be 'ACT' or 'gated-ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        c = cls(
            vocab_size=cfg["vocab_size"],
            d_model=cfg["d_model"],
            d_kv=cfg["d_kv"],
            d_ff=cfg["d_ff"],
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_heads"],
            num_buckets=cfg.get("relative_attention_num_buckets", 32),
            max_distance=cfg.get("relative_attention_max_distance", 128),
            layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
            act=act,
            gated=parts[0] == "gated",
            per_layer_bias=cfg.get("model_type") == "umt5",
        )
        common.activation(c.act)  # fail early on an unknown activation
        return dataclasses.replace(c, **overrides)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucketing of ``key_pos - query_pos`` (Mesh TensorFlow's scheme).

    Half the buckets are for keys after the query. Within each half, distances below
    ``max_exact`` get their own bucket; larger ones share log-spaced buckets up to
    ``max_distance``, beyond which all land in the last bucket. Computed in numpy
    float32 like the reference (sequence lengths are static, so this is a constant).
    """
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int32) * num_buckets
    rel = np.abs(relative_position)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


class PositionBias(nn.Module):
    """Learned (bucket, head) table -> additive logits bias of shape (1, H, L, L)."""

    config: T5Config

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        c = self.config
        pos = np.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], c.num_buckets, c.max_distance)
        table = common.embed(c.num_buckets, c.num_heads, (None, "heads"), "relative_attention_bias")
        return jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]


class RMSNorm(nn.Module):
    """T5 LayerNorm: scale only, no mean subtraction, statistics in float32."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class T5Layer(nn.Module):
    """Pre-norm block: x += Attn(norm x) with relative bias; x += FF(norm x)."""

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attn_mask: jax.Array, bias: jax.Array | None) -> jax.Array:
        c, dt = self.config, self.dtype
        if c.per_layer_bias:
            bias = PositionBias(c, name="position_bias")(x.shape[1])
        h = RMSNorm(c.layer_norm_eps, name="attn_norm")(x)
        heads, axes = (c.num_heads, c.d_kv), ("embed", "heads", "head_dim")
        q = common.dense(heads, axes, use_bias=False, dtype=dt, name="q")(h)
        k = common.dense(heads, axes, use_bias=False, dtype=dt, name="k")(h)
        v = common.dense(heads, axes, use_bias=False, dtype=dt, name="v")(h)
        a = common.attention(q, k, v, mask=attn_mask, bias=bias, scale=1.0)
        x = x + common.dense(c.d_model, ("heads", "head_dim", "embed"), contract=2, use_bias=False,
                             dtype=dt, name="o")(a)
        h = RMSNorm(c.layer_norm_eps, name="mlp_norm")(x)
        act = common.activation(c.act)
        if c.gated:
            g = act(common.dense(c.d_ff, ("embed", "mlp"), use_bias=False, dtype=dt, name="wi_0")(h))
            h = g * common.dense(c.d_ff, ("embed", "mlp"), use_bias=False, dtype=dt, name="wi_1")(h)
        else:
            h = act(common.dense(c.d_ff, ("embed", "mlp"), use_bias=False, dtype=dt, name="wi")(h))
        x = x + common.dense(c.d_model, ("mlp", "embed"), use_bias=False, dtype=dt, name="wo")(h)
        return nn.with_logical_constraint(x, common.TOKEN_AXES)


class T5Encoder(nn.Module):
    """T5 / umT5 encoder: (ids, mask) -> ``TextOutput(tokens, mask, pooled=masked mean)``.

    ``dtype`` is the matmul compute dtype; the residual stream, norms, softmax and
    outputs stay float32 (T5 activations are large; bfloat16 residuals drift).
    """

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array):
        c = self.config
        x = common.embed(c.vocab_size, c.d_model, ("vocab", "embed"), "shared")(input_ids)
        x = nn.with_logical_constraint(x, common.TOKEN_AXES)
        bias = None if c.per_layer_bias else PositionBias(c, name="position_bias")(input_ids.shape[1])
        attn_mask = common.key_mask(mask)
        for i in range(c.num_layers):
            x = T5Layer(c, self.dtype, name=f"layer_{i}")(x, attn_mask, bias)
        x = RMSNorm(c.layer_norm_eps, name="final_norm")(x)
        return common.finish(x, mask, common.masked_mean(x, mask))


def params_from_hf(state: common.StateDict, config: T5Config) -> dict:
    """Flax params from a HF ``T5EncoderModel`` / ``T5ForConditionalGeneration`` /
    ``UMT5EncoderModel`` state dict (decoder tensors, if any, are ignored).

    ``encoder.block.{i}.layer.0.SelfAttention.q.weight`` -> ``layer_{i}/q/kernel``,
    ``...layer.1.DenseReluDense.wi_0.weight`` -> ``layer_{i}/wi_0/kernel``; the relative
    bias of block 0 (T5) or of every block (umT5) -> ``position_bias``.
    """
    h = config.num_heads
    emb = "shared.weight" if state.has("shared.weight") else "encoder.embed_tokens.weight"
    p: dict = {"shared": state.embedding(emb), "final_norm": {"scale": state["encoder.final_layer_norm.weight"]}}
    rel = "layer.0.SelfAttention.relative_attention_bias.weight"
    if not config.per_layer_bias:
        p["position_bias"] = {"relative_attention_bias": state.embedding(f"encoder.block.0.{rel}")}
    for i in range(config.num_layers):
        pre = f"encoder.block.{i}."
        layer = {
            "attn_norm": {"scale": state[pre + "layer.0.layer_norm.weight"]},
            "q": state.heads_in(pre + "layer.0.SelfAttention.q", h, bias=False),
            "k": state.heads_in(pre + "layer.0.SelfAttention.k", h, bias=False),
            "v": state.heads_in(pre + "layer.0.SelfAttention.v", h, bias=False),
            "o": state.heads_out(pre + "layer.0.SelfAttention.o", h, bias=False),
            "mlp_norm": {"scale": state[pre + "layer.1.layer_norm.weight"]},
            "wo": state.linear(pre + "layer.1.DenseReluDense.wo", bias=False),
        }
        names = ("wi_0", "wi_1") if config.gated else ("wi",)
        for n in names:
            layer[n] = state.linear(pre + f"layer.1.DenseReluDense.{n}", bias=False)
        if config.per_layer_bias:
            layer["position_bias"] = {"relative_attention_bias": state.embedding(pre + rel)}
        p[f"layer_{i}"] = layer
    return p


STATE_PREFIXES = ()


def config_for(hf_config: Mapping[str, Any], state: common.StateDict, **overrides) -> T5Config:
    """The checkpoint's config (T5 or umT5 decided by ``model_type``); its weights decide nothing here."""
    return T5Config.from_hf(hf_config, **overrides)
