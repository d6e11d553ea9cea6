"""Tests for vidiff.models.attention: the attention core and its masks, the registry, joint attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vidiff.models import attention

# One compile per call signature instead of one per primitive in eager mode.
jit_attention = jax.jit(attention.attention, static_argnames=("implementation", "pad_head_dim"))


def _qkv(key, b=2, t=6, s=6, h=2, d=8):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, t, h, d)), jax.random.normal(kk, (b, s, h, d)),
            jax.random.normal(kv, (b, s, h, d)))


def test_attention_kv_lengths_equal_key_mask_and_truncation():
    q, k, v = _qkv(jax.random.key(1))
    lengths = jnp.array([3, 6], jnp.int32)
    by_length = jit_attention(q, k, v, kv_lengths=lengths)
    by_mask = jit_attention(q, k, v, mask=jnp.arange(6)[None] < lengths[:, None])
    np.testing.assert_allclose(by_length, by_mask, atol=1e-5)
    truncated = jit_attention(q[:1], k[:1, :3], v[:1, :3])
    np.testing.assert_allclose(by_length[:1], truncated, atol=1e-5)
    # A (T, S) mask is not a key mask: given 2-D it is refused, given as (1, 1, T, S) it masks queries and keys.
    causal = jnp.tril(jnp.ones((6, 6), bool))
    with pytest.raises(ValueError, match=r"^mask: a 2-D mask is a key mask \(batch 2, keys 6\), got \(6, 6\); give "
                                         r"a mask over queries and keys as \(1, 1, T, S\)$"):
        attention.attention(q, k, v, mask=causal)
    first = jit_attention(q, k, v, mask=causal[None, None])[:, 0]  # query 0 sees key 0 alone
    np.testing.assert_allclose(first, v[:, 0], atol=1e-5)


def test_attention_segment_ids_match_separate_sequences():
    q, k, v = _qkv(jax.random.key(2), b=1, t=7, s=7)
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    packed = jit_attention(q, k, v, segment_ids=ids)
    np.testing.assert_allclose(packed[:, :3], jit_attention(q[:, :3], k[:, :3], v[:, :3]), atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:], jit_attention(q[:, 3:], k[:, 3:], v[:, 3:]), atol=1e-5)
    # Cross-attention style: queries and keys carry their own ids.
    kv_ids = jnp.array([[1, 1, 0, 0, 0, 1, 1]])
    cross = jit_attention(q, k, v, segment_ids=ids, kv_segment_ids=kv_ids)
    np.testing.assert_allclose(cross[:, :3], jit_attention(q[:, :3], k[:, 2:5], v[:, 2:5]), atol=1e-5)


def test_padded_heads_give_the_same_attention_and_gradients(monkeypatch):
    q, k, v = _qkv(jax.random.key(4), d=9)
    lengths = jnp.array([4, 6], jnp.int32)
    loss = lambda pad: lambda q, k, v: jnp.sum(  # noqa: E731
        jnp.sin(jit_attention(q, k, v, kv_lengths=lengths, pad_head_dim=pad)))
    plain, padded = jit_attention(q, k, v, kv_lengths=lengths), jit_attention(q, k, v, kv_lengths=lengths,
                                                                               pad_head_dim=16)
    assert padded.shape == q.shape
    np.testing.assert_allclose(padded, plain, atol=1e-6)
    grads = [jax.grad(loss(pad), argnums=(0, 1, 2))(q, k, v) for pad in (16, None)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(jit_attention(q, k, v, pad_head_dim=9), jit_attention(q, k, v), atol=1e-6)
    with pytest.raises(ValueError, match=r"pad_head_dim=8 needs .* a size >= the head dim 9"):
        attention.attention(q, k, v, pad_head_dim=8)
    monkeypatch.setattr(attention, "_ATTENTION_IMPLS", {"ring": lambda *a, **k: None})
    with pytest.raises(ValueError, match=r"pad_head_dim=16 needs an implementation 'xla' or 'cudnn' \(got 'ring'\)"):
        attention.attention(q, k, v, pad_head_dim=16, implementation="ring")


def test_attention_implementations_resolve_and_register(monkeypatch):
    # Registering writes the module's registries: work on copies that are put back after the test.
    monkeypatch.setattr(attention, "_ATTENTION_IMPLS", dict(attention._ATTENTION_IMPLS))
    monkeypatch.setattr(attention, "_LOCAL_IMPLS", dict(attention._LOCAL_IMPLS))
    assert attention.resolve_attention_impl(None, jnp.float32, 64) == "xla"  # CPU / float32
    with pytest.raises(ValueError, match="attention_impl"):
        attention.resolve_attention_impl("ring?", jnp.float32, 64)
    with pytest.raises(ValueError, match="reserved"):
        attention.register_attention_impl("xla", lambda *a, **k: None)
    seen = {}

    def fake(q, k, v, **kwargs):
        seen.update(kwargs)
        return jnp.zeros_like(q)

    attention.register_attention_impl("test_fake", fake)
    assert attention.resolve_attention_impl("test_fake", jnp.float32, 64) == "test_fake"
    assert attention.local_attention_impl("test_fake") == "test_fake"  # local="self" by default
    q, k, v = _qkv(jax.random.key(3))
    out = attention.attention(q, k, v, kv_lengths=jnp.array([2, 3]), implementation="test_fake")
    assert out.shape == q.shape and set(seen) == {"mask", "kv_lengths", "segment_ids", "kv_segment_ids"}


def test_joint_attention_uses_text_lengths_like_a_mask():
    x = jax.random.normal(jax.random.key(6), (2, 5, 16))
    txt = jax.random.normal(jax.random.key(7), (2, 4, 16))
    mod = attention.JointAttention(heads=2, head_dim=8)
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
