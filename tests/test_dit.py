"""Tests for vidiff.models.dit: shapes, zero/identity init, packing, masks, logical names, scan, remat, dtypes."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vidiff import parallel
from vidiff.models import dit, patches
from vidiff.models.attention import Attention
from vidiff.models.block_layout import with_block_layout
from vidiff.models.rope import rope_3d

CFG = dit.dit_preset("tiny", text_dim=32, pooled_dim=24)
# Shapes reused across tests so each compiled program is shared (compiles dominate test time on CPU).
SHAPES = [(1, 1, 4, 4), (2, 3, 4, 8), (1, 5, 8, 4)]


@functools.lru_cache(maxsize=None)
def _variables(cfg=CFG):
    # The rbg PRNG compiles much faster on CPU than threefry; the values do not matter here.
    return nn.unbox(jax.jit(dit.VideoDiT(cfg).init)(jax.random.key(0, impl="rbg"), *dit.dummy_inputs(cfg)))


def _perturb(tree, seed=1):
    """Training-like weights: every parameter moved off its (often zero) init (host-side, no compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), tree)


@functools.lru_cache(maxsize=None)
def _trained(cfg=CFG):
    return _perturb(_variables(cfg))


@functools.lru_cache(maxsize=None)
def _apply(cfg=CFG):
    return jax.jit(dit.VideoDiT(cfg).apply)


def _inputs(seed, shape, text_len=6, cfg=CFG):
    """Random (x_t, t, text, text_lengths, pooled) in numpy (no per-shape device RNG compiles)."""
    rng, b = np.random.default_rng(seed), shape[0]
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return (f32(*shape, cfg.latent_channels), rng.uniform(size=b).astype(np.float32), f32(b, text_len, cfg.text_dim),
            np.full((b,), text_len, np.int32), f32(b, cfg.pooled_dim))


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_zero_output_at_init(shape):
    args = _inputs(0, shape)
    out = _apply()(_variables(), *args)
    assert out.shape == args[0].shape
    assert float(jnp.abs(out).max()) == 0.0  # zero-initialised output layer and gates
    trained = _apply()(_trained(), *args)
    assert trained.shape == args[0].shape and bool(jnp.all(jnp.isfinite(trained)))
    assert float(jnp.abs(trained).max()) > 0


@pytest.mark.parametrize("text_mode", ["cross", "joint"])
def test_every_block_is_identity_at_init(text_mode):
    cfg = dataclasses.replace(CFG, text_mode=text_mode)
    fresh = _variables(cfg)["params"]
    # Trained-like embeddings (so block inputs are rich), blocks exactly at init.
    params = {k: (v if k.startswith("blocks") else _trained(cfg)["params"][k]) for k, v in fresh.items()}
    capture = jax.jit(functools.partial(dit.VideoDiT(cfg).apply, capture_intermediates=True))
    _, state = capture({"params": params}, *_inputs(1, SHAPES[0]))
    inter = state["intermediates"]
    x0 = inter["patch_embed"]["__call__"][0]
    (x1, t1), _ = inter["blocks_0"]["__call__"][0]
    (x2, t2), _ = inter["blocks_1"]["__call__"][0]
    assert float(jnp.abs(x0).max()) > 0
    np.testing.assert_array_equal(x1, x0.astype(jnp.float32))
    np.testing.assert_array_equal(x2, x1)
    np.testing.assert_array_equal(t2, t1)


def _layer_norm(x):
    return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)


def _adaln(params, cond, count):
    """``count`` (shift, scale, gate, ...) vectors from the conditioning, and the modulated norm they make."""
    mods = jnp.split(jax.nn.silu(cond) @ params["proj"]["kernel"] + params["proj"]["bias"], count, axis=-1)
    return mods, lambda y, shift, scale: _layer_norm(y) * (1 + scale) + shift


