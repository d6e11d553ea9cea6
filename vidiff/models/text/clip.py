"""CLIP text transformer in Flax (linen), loading Hugging Face weights.

The CLIP text tower (Stable Diffusion's text encoder, and the pooled vector of
SDXL / SD3) is a GPT-style pre-norm transformer with *causal* self-attention,
learned absolute positions, ``quick_gelu`` (OpenAI) or ``gelu`` (OpenCLIP)
MLPs and a final LayerNorm. Its sentence vector is the final state at the
end-of-text token, optionally mapped by the bias-free ``text_projection`` into
the joint image-text space.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from vidiff.models.text import common


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text hyper-parameters; ``from_hf`` reads a HF CLIP (text) config.json."""

    vocab_size: int = 49408
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 49407
    projection_dim: int | None = None  # None: pooled vector is unprojected (no text_projection)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], **overrides) -> "CLIPTextConfig":
        """From a ``CLIPTextConfig`` dict, or a full ``CLIPConfig`` (its ``text_config``)."""
        text = dict(cfg.get("text_config") or cfg)
        c = cls(
            vocab_size=text.get("vocab_size", 49408),
            hidden_size=text.get("hidden_size", 512),
            num_layers=text.get("num_hidden_layers", 12),
            num_heads=text.get("num_attention_heads", 8),
            intermediate_size=text.get("intermediate_size", 2048),
            max_position_embeddings=text.get("max_position_embeddings", 77),
            layer_norm_eps=text.get("layer_norm_eps", 1e-5),
            hidden_act=text.get("hidden_act", "quick_gelu"),
            eos_token_id=text.get("eos_token_id", 2),
            # A full CLIPConfig's text_config holds transformers' default 512; CLIPModel projects to the top level's.
            projection_dim=(cfg if "projection_dim" in cfg else text).get("projection_dim"),
        )
        common.activation(c.hidden_act)
        return dataclasses.replace(c, **overrides)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the end-of-text token in each row.

    Configs written before transformers PR #24773 say ``eos_token_id=2``; for those
    the reference takes the largest id (CLIP's end-of-text is the last vocabulary
    entry). Otherwise: the first occurrence of ``eos_token_id`` (pads may equal it).
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPLayer(nn.Module):
    """Pre-norm block: x += Attn(LN x) (causal); x += MLP(LN x)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
        c, dt = self.config, self.dtype
        heads, axes = (c.num_heads, c.head_dim), ("embed", "heads", "head_dim")
        h = common.layer_norm(c.layer_norm_eps, "layer_norm1")(x)
        q = common.dense(heads, axes, dtype=dt, name="q_proj")(h)
        k = common.dense(heads, axes, dtype=dt, name="k_proj")(h)
        v = common.dense(heads, axes, dtype=dt, name="v_proj")(h)
        a = common.attention(q, k, v, mask=attn_mask)
        x = x + common.dense(c.hidden_size, ("heads", "head_dim", "embed"), contract=2, dtype=dt, name="out_proj")(a)
        h = common.layer_norm(c.layer_norm_eps, "layer_norm2")(x)
        h = common.activation(c.hidden_act)(common.dense(c.intermediate_size, ("embed", "mlp"), dtype=dt, name="fc1")(h))
        x = x + common.dense(c.hidden_size, ("mlp", "embed"), dtype=dt, name="fc2")(h)
        return nn.with_logical_constraint(x, common.TOKEN_AXES)


class CLIPTextEncoder(nn.Module):
    """CLIP text model: (ids, mask) -> ``TextOutput(tokens, mask, pooled=EOS features)``.

    Attention is causal and additionally ignores padded keys (as the reference does
    when given an attention mask); with right padding, real tokens never see pads.
    ``tokens`` are the final-LayerNorm states; ``pooled`` is projected when the config
    has a ``projection_dim``.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array):
        c = self.config
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(f"clip: sequence length {length} > max_position_embeddings {c.max_position_embeddings}")
        x = common.embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), "token_embedding")(input_ids)
        x = x + common.embed(c.max_position_embeddings, c.hidden_size, (None, "embed"),
                             "position_embedding")(jnp.arange(length))[None]
        x = nn.with_logical_constraint(x, common.TOKEN_AXES)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        attn_mask = causal & common.key_mask(mask)
        for i in range(c.num_layers):
            x = CLIPLayer(c, self.dtype, name=f"layer_{i}")(x, attn_mask)
        x = common.layer_norm(c.layer_norm_eps, "final_layer_norm")(x)
        pooled = x[jnp.arange(x.shape[0]), eos_positions(input_ids, c.eos_token_id)]
        if c.projection_dim is not None:
            pooled = common.dense(c.projection_dim, ("embed", None), use_bias=False, dtype=jnp.float32,
                                  name="text_projection")(pooled)
        return common.finish(x, mask, pooled)


def params_from_hf(state: common.StateDict, config: CLIPTextConfig) -> dict:
    """Flax params from a HF ``CLIPTextModel(WithProjection)`` or full ``CLIPModel`` state
    dict (``text_model.`` prefixes accepted, vision tensors ignored).

    ``text_model.encoder.layers.{i}.self_attn.q_proj.weight`` -> ``layer_{i}/q_proj/kernel``;
    ``text_projection.weight`` -> ``text_projection/kernel`` when the config projects.
    """
    h = config.num_heads
    p: dict = {
        "token_embedding": state.embedding("embeddings.token_embedding.weight"),
        "position_embedding": state.embedding("embeddings.position_embedding.weight"),
        "final_layer_norm": state.norm("final_layer_norm"),
    }
    for i in range(config.num_layers):
        pre = f"encoder.layers.{i}."
        p[f"layer_{i}"] = {
            "layer_norm1": state.norm(pre + "layer_norm1"),
            "q_proj": state.heads_in(pre + "self_attn.q_proj", h),
            "k_proj": state.heads_in(pre + "self_attn.k_proj", h),
            "v_proj": state.heads_in(pre + "self_attn.v_proj", h),
            "out_proj": state.heads_out(pre + "self_attn.out_proj", h),
            "layer_norm2": state.norm(pre + "layer_norm2"),
            "fc1": state.linear(pre + "mlp.fc1"),
            "fc2": state.linear(pre + "mlp.fc2"),
        }
    if config.projection_dim is not None:
        p["text_projection"] = state.linear("text_projection", bias=False)
    return p


STATE_PREFIXES = ("text_model.",)


def config_for(hf_config: Mapping[str, Any], state: common.StateDict, **overrides) -> CLIPTextConfig:
    """The checkpoint's config. ``CLIPTextConfig`` defaults ``projection_dim`` even for models without a
    projection (SD's text encoder), so the weights' names decide (their data is not read)."""
    config = CLIPTextConfig.from_hf(hf_config, **overrides)
    if not state.has("text_projection.weight"):
        config = dataclasses.replace(config, projection_dim=None)
    return config
