"""experiments/peer_parity.py without torch: its parameter mapping drives a numpy re-statement of the peer's
block (from the peer's documented equations) to vidiff's block's output, and its list of differences adds up
to XLA's count of the work outside vidiff's blocks (experiments/peer_work.py)."""
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench_scripts import EXPERIMENTS  # (puts experiments/ on sys.path)
import peer_parity  # noqa: E402
import peer_work  # noqa: E402

assert Path(peer_parity.__file__).parent == EXPERIMENTS  # the checkout's script, not another copy


def _ln(x, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _rms(x, w, eps):
    return x / jnp.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def peer_block(s, x, c, txt, heads, ln_eps=peer_parity.PEER_LAYER_NORM_EPS, rms_eps=peer_parity.PEER_RMS_EPS):
    """The peer's Block.forward restated in jax.numpy (differentiable): state dict ``s`` in torch's layout
    (weight (out, in))."""
    def lin(name, v):
        return v @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    def split(v):  # (B, N, d) -> (B, h, N, d/h), as x.view(B, N, h, -1).transpose(1, 2)
        return v.reshape(*v.shape[:2], heads, -1).transpose(0, 2, 1, 3)

    def sdpa(q, k, v):
        logits = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
        p = jnp.exp(logits - logits.max(-1, keepdims=True))
        out = (p / p.sum(-1, keepdims=True)) @ v
        return out.transpose(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1)

    silu_c = c / (1 + jnp.exp(-c))
    s1, c1, g1, s2, c2, g2 = jnp.split(lin("mod", silu_c)[:, None], 6, -1)
    q, k, v = jnp.split(lin("qkv", _ln(x, ln_eps) * (1 + c1) + s1), 3, -1)
    x = x + g1 * lin("proj", sdpa(_rms(split(q), s["qn.w"], rms_eps), _rms(split(k), s["kn.w"], rms_eps), split(v)))
    q = _rms(split(lin("cq", _ln(x, ln_eps))), s["cqn.w"], rms_eps)
    k, v = jnp.split(lin("ckv", txt), 2, -1)
    x = x + lin("cproj", sdpa(q, _rms(split(k), s["ckn.w"], rms_eps), split(v)))
    h = lin("fc1", _ln(x, ln_eps) * (1 + c2) + s2)
    h = 0.5 * h * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return x + g2 * lin("fc2", h)


@pytest.fixture(scope="module")
def block():
    cfg = peer_parity.block_config(64, 4, 1, 64)
    params = peer_parity.random_params(cfg, 0)["blocks_0"]
    rng = np.random.default_rng(1)
    x, c, txt = (rng.standard_normal(s).astype(np.float32) for s in ((2, 12, 64), (2, 64), (2, 5, 64)))
    return cfg, params, x, c, txt


def test_the_mapping_makes_vidiffs_block_the_peers(block):
    cfg, params, x, c, txt = block
    state = peer_parity.peer_state(params)
    assert peer_parity.unmapped(params) == []  # every vidiff block parameter has its place in the peer's Block
    r = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        expected, peer_vjp = jax.vjp(lambda s, *a: peer_block(s, *a, cfg.heads), state, x, c, txt)
        peer_grads = peer_vjp(jnp.asarray(r))
    with peer_parity.peer_eps():
        out, grads = peer_parity.vidiff_vjp(peer_parity.vidiff_block_fn(cfg), params, x, c, txt, r)
    assert peer_parity.difference(out, expected)["max_rel"] < 2e-6
    # The peer's parameter gradients, mapped back to vidiff's layout, are vidiff's.
    theirs = (expected, (peer_parity.vidiff_block_tree(peer_grads[0], params), *peer_grads[1:]))
    compared = peer_parity.compare((out, grads), theirs)
    assert max(v["max_rel"] for v in compared.values()) < 1e-5, compared
    # As vidiff runs, its epsilons (1e-6) differ from torch's defaults: a difference of its own, small.
    as_is = peer_parity.difference(peer_parity.vidiff_block_fn(cfg)(params, x, c, txt), expected)["max_rel"]
    assert 2e-6 < as_is < 1e-4
    # The gradients come back through the inverse mapping: a round trip is the identity.
    back = peer_parity.vidiff_block_tree(state, params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(peer_parity._leaf(back, [k.key for k in path]), leaf)


def test_the_listed_extra_work_is_what_xla_counts_outside_the_blocks():
    cfg = peer_parity.dit_preset("tiny", width=256, heads=4, text_dim=512, pooled_dim=512, latent_channels=16)
    batch, latent_shape, text = 2, (4, 16, 16), 16
    tokens = math.prod(latent_shape) // math.prod(cfg.patch)
    xla = peer_work.xla_count(cfg, batch, latent_shape, text)
    extras = peer_work.differences(cfg, batch, tokens, text)
    outside = sum(e["flops"] for e in extras if e["where"] == "outside")
    assert outside == pytest.approx(xla["outside_blocks"], rel=0.03)
    # Inside a block XLA counts the peer's formula plus the norms, softmax, GELU, RoPE and vidiff's gradients
    # into the text and c: a few percent over the formula, never under it.
    per_block = peer_parity.dit_flops(cfg, tokens, text, batch=batch) // cfg.depth
    assert per_block < xla["per_block"] < 1.1 * per_block
    assert {e["name"] for e in extras} >= {"rope", "text_lengths", "text_projection", "final_layer", "flow_loss"}


def test_bench_dits_flop_count_is_the_peers_formula():
    def peer_model_flops(batch, tokens, text, dim, layers, mlp_ratio=4):  # the peer's docstring formula
        T, L, d, r = tokens, text, dim, mlp_ratio
        per_layer = T * (4 * d * d + 2 * r * d * d + 2 * d * d) + L * 2 * d * d + 2 * T * T * d + 2 * T * L * d
        return 2 * per_layer * layers * batch * 3

    rows = peer_work.flops_check(peer_model_flops)
    assert [(r["batch"], r["tokens"]) for r in rows] == [(4, 4096), (64, 256), (1, 16384)]
    assert all(r["equal"] for r in rows), rows