@jax.jit
def _adaln_zero_reference(params, cond, x1, txt, lengths, positions, x2):
    """Block 1 (cross text mode) on its input ``x1`` and the final layer on ``x2``, written from the parameters."""
    block = params["blocks_1"]
    (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), modulate = _adaln(block["modulation"], cond, 6)
    rope = rope_3d(positions, CFG.head_dim, CFG.rope_fractions, CFG.rope_theta)
    attention = Attention(CFG.heads, CFG.head_dim)  # checked on its own in test_attention.py
    y = x1 + gate_a * attention.apply({"params": block["self_attn"]}, modulate(x1, shift_a, scale_a), rope=rope)
    y = y + attention.apply({"params": block["cross_attn"]}, _layer_norm(y), txt, kv_lengths=lengths)
    mlp = block["mlp"]
    hidden = jax.nn.gelu(modulate(y, shift_m, scale_m) @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"], approximate=True)
    y = y + gate_m * (hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"])
    final = params["final_layer"]
    (shift, scale), modulate = _adaln(final["modulation"], cond, 2)
    return y, modulate(x2, shift, scale) @ final["proj"]["kernel"] + final["proj"]["bias"]


def test_a_block_and_the_final_layer_compute_adaln_zero():
    """Trained-like weights against a reference written from the parameters: each branch sees the norm of the
    stream shifted and scaled by its own modulation (x (1 + scale) + shift), the branch's output is gated, and the
    final layer modulates before its projection. (At init every gate is 0, so only such weights tell.)"""
    x, t, text, lengths, pooled = _inputs(8, SHAPES[1])
    capture = jax.jit(functools.partial(dit.VideoDiT(CFG).apply, capture_intermediates=True))
    out, state = capture(_trained(), x, t, text, lengths, pooled)
    inter = state["intermediates"]
    cond = inter["time_embed"]["__call__"][0] + inter["pooled_embed"]["__call__"][0]  # (B, 1, D)
    (x1, txt), _ = inter["blocks_0"]["__call__"][0]
    (x2, _), _ = inter["blocks_1"]["__call__"][0]
    positions = np.broadcast_to(patches.patch_positions((3, 2, 4)), (2, 24, 3))
    block, tokens = _adaln_zero_reference(_trained()["params"], cond, x1, txt, lengths, positions, x2)
    np.testing.assert_allclose(x2, block, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(inter["final_layer"]["__call__"][0], tokens, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out, patches.unpatchify(tokens, CFG.patch, x.shape[1:4]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def packed_case():
    """Two clips of different shapes, captions and times, run separately and packed into one row."""
    clips = [_inputs(2, SHAPES[2]), _inputs(3, SHAPES[0])]
    valid = [4, 6]  # clip 0's caption has 2 padding tokens
    clips[0] = clips[0][:3] + (np.array([valid[0]], np.int32),) + clips[0][4:]
    separate = [_apply()(_trained(), *c) for c in clips]
    forward = jax.jit(functools.partial(dit.VideoDiT(CFG).apply, method=dit.VideoDiT.forward_tokens))

    def run_packed(clips):
        model_in = [np.asarray(dit.concat_conditioning(c[0]))[0] for c in clips]
        row = patches.pack_clips(model_in, CFG.patch, length=48)
        text, text_ids = patches.pack_texts([c[2][0, :n] for c, n in zip(clips, valid)], length=12)
        out = forward(_trained(), row.tokens[None], np.stack([c[1][0] for c in clips])[None], text[None], None,
                      np.stack([c[4][0] for c in clips])[None], positions=row.positions[None],
                      segment_ids=row.segment_ids[None], text_segment_ids=text_ids[None])
        return patches.unpack_clips(np.asarray(out[0]), row.shapes, CFG.patch)

    return clips, separate, run_packed


def test_packed_equals_separate(packed_case):
    clips, separate, run_packed = packed_case
    for got, want in zip(run_packed(clips), separate):
        assert float(jnp.abs(want).max()) > 1e-3
        np.testing.assert_allclose(got, want[0], atol=2e-5, rtol=1e-4)


def test_packed_inputs_that_would_be_ignored_are_refused():
    """Text segment ids act only through the video's: without them the padded text (-1) would be attended."""
    clip = _inputs(2, SHAPES[0])
    row = patches.pack_clips([np.asarray(dit.concat_conditioning(clip[0]))[0]], CFG.patch, length=16)
    text, text_ids = patches.pack_texts([clip[2][0, :4]], length=6)
    with pytest.raises(ValueError, match="^length: 0 is shorter than the 4 tokens of the packed clips$"):
        patches.pack_clips([np.asarray(dit.concat_conditioning(clip[0]))[0]], CFG.patch, length=0)  # not "no pad"
    with pytest.raises(ValueError, match="^length: 0 is shorter than the 4 packed text tokens$"):
        patches.pack_texts([clip[2][0, :4]], length=0)
    forward = functools.partial(dit.VideoDiT(CFG).apply, _trained(), method=dit.VideoDiT.forward_tokens)
    args = (row.tokens[None], clip[1][:1], text[None], None, clip[4][:1])
    with pytest.raises(ValueError, match=r"^text_segment_ids: given without segment_ids; pass segment_ids \(B, N\)"):
        forward(*args, positions=row.positions[None], text_segment_ids=text_ids[None])
    with pytest.raises(ValueError, match=r"^positions: need per-token RoPE positions of shape \(1, 16, 3\), got "
                                         r"\(1, 16, 2\)"):
        forward(*args, positions=row.positions[None][..., :2], segment_ids=row.segment_ids[None])


def test_packed_segments_are_isolated(packed_case):
    clips, _, run_packed = packed_case
    before = run_packed(clips)
    x, t, text, lengths, pooled = clips[1]
    after = run_packed([clips[0], (x * 3 + 1, t * 0.5, text - 2, lengths, pooled + 1)])
    np.testing.assert_array_equal(after[0], before[0])
    assert float(np.abs(after[1] - before[1]).max()) > 1e-3


@pytest.mark.parametrize("text_mode", ["cross", "joint"])
def test_padded_text_tokens_change_nothing(text_mode):
    cfg = dataclasses.replace(CFG, text_mode=text_mode)
    x, t, text, _, pooled = _inputs(4, SHAPES[1])
    lengths = np.array([2, 6], np.int32)
    noisy = text.copy()
    noisy[0, 2:] = np.random.default_rng(5).standard_normal((4, cfg.text_dim)) * 5
    apply, variables = _apply(cfg), _trained(cfg)
    base = apply(variables, x, t, text, lengths, pooled)
    np.testing.assert_allclose(apply(variables, x, t, noisy, lengths, pooled), base, atol=1e-5)
    mask = np.arange(6)[None] < lengths[:, None]
    np.testing.assert_allclose(apply(variables, x, t, noisy, mask, pooled), base, atol=1e-5)
    # ...whereas a valid text token does matter.
    changed = text.copy()
    changed[0, 0] += 1.0
    assert float(jnp.abs(apply(variables, x, t, changed, lengths, pooled) - base)[0].max()) > 1e-4


def _boxes(variables):
    return jax.tree_util.tree_leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))


@pytest.mark.parametrize("overrides", [{}, {"scan_blocks": True}, {"text_mode": "joint", "scan_blocks": True}])
def test_every_parameter_has_logical_axis_names(overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    shapes = jax.eval_shape(dit.VideoDiT(cfg).init, jax.random.key(0), *dit.dummy_inputs(cfg))
    known = {name for name, _ in parallel.LOGICAL_RULES}
    boxes = _boxes(shapes)
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    for box in boxes:
        assert len(box.names) == box.value.ndim and set(box.names) <= known, box
    if cfg.scan_blocks:
        assert all(b.names[0] == "layers" and b.value.shape[0] == cfg.depth for b in _boxes(shapes["params"]["blocks"]))


def _stack_blocks(params, depth):
    """Unscanned params (blocks_0..) -> scanned layout (blocks with a leading layers axis)."""
    return with_block_layout(params, dataclasses.replace(CFG, depth=depth, scan_blocks=True))


@pytest.mark.parametrize("text_mode", ["cross", "joint"])
def test_scanned_blocks_match_unscanned(text_mode):
    cfg = dataclasses.replace(CFG, text_mode=text_mode)
    args = _inputs(5, SHAPES[1])
    want = _apply(cfg)(_trained(cfg), *args)
    scanned = {"params": _stack_blocks(_trained(cfg)["params"], cfg.depth)}
    got = _apply(dataclasses.replace(cfg, scan_blocks=True))(scanned, *args)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["none", "block"])
def test_a_scan_unrolled_whole_is_the_same_network(policy):
    """scan_unroll=depth: stacked weights, straight-line program; values and gradients as the loop's."""
    args = _inputs(7, SHAPES[0])
    params = {"params": _stack_blocks(_trained()["params"], CFG.depth)}
    results = []
    for unroll in (1, CFG.depth):
        model = dit.VideoDiT(dataclasses.replace(CFG, remat_policy=policy, scan_blocks=True, scan_unroll=unroll))
        loss = lambda p: jnp.mean(jnp.square(model.apply(p, *args)))  # noqa: E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
        if unroll > 1:  # no loop left in the program: the blocks run one after another
            assert "while" not in jax.jit(loss).lower(params).as_text()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)


def test_block_layout_converts_both_ways_and_leaves_other_depths_alone():
    unrolled = _trained()["params"]
    scanned_cfg = dataclasses.replace(CFG, scan_blocks=True)
    scanned = with_block_layout(unrolled, scanned_cfg)
    # Exactly the tree a scanned model initialises, and the blocks' values layer by layer.
    init_shapes = jax.eval_shape(dit.VideoDiT(scanned_cfg).init, jax.random.key(0), *dit.dummy_inputs(scanned_cfg))
    assert jax.tree.map(np.shape, scanned) == jax.tree.map(np.shape, nn.unbox(init_shapes)["params"])
    query = unrolled["blocks_1"]["self_attn"]["query"]["kernel"]
    np.testing.assert_array_equal(scanned["blocks"]["self_attn"]["query"]["kernel"][1], query)
    back = with_block_layout(scanned, CFG)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    jax.tree.map(np.testing.assert_array_equal, back, unrolled)
    assert with_block_layout(unrolled, CFG) is unrolled  # already laid out: untouched
    deeper = dataclasses.replace(CFG, depth=CFG.depth + 1)
    assert with_block_layout(unrolled, dataclasses.replace(deeper, scan_blocks=True)) is unrolled
    assert with_block_layout(scanned, deeper) is scanned  # x[depth] would clamp, not fail
    shallower = dataclasses.replace(CFG, depth=CFG.depth - 1, scan_blocks=True)
    assert with_block_layout(unrolled, shallower) is unrolled  # stacking the first blocks would drop the last


@pytest.mark.parametrize("text_mode", ["cross", "joint"])
def test_init_params_gives_one_network_in_either_layout_named_as_a_direct_init(text_mode):
    """init_params always draws through the scan (one block's random kernels to compile): one seed, the same
    values in both layouts, and the logical names VideoDiT.init gives each layout."""
    unrolled_cfg = dataclasses.replace(CFG, text_mode=text_mode)
    scanned_cfg = dataclasses.replace(unrolled_cfg, scan_blocks=True)
    unrolled, scanned = (dit.init_params(cfg, jax.random.key(3)) for cfg in (unrolled_cfg, scanned_cfg))
    for cfg, params in ((unrolled_cfg, unrolled), (scanned_cfg, scanned)):
        direct = jax.eval_shape(dit.VideoDiT(cfg).init, jax.random.key(0), *dit.dummy_inputs(cfg))["params"]
        assert nn.get_partition_spec(params) == nn.get_partition_spec(direct)
        assert jax.tree.map(np.shape, nn.unbox(params)) == jax.tree.map(np.shape, nn.unbox(direct))
    jax.tree.map(np.testing.assert_array_equal, with_block_layout(nn.unbox(scanned), unrolled_cfg),
                 nn.unbox(unrolled))
    first, second = (jax.tree.leaves(nn.unbox(unrolled)[f"blocks_{i}"]) for i in (0, 1))
    assert sum(not np.array_equal(a, b) for a, b in zip(first, second)) >= 4  # each block its own draws


@pytest.mark.slow
def test_remat_policies_give_identical_values_and_gradients():
    args = _inputs(6, SHAPES[0])
    results = {}
    for policy, scan in (("none", False), ("norms", False), ("block", False), ("attention", False), ("dots", False),
                         ("dots", True)):
        model = dit.VideoDiT(dataclasses.replace(CFG, remat_policy=policy, scan_blocks=scan))
        params = {"params": _stack_blocks(_trained()["params"], CFG.depth)} if scan else _trained()
        loss = lambda p: jnp.mean(jnp.square(model.apply(p, *args)))  # noqa: E731
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        if scan:  # back to the unscanned layout to compare
            grads = {"params": with_block_layout(grads["params"], CFG)}
        results[policy, scan] = (value, grads)
    for key in (("norms", False), ("block", False), ("attention", False), ("dots", False), ("dots", True)):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                               results[key], results["none", False])


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_the_flash_attention_kernels_outputs(monkeypatch, scan):
    """On a GPU, ``attention`` and ``dots`` remat must not run cuDNN's T^2 forward kernel again in the backward pass.

    Checked without a GPU: with cuDNN's version checks stubbed, the gradient is lowered for CUDA on the CPU
    (nothing is compiled) and its fused-attention calls are counted.
    """
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not all(hasattr(fused, hook) for hook in ("check_cudnn_version", "check_compute_capability")):
        pytest.skip("this jax has no cuDNN version checks to stub")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    args = _inputs(6, SHAPES[0])
    counts = {}
    for policy in ("none", "norms", "block", "attention", "dots"):
        model = dit.VideoDiT(dataclasses.replace(CFG, remat_policy=policy, scan_blocks=scan, dtype="bfloat16",
                                                 attention_impl="cudnn"))
        params = jax.eval_shape(model.init, jax.random.key(0), *args)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, *args))))  # noqa: B023
        cuda = grad.trace(params).lower(lowering_platforms=("cuda",)).as_text()
        counts[policy] = (cuda.count("@__cudnn$fmhaSoftmax("), cuda.count("@__cudnn$fmhaSoftmaxBackward("))
    kernels = 2 if scan else 2 * CFG.depth  # self- and cross-attention per block; a scanned body holds one block
    assert counts == {"none": (kernels, kernels), "norms": (kernels, kernels), "block": (2 * kernels, kernels),
                      "attention": (kernels, kernels), "dots": (kernels, kernels)}


