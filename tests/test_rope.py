"""Tests for vidiff.models.rope: the head-dim split and RoPE's dependence on relative position only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidiff.models import rope


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
