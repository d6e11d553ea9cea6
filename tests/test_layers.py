"""Tests for vidiff.models.layers: RoPE, the attention core and its masks, norms, modulation, embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vidiff.models import layers

# One compile per call signature instead of one per primitive in eager mode.
attention = jax.jit(layers.attention, static_argnames="implementation")


def _qkv(key, b=2, t=6, s=6, h=2, d=8):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, s, h, d)),
            jax.random.normal(kv, (b, s, h, d)))


def test_rope_axis_dims_are_even_and_cover_head_dim():
    assert layers.rope_axis_dims(16) == (4, 6, 6)
    for head_dim in (16, 64, 72, 128):
        dims = layers.rope_axis_dims(head_dim)
        assert sum(dims) == head_dim and all(d % 2 == 0 and d >= 2 for d in dims)
    with pytest.raises(ValueError, match="rope_fractions"):
        layers.rope_axis_dims(16, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="rope_fractions"):
        layers.rope_axis_dims(4, (0.1, 0.45, 0.45))


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 24
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, head_dim))

    def score(p_q, p_k):
        cq, sq = layers.rope_3d(jnp.array([[p_q]], jnp.float32), head_dim)
        ck, sk = layers.rope_3d(jnp.array([[p_k]], jnp.float32), head_dim)
        return float(jnp.sum(layers.apply_rope(q, cq, sq) * layers.apply_rope(k, ck, sk)))

    base = score((1, 2, 3), (4, 0, 7))
    for shift in [(5, -3, 11), (0.5, 2.25, -1.5), (100, 40, 40)]:
        shifted = score(tuple(a + s for a, s in zip((1, 2, 3), shift)), tuple(a + s for a, s in zip((4, 0, 7), shift)))
        assert shifted == pytest.approx(base, rel=1e-4, abs=1e-4)
    # ...and each axis matters: a different offset on any single axis changes the score.
    for axis in range(3):
        moved = [4, 0, 7]
        moved[axis] += 1
        assert abs(score((1, 2, 3), tuple(moved)) - base) > 1e-4
    # Rotation keeps norms.
    c, s = layers.rope_3d(jnp.array([[[3.0, 1.0, 2.0]]]), head_dim)
    np.testing.assert_allclose(jnp.linalg.norm(layers.apply_rope(q, c, s)), jnp.linalg.norm(q), rtol=1e-5)


def test_attention_kv_lengths_equal_key_mask_and_truncation():
    q, k, v = _qkv(jax.random.key(1))
    lengths = jnp.array([3, 6], jnp.int32)
    by_length = attention(q, k, v, kv_lengths=lengths)
    by_mask = attention(q, k, v, mask=jnp.arange(6)[None] < lengths[:, None])
    np.testing.assert_allclose(by_length, by_mask, atol=1e-5)
    truncated = attention(q[:1], k[:1, :3], v[:1, :3])
    np.testing.assert_allclose(by_length[:1], truncated, atol=1e-5)


def test_attention_segment_ids_match_separate_sequences():
    q, k, v = _qkv(jax.random.key(2), b=1, t=7, s=7)
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    packed = attention(q, k, v, segment_ids=ids)
    np.testing.assert_allclose(packed[:, :3], attention(q[:, :3], k[:, :3], v[:, :3]), atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:], attention(q[:, 3:], k[:, 3:], v[:, 3:]), atol=1e-5)
    # Cross-attention style: queries and keys carry their own ids.
    kv_ids = jnp.array([[1, 1, 0, 0, 0, 1, 1]])
    cross = attention(q, k, v, segment_ids=ids, kv_segment_ids=kv_ids)
    np.testing.assert_allclose(cross[:, :3], attention(q[:, :3], k[:, 2:5], v[:, 2:5]), atol=1e-5)


def test_attention_implementations_resolve_and_register():
    assert layers.resolve_attention_impl(None, jnp.float32, 64) == "xla"  # CPU / float32
    with pytest.raises(ValueError, match="attention_impl"):
        layers.resolve_attention_impl("ring?", jnp.float32, 64)
    with pytest.raises(ValueError, match="reserved"):
        layers.register_attention_impl("xla", lambda *a, **k: None)
    seen = {}

    def fake(q, k, v, **kwargs):
        seen.update(kwargs)
        return jnp.zeros_like(q)

    layers.register_attention_impl("test_fake", fake)
    q, k, v = _qkv(jax.random.key(3))
    out = layers.attention(q, k, v, kv_lengths=jnp.array([2, 3]), implementation="test_fake")
    assert out.shape == q.shape and set(seen) == {"mask", "kv_lengths", "segment_ids", "kv_segment_ids"}


def test_norms_modulation_and_embeddings():
    x = jax.random.normal(jax.random.key(4), (2, 5, 3, 8)) * 7 + 2
    norm = layers.RMSNorm()
    variables = norm.init(jax.random.key(0), x)
    assert variables["params"]["scale"].names == ("head_dim",)
    y = norm.apply(variables, x)
    np.testing.assert_allclose(jnp.mean(y**2, -1), 1.0, rtol=1e-3)
    ln = layers.layer_norm(x)
    np.testing.assert_allclose(jnp.mean(ln, -1), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(ln, -1), 1.0, rtol=1e-3)

    cond = jax.random.normal(jax.random.key(5), (2, 1, 16))
    mod = layers.Modulation(6, 16)
    mv = mod.init(jax.random.key(0), cond)
    assert mv["params"]["proj"]["kernel"].names == ("embed", "mod")
    assert float(jnp.abs(mod.apply(mv, cond)).max()) == 0.0  # adaLN-Zero

    emb = layers.sinusoidal_embedding(jnp.array([0.0, 0.5, 1.0]) * 1000, 32)
    assert emb.shape == (3, 32) and float(jnp.abs(emb[0] - emb[2]).max()) > 0.1
    te = layers.TimestepEmbedder(16)
    tv = te.init(jax.random.key(0), jnp.zeros((2, 3)))
    assert te.apply(tv, jnp.zeros((2, 3))).shape == (2, 3, 16)
    assert tv["params"]["fc1"]["kernel"].names == ("freq", "mlp")


def test_joint_attention_uses_text_lengths_like_a_mask():
    x = jax.random.normal(jax.random.key(6), (2, 5, 16))
    txt = jax.random.normal(jax.random.key(7), (2, 4, 16))
    mod = layers.JointAttention(heads=2, head_dim=8)
    variables = mod.init(jax.random.key(0), x, txt)
    lengths = jnp.array([2, 4])
    apply = jax.jit(mod.apply)
    by_length = apply(variables, x, txt, text_lengths=lengths)
    by_mask = apply(variables, x, txt, text_mask=jnp.arange(4)[None] < lengths[:, None])
    np.testing.assert_allclose(by_length[0], by_mask[0], atol=1e-5)
    changed = txt.at[0, 2:].set(100.0)
    np.testing.assert_allclose(apply(variables, x, changed, text_lengths=lengths)[0], by_length[0], atol=1e-5)
    for leaf in jax.tree_util.tree_leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned)