def test_remat_norms_keeps_the_norms_inputs_instead_of_their_float32_copies():
    """Remat ``norms`` (no block remat): under bfloat16 compute, backward keeps each norm's bfloat16 input
    where ``none`` keeps float32 copies and statistics; every other residual is the same."""
    args = _inputs(6, SHAPES[0])
    saved = {}
    for policy in ("none", "norms"):
        model = dit.VideoDiT(dataclasses.replace(CFG, remat_policy=policy, dtype="bfloat16"))
        _, backward = jax.vjp(lambda p: model.apply(p, *args), _trained())  # noqa: B023
        leaves = [leaf for leaf in jax.tree.leaves(backward) if leaf.ndim >= 2]
        saved[policy] = {dtype: sum(leaf.nbytes for leaf in leaves if leaf.dtype == dtype)
                         for dtype in (jnp.float32, jnp.bfloat16)}
    # Per block (cross mode): 3 layer norms and 4 q/k norms, each saving two float32 copies of its input.
    assert saved["norms"][jnp.float32] < saved["none"][jnp.float32] / 2, saved
    assert sum(saved["norms"].values()) < sum(saved["none"].values()), saved


def test_bfloat16_compute_is_close_to_float32():
    args = _inputs(8, SHAPES[2])
    want = _apply()(_trained(), *args)
    got = _apply(dataclasses.replace(CFG, dtype="bfloat16"))(_trained(), *args)
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 0.05, rel


