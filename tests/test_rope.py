"""Tests for vidiff.models.rope (the head-dim split, RoPE's dependence on relative position only) and
vidiff.models.norm_rope (the q/k norm and RoPE in one pass)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidiff.models import layers, rope
from vidiff.models.norm_rope import rms_norm_rope


def test_rope_axis_dims_are_even_and_cover_head_dim():
    assert rope.rope_axis_dims(16) == (4, 6, 6)
    for head_dim in (16, 64, 72, 128):
        dims = rope.rope_axis_dims(head_dim)
        assert sum(dims) == head_dim and all(d % 2 == 0 and d >= 2 for d in dims)
    with pytest.raises(ValueError, match="rope_fractions"):
        rope.rope_axis_dims(16, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="rope_fractions"):
        rope.rope_axis_dims(4, (0.1, 0.45, 0.45))


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 24
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, head_dim))

    def score(p_q, p_k):
        cq, sq = rope.rope_3d(jnp.array([[p_q]], jnp.float32), head_dim)
        ck, sk = rope.rope_3d(jnp.array([[p_k]], jnp.float32), head_dim)
        return float(jnp.sum(rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk)))

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
    c, s = rope.rope_3d(jnp.array([[[3.0, 1.0, 2.0]]]), head_dim)
    np.testing.assert_allclose(jnp.linalg.norm(rope.apply_rope(q, c, s)), jnp.linalg.norm(q), rtol=1e-5)


def test_rope_frequencies_fall_from_one_radian_per_position():
    """Per axis the pairs turn theta^(-2i/d) radians per unit of position: the first pair fast, the rest slower (a
    sign slip would turn them up to theta^(2i/d), and relative positions would still be all that counts)."""
    cos, sin = rope.rope_3d(jnp.array([[[1.0, 2.0, 3.0]]]), 16)  # (time, height, width) dims (4, 6, 6)
    freqs = [10000.0 ** (-np.arange(0, d, 2) / d) for d in (4, 6, 6)]
    angles = np.concatenate([p * f for p, f in zip((1.0, 2.0, 3.0), freqs)])  # time: [1, 0.01]
    np.testing.assert_allclose(np.asarray(cos)[0, 0, 0], np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin)[0, 0, 0], np.sin(angles), atol=1e-6)


def _norm_then_rope(x, scale, cos, sin):
    """The unfused reference: the RMSNorm's output in ``x``'s dtype, then RoPE."""
    return rope.apply_rope((layers.rms_normalize(x) * scale).astype(x.dtype), cos, sin)


def test_fused_norm_and_rope_equal_the_two_passes_in_value_and_every_gradient():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 12, 3, 16)) * 3 + 1
    scale = 1 + 0.1 * jax.random.normal(keys[1], (16,))
    cos, sin = rope.rope_3d(jax.random.uniform(keys[2], (2, 12, 3)) * 5, 16)
    cotangent = jax.random.normal(keys[3], x.shape)
    np.testing.assert_allclose(rms_norm_rope(x, scale, cos, sin), _norm_then_rope(x, scale, cos, sin), atol=1e-6)
    fused, reference = (jax.vjp(f, x, scale, cos, sin)[1](cotangent) for f in (rms_norm_rope, _norm_then_rope))
    for got, want, shape in zip(fused, reference, (x.shape, (16,), cos.shape, sin.shape)):
        assert got.shape == shape and float(jnp.abs(want).max()) > 1
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert rms_norm_rope(x, scale, cos, sin, 1e-6).dtype == jnp.float32
    # A larger eps is used, not ignored.
    assert float(jnp.abs(rms_norm_rope(x * 1e-3, scale, cos, sin, 1.0)).max()) < 0.1


def test_fused_norm_and_rope_round_once_and_keep_only_the_input_for_backward():
    """bfloat16 queries: one rounding instead of two, and backward keeps the bfloat16 input and one float32
    rsqrt per row, where the two passes keep float32 copies of the whole input."""
    keys = jax.random.split(jax.random.key(1), 3)
    x = (jax.random.normal(keys[0], (2, 32, 4, 16)) * 3 + 1).astype(jnp.bfloat16)
    scale = 1 + 0.1 * jax.random.normal(keys[1], (16,))
    cos, sin = rope.rope_3d(jax.random.uniform(keys[2], (2, 32, 3)) * 5, 16)
    exact = _norm_then_rope(x.astype(jnp.float32), scale, cos, sin)
    fused, unfused = rms_norm_rope(x, scale, cos, sin), _norm_then_rope(x, scale, cos, sin)
    assert fused.dtype == jnp.bfloat16
    error = lambda y: float(jnp.abs(y.astype(jnp.float32) - exact).max())  # noqa: E731
    assert error(fused) < 0.75 * error(unfused), (error(fused), error(unfused))
    saved = {}
    for name, f in (("fused", rms_norm_rope), ("unfused", _norm_then_rope)):
        _, backward = jax.vjp(lambda v: f(v, scale, cos, sin), x)  # noqa: B023
        saved[name] = [(leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(backward) if leaf.size >= x.size]
    assert saved["fused"] == [(x.shape, "bfloat16")], saved
    assert (x.shape, "float32") in saved["unfused"], saved
