"""Tests for vidiff.models.layers: norms, adaLN modulation, sinusoidal and timestep embeddings."""
import jax
import jax.numpy as jnp
import numpy as np

from vidiff.models import layers


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
    # Closed form (DiT / ADM): [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / half), i < half.
    for max_period in (10000.0, 100.0):
        t = np.array([[0.0, 0.25], [1.0, 3.0]])
        freqs = max_period ** (-np.arange(8) / 8)
        expected = np.concatenate([np.cos(t[..., None] * freqs), np.sin(t[..., None] * freqs)], axis=-1)
        got = layers.sinusoidal_embedding(jnp.asarray(t, jnp.float32), 16, max_period=max_period)
        assert got.shape == (2, 2, 16)
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6, rtol=0)
    te = layers.TimestepEmbedder(16)
    tv = te.init(jax.random.key(0), jnp.zeros((2, 3)))
    assert te.apply(tv, jnp.zeros((2, 3))).shape == (2, 3, 16)
    assert tv["params"]["fc1"]["kernel"].names == ("freq", "mlp")


def test_recomputed_norms_keep_only_their_input_for_backward_and_give_the_same_gradients():
    """``recompute=True`` (the DiT's remat ``norms``, the VAE's channel norm): backward keeps the bfloat16
    input alone, where autodiff keeps two float32 copies of it and the statistics."""
    x = jax.random.normal(jax.random.key(0), (64, 128), jnp.bfloat16) * 3 + 1
    cotangent = jax.random.normal(jax.random.key(1), (64, 128), jnp.float32)
    for norm in (layers.layer_norm, layers.rms_normalize):
        saved, grads = {}, {}
        for recompute in (False, True):
            out, backward = jax.vjp(lambda v: norm(v, recompute=recompute), x)  # noqa: B023
            saved[recompute] = sorted((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(backward))
            grads[recompute] = backward(cotangent)[0]
            np.testing.assert_array_equal(out, norm(x))
        assert saved[True] == [((64, 128), "bfloat16")], norm
        assert saved[False].count(((64, 128), "float32")) == 2, (norm, saved[False])
        np.testing.assert_array_equal(grads[True], grads[False])
    variables = layers.RMSNorm().init(jax.random.key(2), x)
    np.testing.assert_array_equal(layers.RMSNorm(recompute=True).apply(variables, x),
                                  layers.RMSNorm().apply(variables, x))