def test_conditioning_frames_reach_the_model():
    x, t, text, lengths, pooled = _inputs(9, SHAPES[2])
    cond = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    frame_mask = np.array([[1.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
    # Input path: (B, t) and (B, t, 1, 1, 1) masks agree; masked-out frames are zeroed.
    model_in = np.asarray(dit.concat_conditioning(x, cond, frame_mask))
    np.testing.assert_array_equal(model_in, dit.concat_conditioning(x, cond, frame_mask.reshape(1, 5, 1, 1, 1)))
    assert model_in.shape[-1] == CFG.in_channels
    np.testing.assert_array_equal(model_in[0, 1:4, ..., 4:], 0.0)
    np.testing.assert_array_equal(model_in[0, 0, ..., 4:8], cond[0, 0])
    np.testing.assert_array_equal(model_in[0, 4, ..., 8], 1.0)
    with pytest.raises(ValueError, match="^cond_mask: given without cond_latents; pass the known clean latents too"):
        dit.concat_conditioning(x, None, frame_mask)  # frames marked known, their latents zeros
    # At init the output is zero either way; with trained-like weights the conditioning matters.
    run = lambda v, m: _apply()(v, x, t, text, lengths, pooled, cond_latents=cond, cond_mask=m)  # noqa: E731
    assert float(jnp.abs(run(_variables(), frame_mask)).max()) == 0.0
    plain = _apply()(_trained(), x, t, text, lengths, pooled)
    assert float(jnp.abs(run(_trained(), frame_mask) - plain).max()) > 1e-3
    np.testing.assert_allclose(run(_trained(), np.zeros_like(frame_mask)), plain, atol=1e-6)


def test_patchify_pack_roundtrip_and_errors():
    x = np.random.default_rng(11).standard_normal((2, 3, 4, 6, 5)).astype(np.float32)
    tokens = patches.patchify(x, (1, 2, 2))
    assert tokens.shape == (2, 3 * 2 * 3, 20)
    np.testing.assert_array_equal(patches.unpatchify(tokens, (1, 2, 2), (3, 4, 6)), x)
    with pytest.raises(ValueError, match="patch: latent height 4"):
        patches.patchify(x, (1, 3, 2))
    row = patches.pack_clips([x[0], x[1, :1]], (1, 2, 2), length=30)
    assert row.tokens.shape == (30, 20) and int((row.segment_ids == -1).sum()) == 30 - 18 - 6
    np.testing.assert_array_equal(row.positions[18:24], patches.patch_positions((1, 2, 3)))
    back = patches.unpack_clips(row.tokens, row.shapes, (1, 2, 2))
    np.testing.assert_array_equal(back[0], x[0])
    np.testing.assert_array_equal(back[1], x[1, :1])
    with pytest.raises(ValueError, match="length"):
        patches.pack_clips([x[0]], (1, 2, 2), length=4)
    for call, match in [
        (lambda: patches.patchify(x[0], (1, 2, 2)), r"patchify: latents must be \(B, t, h, w, c\), got shape \(3, 4"),
        (lambda: patches.unpatchify(tokens[:, :7], (1, 2, 2), (3, 4, 6)), r"unpatchify: tokens must be \(B, 18, "),
        (lambda: patches.pack_clips([], (1, 2, 2)), "pack_clips: no clips to pack"),
        (lambda: patches.pack_clips([x[0], x[1, ..., :4]], (1, 2, 2)), "pack_clips: clips must be .* with one C"),
        (lambda: patches.pack_texts([]), "pack_texts: no texts to pack"),
        (lambda: patches.pack_texts([np.zeros(8)]), r"pack_texts: texts must be \(L_i, D\)"),
        (lambda: patches.unpack_clips(row.tokens[:20], row.shapes, (1, 2, 2)), r"unpack_clips: .* N >= 24"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_a_token_count_maps_to_a_latent_of_square_frames():
    assert patches.latent_shape_for_tokens(4096, (1, 2, 2)) == (16, 32, 32)
    assert patches.latent_shape_for_tokens(256, (1, 2, 2)) == (4, 16, 16)
    assert patches.latent_shape_for_tokens(16384, (1, 2, 2)) == (16, 64, 64)
    assert patches.latent_shape_for_tokens(64, (2, 1, 1)) == (8, 4, 4)
    for tokens in (1, 3, 7, 32, 1000, 8192, 65536):
        shape = patches.latent_shape_for_tokens(tokens, (1, 2, 2))
        assert shape[1] == shape[2] and patches.token_count(shape, (1, 2, 2)) == tokens
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="tokens: must be a positive int"):
            patches.latent_shape_for_tokens(bad, (1, 2, 2))


def test_presets_and_config_errors():
    assert dit.dit_preset("XL").depth == 28 and dit.dit_preset("XL", depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown DiT preset 'huge'; valid presets: tiny, small, B, L, XL, 1.5B"):
        dit.dit_preset("huge")
    # Overrides read back from JSON (vidiff.json, --config overrides) hold lists; the frozen config must hash.
    from_json = dit.dit_preset("tiny", patch=[1, 2, 2])
    assert from_json.patch == (1, 2, 2) and hash(from_json) == hash(dit.dit_preset("tiny", patch=(1, 2, 2)))
    direct = dit.DiTConfig(patch=[1, 2, 2], rope_fractions=[0.5, 0.25, 0.25])  # no preset: the config makes tuples
    assert (direct.patch, direct.rope_fractions) == ((1, 2, 2), (0.5, 0.25, 0.25))
    hash(direct)
    with pytest.raises(ValueError, match="heads"):
        dit.DiTConfig(width=64, heads=5)
    with pytest.raises(ValueError, match="remat_policy"):
        dit.DiTConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="attention_impl"):
        dit.DiTConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="latent_channels"):
        _apply()(_variables(), np.zeros((1, 1, 2, 2, 3), np.float32), *_inputs(0, (1, 1, 2, 2))[1:])
    n = sum(x.size for x in jax.tree_util.tree_leaves(_variables()))
    assert dit.param_count(CFG) == n
    # FLOPs counted like the PyTorch peer's model_flops(batch=4, tokens=4096, text=128, dim=1152, layers=28).
    assert dit.dit_flops(dit.dit_preset("XL"), 4096, 128, batch=4) == 2 * 3 * 4 * 28 * (
        4096 * (4 + 8 + 2) * 1152**2 + 128 * 2 * 1152**2 + 2 * 4096**2 * 1152 + 2 * 4096 * 128 * 1152)


def test_config_rejects_values_that_would_fail_later_or_silently():
    for overrides, match in [(dict(rope_theta=0.0), "rope_theta: must be a positive number"),
                             (dict(mlp_ratio=0), "mlp_ratio: must be a positive number"),
                             (dict(scan_blocks="no"), "scan_blocks: must be True or False, got 'no'"),
                             (dict(scan_unroll=0), "scan_unroll: must be a positive int, got 0"),
                             (dict(conditioning_frames="no"), "conditioning_frames: must be True or False"),
                             (dict(patch=2), r"patch: need three positive ints \(pt, ph, pw\), got 2"),
                             (dict(patch=(1.7, 2, 2)), r"patch: need three positive ints \(pt, ph, pw\), got \(1.7"),
                             (dict(depth=True), "depth: must be a positive int, got True"),
                             (dict(mlp_ratio=True), "mlp_ratio: must be a positive number, got True"),
                             (dict(mlp_ratio=0.01), "^mlp_ratio: width 64 x 0.01 leaves the MLP no hidden unit$"),
                             (dict(width=12, heads=2, rope_fractions=(0.1, 0.45, 0.45), abs_pos_embed=True),
                              r"^rope_fractions: \(0.1, 0.45, 0.45\) of width \(abs_pos_embed\) 12 gives parts "
                              r"\(0, 6, 6\); each needs >= 2 dims$"),
                             (dict(rope_fractions="abc"), "rope_fractions: need 3 numbers summing to 1, got 'abc'"),
                             (dict(width=36, heads=4), r"heads: head_dim = width / heads = 9 must be even for RoPE"),
                             (dict(attention_impl="cudnn"), r"attention_impl: 'cudnn' needs dtype bfloat16 or "
                                                            r"float16 .* \(here float32, "),
                             (dict(attention_head_pad=8), r"attention_head_pad: must be 0 \(off\) or an int >= "
                                                          r"head_dim 16 with attention_impl None, 'xla' or 'cudnn'; "
                                                          r"got 8 with None"),
                             (dict(attention_head_pad=136, attention_impl="cudnn", dtype="bfloat16"),
                              r"attention_impl: 'cudnn' needs .* head_dim <= 128 .* \(here bfloat16, 136\)"),
                             (dict(attention_head_pad=32, attention_impl="ring"), r"attention_head_pad: .*got 32 "
                                                                                  r"with 'ring'"),
                             (dict(widht=32), r"unknown DiTConfig field\(s\) \['widht'\]; valid fields: .*width")]:
        with pytest.raises(ValueError, match=match):
            dit.dit_preset("tiny", **overrides)
    # Every layer's one whole-number check (vidiff.checks), not a copy: numpy ints count, bools and 3.0 do not.
    from vidiff import checks

    assert (dit.is_int, dit.is_number) == (checks.is_int, checks.is_number)
    values = (3, np.int64(3), True, np.bool_(True), 3.0, np.float64(3.0), "3", None)
    assert [checks.is_int(v) for v in values] == [True, True, False, False, False, False, False, False]
    assert [checks.is_number(v) for v in values] == [True, False, False, False, True, True, False, False]
    assert dit.dit_preset("tiny", depth=np.int64(2), mlp_ratio=np.float64(2.0)).depth == 2


@pytest.mark.parametrize("text_mode", ["cross", "joint"])
def test_padded_attention_heads_change_nothing_but_the_kernels_shapes(text_mode):
    """attention_head_pad zero-pads every head for the kernel: same velocity and gradients, same parameters."""
    plain = dataclasses.replace(CFG, text_mode=text_mode)
    padded = dataclasses.replace(plain, attention_head_pad=24)  # tiny heads are 16 wide
    args = _inputs(3, (2, 2, 4, 4))
    params = dit.VideoDiT(plain).init(jax.random.key(0), *args)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)  # no zero init
    loss = lambda cfg: lambda p: jnp.sum(jnp.sin(dit.VideoDiT(cfg).apply({"params": p}, *args)))  # noqa: E731
    (want, want_grads), (got, got_grads) = (jax.jit(jax.value_and_grad(loss(c)))(params) for c in (plain, padded))
    assert float(want) != 0 and float(got) == pytest.approx(float(want), rel=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-5)
    heads_at = lambda cfg, size: f",{cfg.heads},{size}]" in str(jax.make_jaxpr(loss(cfg))(params))  # noqa: E731
    assert heads_at(padded, 24) and not heads_at(plain, 24)  # the kernel saw 24-wide heads


@pytest.mark.parametrize("text_mode, policy, scan", [("cross", "none", False), ("joint", "block", True)])
def test_fused_qk_norm_and_rope_is_the_same_network(text_mode, policy, scan):
    """fused_qk_rope: same parameters, and in float32 the same velocity and gradients, under remat and scan."""
    plain = dataclasses.replace(CFG, text_mode=text_mode, remat_policy=policy, scan_blocks=scan)
    args = _inputs(11, SHAPES[0])
    params = _trained(dataclasses.replace(CFG, text_mode=text_mode))
    if scan:
        params = {"params": _stack_blocks(params["params"], CFG.depth)}
    results = []
    for cfg in (plain, dataclasses.replace(plain, fused_qk_rope=True)):
        loss = lambda p: jnp.mean(jnp.square(dit.VideoDiT(cfg).apply(p, *args)))  # noqa: B023, E731
        results.append(jax.jit(jax.value_and_grad(loss))(params))
        assert jax.tree.structure(nn.unbox(jax.eval_shape(dit.VideoDiT(cfg).init, jax.random.key(0), *args))) == \
            jax.tree.structure(params)
    assert float(results[0][0]) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *results)
    fused = jax.make_jaxpr(lambda p: dit.VideoDiT(dataclasses.replace(plain, fused_qk_rope=True)).apply(p, *args))
    assert "custom_vjp_call" in str(fused(params))


def _bad_input(name):
    """The tiny model's inputs at latents (2, 2, 4, 4) with one of them wrong, as keyword overrides."""
    x, t, text, lengths, pooled = _inputs(0, (2, 2, 4, 4))
    bad = {"t_scalar": dict(t=np.float32(0.5)), "t_batch": dict(t=np.zeros(4, np.float32)),
           "text_dim": dict(text=text[..., :8]), "text_batch": dict(text=text[:1]),
           "lengths": dict(lengths=np.array([6, 6, 6])), "pooled": dict(pooled=pooled[:, :8]),
           "cond_mask": dict(cond_mask=np.ones((2, 3), np.float32)),
           "cond_latents": dict(cond_latents=np.zeros((2, 2, 4, 4, 3), np.float32)),
           "cond_latents_alone": dict(cond_latents=np.zeros_like(x)),  # a zero mask would drop them
           "x_uint8": dict(x=np.zeros(x.shape, np.uint8)),  # the output would be cast to uint8
           "empty": dict(x=x[:0], t=t[:0], text=text[:0], lengths=lengths[:0], pooled=pooled[:0])}[name]
    args = {**dict(x=x, t=t, text=text, lengths=lengths, pooled=pooled), **bad}
    extra = {k: args.pop(k) for k in ("cond_mask", "cond_latents") if k in args}
    return (args["x"], args["t"], args["text"], args["lengths"], args["pooled"]), extra


@pytest.mark.parametrize("name, match", [
    ("t_scalar", r"t: flow times must be \(2,\), one per sample .* got \(\)"),
    ("t_batch", r"t: flow times must be \(2,\).* got \(4,\)"),
    ("text_dim", r"text_emb: must be \(2, L, 32\) \(text_dim=32; .*got \(2, 6, 8\)"),
    ("text_batch", r"text_emb: must be \(2, L, 32\).*got \(1, 6, 32\)"),
    ("lengths", r"text_mask_or_lengths: must be lengths \(2,\) or a mask \(2, 6\), got \(3,\)"),
    ("pooled", r"pooled_text: must be \(2, 24\) \(pooled_dim=24\), got \(2, 8\)"),
    ("cond_mask", r"cond_mask: must be per frame \(2, 2\).*got \(2, 3\)"),
    ("cond_latents", r"cond_latents: must have x_t's shape \(2, 2, 4, 4, 4\), got \(2, 2, 4, 4, 3\)"),
    ("cond_latents_alone", r"^cond_latents: given without cond_mask; pass the per-frame mask of known frames too"),
    ("x_uint8", r"^x_t: the DiT takes float latents, got uint8; encode frames with the VAE first"),
    ("empty", r"^tokens: the batch is empty, got \(0, 8, 36\); give at least one clip"),  # was jax's ZeroDivisionError
])
def test_wrong_inputs_fail_at_the_model_boundary_naming_themselves(name, match):
    args, extra = _bad_input(name)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(functools.partial(dit.VideoDiT(CFG).apply, **extra), _variables(), *args)


def test_dummy_inputs_take_the_latent_clips_t_h_w():
    x, *_ = dit.dummy_inputs(CFG, batch=2, latent_shape=(3, 4, 6))
    assert x.shape == (2, 3, 4, 6, CFG.latent_channels)
    with pytest.raises(ValueError, match=re.escape("dummy_inputs: latent_shape is (t, h, w), got (1, 3, 4, 6, 4); "
                                                   "leave out the batch and the 4 channels")):
        dit.dummy_inputs(CFG, latent_shape=(1, 3, 4, 6, 4))  # made a 7-D x_t, refused only at init


def test_wrong_packed_inputs_fail_naming_themselves():
    model = dit.VideoDiT(CFG)
    x, t, text, lengths, pooled = _inputs(0, (1, 2, 4, 4))
    tokens = patches.patchify(dit.concat_conditioning(x), CFG.patch)
    positions = np.zeros((1, tokens.shape[1], 3), np.int32)
    call = lambda tokens, **kw: jax.eval_shape(functools.partial(model.apply, method=model.forward_tokens, **kw),
                                               _variables(), tokens, t, text, lengths, pooled)
    with pytest.raises(ValueError, match=r"tokens: must be \(B, N, 36\) \(pt\*ph\*pw\*in_channels\)"):
        call(tokens[..., :16], positions=positions)
    with pytest.raises(ValueError, match=r"segment_ids: must be \(1, 8\), one clip index per token, got \(1, 4\)"):
        call(tokens, positions=positions, segment_ids=np.zeros((1, 4), np.int32))


def test_preset_parameter_counts():
    counts = {name: dit.param_count(dit.dit_preset(name)) for name in dit.DIT_PRESETS}
    # DiT-XL is 675M; our blocks add cross-attention (4 d^2 per block) and text/pooled projections.
    assert 800e6 < counts["XL"] < 850e6 and 1.5e9 < counts["1.5B"] < 1.65e9
    assert counts["tiny"] < counts["small"] < counts["B"] < counts["L"] < counts["XL"] < counts["1.5B"]


@pytest.mark.slow
def test_sharded_forward_matches_single_device():
    """The logical names map onto a (data, fsdp, tensor) mesh of the 8 CPU devices without changing results."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2, context=1)
    args = _inputs(12, (4, 1, 4, 4))
    want = _apply()(_trained(), *args)
    abstract = jax.eval_shape(dit.VideoDiT(CFG).init, jax.random.key(0), *dit.dummy_inputs(CFG))
    shardings = parallel.param_shardings(abstract, mesh)
    params = jax.device_put(_trained(), shardings)
    assert any(not s.is_fully_replicated for s in jax.tree_util.tree_leaves(shardings))
    with jax.set_mesh(mesh), parallel.axis_rules(parallel.LOGICAL_RULES):
        batch = [jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in args]
        got = jax.jit(dit.VideoDiT(CFG).apply)(params, *batch)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_absolute_positions_tell_frames_apart_rope_alone_does_not():
    # RoPE sees only offsets: moving every position by the same amount changes nothing. The absolute
    # sinusoids (abs_pos_embed) make the output depend on where in the clip a token is.
    x, t, text, lengths, pooled = _inputs(3, (1, 3, 4, 4))
    grid = patches.patch_positions([3, 2, 2])[None]
    for abs_pos, changes in ((False, False), (True, True)):
        cfg = dataclasses.replace(CFG, abs_pos_embed=abs_pos)
        outs = [_apply(cfg)(_trained(cfg), x, t, text, lengths, pooled, positions=grid + shift)
                for shift in (np.zeros(3, np.float32), np.array([5.0, 2.0, 1.0], np.float32))]
        gap = float(jnp.abs(outs[0] - outs[1]).max())
        assert (gap > 1e-2) if changes else (gap < 1e-4), (abs_pos, gap)


def test_normalize_text_makes_the_encoder_output_scale_irrelevant():
    # MiniLM's pooled vector is unit-norm (per-dim RMS ~0.05), T5's tokens are not: with normalize_text
    # the DiT sees both at unit RMS, so scaling an encoder's output changes nothing.
    x, t, text, lengths, pooled = _inputs(2, (1, 2, 4, 4))
    for normalize, same in ((True, True), (False, False)):
        cfg = dataclasses.replace(CFG, normalize_text=normalize)
        params = _trained(cfg)
        a = _apply(cfg)(params, x, t, text, lengths, pooled)
        b = _apply(cfg)(params, x, t, 4.0 * text, lengths, 0.25 * pooled)
        gap = float(jnp.abs(a - b).max() / jnp.abs(a).max())
        assert (gap < 1e-4) if same else (gap > 1e-2), (normalize, gap)
