"""Tests for vidiff.models.vae and vae_losses: shapes, causality, chunking, tiling, losses.

Tiny shapes throughout. Every distinct input shape costs a CPU compile, so the
tests share one set of tiny variables and a few clip shapes.
"""
import dataclasses
import functools
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from vidiff.models import vae_codec
from vidiff.models.vae import (
    DiagonalGaussian, VAEConfig, VideoVAE, compute_latent_stats, decode_chunked, decode_tiled,
    encode_chunked, encode_tiled, set_latent_stats, vae_preset,
)
from vidiff.models.vae_losses import (
    LPIPS, PatchDiscriminator3D, VAELossConfig, discriminator_loss, generator_loss, load_lpips,
    make_perceptual_fn, save_lpips, vae_loss,
)
from vidiff.parallel import LOGICAL_RULES, axis_rules, batch_sharding, make_mesh, param_shardings

KNOWN_NAMES = {name for name, _ in LOGICAL_RULES}


def smooth_video(key, shape):
    """Low-frequency random clip in [-1, 1] (white noise is an unfair target for a VAE)."""
    b, t, h, w, c = shape
    coarse = jax.random.uniform(key, (b, t, h // 4, w // 4, c), minval=-1, maxval=1)
    return jnp.repeat(jnp.repeat(coarse, 4, axis=2), 4, axis=3)


@pytest.fixture(scope="module")
def tiny():
    """(vae, variables) for the tiny preset. rbg keys: init compiles ~3x faster on CPU than threefry."""
    vae = VideoVAE(vae_preset("tiny"))
    variables = jax.jit(vae.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 1, 4, 4, 3)))
    return vae, variables


@functools.lru_cache(maxsize=None)
def jitted(vae, method):
    return jax.jit(lambda variables, x: vae.apply(variables, x, method=method))


@pytest.fixture(scope="module")
def clip():
    return smooth_video(jax.random.key(1), (1, 9, 16, 16, 3))


# ---------------------------------------------------------------------- config


def test_frame_arithmetic_follows_the_causal_time_axis():
    from vidiff.models.vae import latent_count, pixel_count, pixel_frames_of

    assert [latent_count(n, 4) for n in (1, 5, 9, 17)] == [1, 2, 3, 5]
    assert [pixel_count(L, 4) for L in (1, 2, 3, 5)] == [1, 5, 9, 17]
    assert list(pixel_frames_of(0, 4)) == [0] and list(pixel_frames_of(1, 4)) == [1, 2, 3, 4]
    assert list(pixel_frames_of(4, 4)) == [13, 14, 15, 16]
    assert (latent_count(9, 2), pixel_count(5, 2), list(pixel_frames_of(2, 2))) == (5, 9, [3, 4])
    assert vae_preset("tiny").latent_shape((1, 17, 32, 32, 3))[1] == latent_count(17, 4)


def test_config_validation_messages():
    cfg = vae_preset("tiny")
    with pytest.raises(ValueError, match=r"num_frames=18 must be 1 \+ k\*4 \(e\.g\. 17\)"):
        cfg.check_video_shape((1, 18, 32, 32, 3))
    with pytest.raises(ValueError, match=r"width=30 must be divisible by the spatial factor 4 \(e\.g\. 32\)"):
        cfg.check_video_shape((1, 17, 32, 30, 3))
    per_frame = vae_preset("tiny", temporal_down=(False, False))  # time factor 1: (0 - 1) % 1 == 0
    with pytest.raises(ValueError, match=r"^num_frames=0 must be 1 \+ k\*1 \(e\.g\. 1\); trim or pad the clip$"):
        per_frame.check_video_shape((1, 0, 32, 32, 3))
    with pytest.raises(ValueError, match="unknown VAE preset 'huge'; valid presets: tiny, small, base"):
        vae_preset("huge")
    with pytest.raises(ValueError, match="unknown VAEConfig field"):
        vae_preset("tiny", latent_chanels=8)
    assert vae_preset("tiny", channel_mults=[1, 2, 2]) == vae_preset("tiny")  # JSON lists become the tuples
    direct = VAEConfig(channel_mults=[1, 2], temporal_down=[True], spatial_down=[True], time_kernels=[3, 1],
                       base_channels=8, patch_size=2)  # built directly, as from JSON: the module must hash
    assert (direct.channel_mults, direct.temporal_down, direct.time_kernels) == ((1, 2), (True,), (3, 1))
    hash(VideoVAE(direct))
    with pytest.raises(ValueError, match="temporal_down needs 2 flags"):
        vae_preset("tiny", temporal_down=(True,))
    with pytest.raises(ValueError, match="spatial factor 2"):
        vae_preset("tiny", spatial_down=(True, False))
    with pytest.raises(ValueError, match="num_frames=4"):  # raised at trace time, before any compile
        jax.eval_shape(VideoVAE(cfg).init, jax.random.key(0), jnp.zeros((1, 4, 8, 8, 3)))
    assert vae_preset("base").latent_shape((2, 17, 64, 96, 3)) == (2, 5, 8, 12, 16)
    for overrides, match in [(dict(dtype="bf16"), "VAEConfig.dtype='bf16' must be one of float32, bfloat16"),
                             (dict(mid_attention="no"), "VAEConfig.mid_attention='no' must be True or False"),
                             (dict(channel_mults=()), "VAEConfig.channel_mults is empty"),
                             (dict(temporal_down=("no", "no")), r"VAEConfig.temporal_down=\('no', 'no'\) must hold "
                                                                r"True or False per transition"),
                             (dict(spatial_down=(1, 1)), "VAEConfig.spatial_down=.* must hold True or False")]:
        with pytest.raises(ValueError, match=match):
            vae_preset("tiny", **overrides)


def test_wrong_frames_latents_and_stats_are_named_before_any_work():
    vae = VideoVAE(vae_preset("tiny"))
    variables = {"params": {}, "latent_stats": {"shift": np.zeros(4, np.float32), "scale": np.ones(4, np.float32)}}
    uint8_clip = np.full((1, 5, 8, 8, 3), 255, np.uint8)
    for encode in (lambda: jax.eval_shape(functools.partial(vae.apply, method=vae.encode), variables, uint8_clip),
                   lambda: encode_chunked(vae, variables, uint8_clip, 4)):
        with pytest.raises(ValueError, match="video dtype uint8: the VAE takes float frames in \\[-1, 1\\]; "
                                             "convert uint8 frames with vidiff.io.to_float"):
            encode()
    # The whole clip's shape is named, not a chunk's or a tile's.
    with pytest.raises(ValueError, match=r"latents shape \(3, 2, 2, 4\) must be \(batch, t, h, w, 4\)"):
        decode_chunked(vae, variables, np.zeros((3, 2, 2, 4), np.float32), 2)
    with pytest.raises(ValueError, match=r"latents shape \(1, 2, 2, 2, 3\) must be"):
        decode_tiled(vae, variables, np.zeros((1, 2, 2, 2, 3), np.float32), 2, 0)
    with pytest.raises(ValueError, match=r"set_latent_stats: scale needs shape \(4,\) .*got \(3,\)"):
        set_latent_stats(variables, np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match=r"set_latent_stats: shift needs shape \(4,\) .*got \(\)"):
        set_latent_stats(variables, 0.0, np.ones(4))
    with pytest.raises(ValueError, match="set_latent_stats: scale must be positive"):
        set_latent_stats(variables, np.zeros(4), np.array([1.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("height,width", [(32, 32), (32, 64), (64, 32)])
def test_shapes_across_durations_and_aspect_ratios(tiny, frames, height, width):
    vae, variables = tiny
    video = jax.ShapeDtypeStruct((2, frames, height, width, 3), jnp.float32)
    recon, post = jax.eval_shape(lambda v, x: vae.apply(v, x), variables, video)
    t = 1 + (frames - 1) // 4
    assert post.mean.shape == post.logvar.shape == (2, t, height // 4, width // 4, 4)
    assert recon.shape == video.shape and recon.dtype == jnp.float32


@pytest.mark.parametrize("temporal_down,spatial_down,channel_mults", [
    ((False, False, False), (True, True, True), (1, 1, 1, 1)),   # 1 x 8 x 8
    ((False, True, False), (True, True, False), (1, 1, 1, 1)),   # 2 x 4 x 4
    ((False, True, True, False), (True, True, True, True), (1, 1, 1, 1, 1)),  # 4 x 16 x 16
])
def test_configurable_factors(temporal_down, spatial_down, channel_mults):
    cfg = VAEConfig(base_channels=8, channel_mults=channel_mults, num_res_blocks=1, latent_channels=4,
                    temporal_down=temporal_down, spatial_down=spatial_down)
    vae, frames, size = VideoVAE(cfg), 1 + 2 * cfg.time_factor, 2 * cfg.spatial_factor
    video = jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.float32)
    variables = jax.eval_shape(vae.init, jax.random.key(0), video)
    recon, post = jax.eval_shape(lambda v, x: vae.apply(v, x), variables, video)
    assert post.mean.shape == (1, 3, 2, 2, 4) and recon.shape == video.shape


def test_every_parameter_has_logical_axis_names():
    modules = [
        (VideoVAE(vae_preset("base")), (jnp.zeros((1, 1, 8, 8, 3)),)),
        (VideoVAE(vae_preset("tiny")), (jnp.zeros((1, 1, 4, 4, 3)),)),
        (PatchDiscriminator3D(channels=(8, 16)), (jnp.zeros((1, 1, 16, 16, 3)),)),
        (LPIPS(widths=(4, 4, 8, 8, 8)), (jnp.zeros((1, 16, 16, 3)),) * 2),
    ]
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    for module, args in modules:
        abstract = jax.eval_shape(module.init, jax.random.key(0), *args)
        leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), f"{type(module).__name__}: unboxed param {leaf}"
            assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= KNOWN_NAMES, leaf.names
            assert leaf.value.dtype == jnp.float32
        if sum(leaf.value.size for leaf in leaves) < 10**7:  # the names shard evenly on a real mesh
            shardings = param_shardings(abstract, mesh)
            jax.tree.map(lambda a, s: jax.device_put(jnp.zeros(a.shape, a.dtype), s), nn.unbox(abstract), shardings)


# -------------------------------------------------------------- causality, chunks


def test_encoder_is_causal(tiny, clip):
    vae, variables = tiny
    encode = jitted(vae, "encode")
    base = encode(variables, clip).mean  # latent frames: {0}, {1..4}, {5..8}
    later = encode(variables, clip.at[:, 5].set(-clip[:, 5])).mean
    np.testing.assert_allclose(later[:, :2], base[:, :2], atol=1e-6)
    assert not np.allclose(later[:, 2], base[:, 2], atol=1e-4)
    earlier = encode(variables, clip.at[:, 1].set(-clip[:, 1])).mean
    np.testing.assert_allclose(earlier[:, :1], base[:, :1], atol=1e-6)
    assert not np.allclose(earlier[:, 1], base[:, 1], atol=1e-4)
    # An encoder gone wild still gives a usable posterior: its log-variance is clipped to [-30, 20] (exp(100)
    # would overflow the KL and the sample).
    params = variables["params"]
    conv_out = params["encoder"]["conv_out"]["conv"]
    wild_bias = conv_out["bias"].replace_boxed(jnp.array([0.0] * 4 + [100.0, -100.0] * 2))
    wild = {**variables, "params": {**params, "encoder": {**params["encoder"], "conv_out": {
        "conv": {**conv_out, "bias": wild_bias}}}}}
    logvar = np.asarray(encode(wild, clip).logvar)
    np.testing.assert_array_equal(logvar[..., 0::2], 20.0)
    np.testing.assert_array_equal(logvar[..., 1::2], -30.0)


def test_decoder_is_causal(tiny, clip):
    vae, variables = tiny
    z = jitted(vae, "encode")(variables, clip).mean
    decode = jitted(vae, "decode")
    base, changed = decode(variables, z), decode(variables, z.at[:, 2].add(1.0))
    np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-6)  # frames of latents 0 and 1
    assert not np.allclose(changed[:, 5:], base[:, 5:], atol=1e-4)


@pytest.mark.slow
def test_sharded_encode_decode_matches_single_device(tiny):
    # Logical names -> mesh axes through the one rules table; the activation
    # constraints must hold under jit with sharded params and batch.
    vae, variables = tiny
    video = smooth_video(jax.random.key(10), (4, 5, 16, 16, 3))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    codec = lambda v, x: vae.apply(v, vae.apply(v, x, method=vae.encode).mean, method=vae.decode)
    mesh_context = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh  # `with mesh` is deprecated
    with mesh_context, axis_rules():
        sharded = jax.jit(codec, in_shardings=(param_shardings(variables, mesh), batch_sharding(mesh, 5)))
        hlo = sharded.lower(variables, video).as_text()
        out = sharded(variables, video)
    assert hlo.count("sharding_constraint") + hlo.count("@Sharding") > 20  # Shardy or GSPMD constraints
    np.testing.assert_allclose(out, jax.jit(codec)(variables, video), atol=1e-4)


@pytest.mark.parametrize("chunk_frames,first_chunk_frames", [(4, 1), (8, 1), (4, 5)])
def test_chunked_encode_equals_one_shot(tiny, clip, chunk_frames, first_chunk_frames):
    vae, variables = tiny
    one_shot = jitted(vae, "encode")(variables, clip)
    chunked = encode_chunked(vae, variables, clip, chunk_frames, first_chunk_frames=first_chunk_frames)
    np.testing.assert_allclose(chunked.mean, one_shot.mean, atol=1e-5)
    np.testing.assert_allclose(chunked.logvar, one_shot.logvar, atol=1e-5)


@pytest.mark.parametrize("chunk,first", [(1, 1), (2, 1), (1, 2)])
def test_chunked_decode_equals_one_shot(tiny, clip, chunk, first):
    vae, variables = tiny
    z = jitted(vae, "encode")(variables, clip).mean
    one_shot = jitted(vae, "decode")(variables, z)
    chunked = decode_chunked(vae, variables, z, chunk, first_chunk_frames=first)
    # Frames come back in host memory, chunk by chunk: the device never holds the whole clip.
    assert isinstance(chunked, np.ndarray) and chunked.dtype == np.float32
    assert chunked.shape == one_shot.shape
    np.testing.assert_allclose(chunked, one_shot, atol=1e-5)


def test_chunk_size_validation(tiny, clip):
    vae, variables = tiny
    with pytest.raises(ValueError, match="chunk_frames=3 must be a positive multiple of the time factor 4"):
        encode_chunked(vae, variables, clip, 3)
    with pytest.raises(ValueError, match="first_chunk_frames=4 must be 1 \\+ m\\*4"):
        encode_chunked(vae, variables, clip, 4, first_chunk_frames=4)


# ---------------------------------------------------------------- tiling, dtypes


def test_tile_blending_is_exact_for_pixelwise_maps():
    # For a map with no spatial context, overlapping tiles must reproduce it exactly:
    # the blend weights form a partition of unity and leave no seams.
    x = jax.random.normal(jax.random.key(2), (1, 2, 20, 28, 3))
    for up, down in ((1, 1), (4, 1), (1, 4)):
        fn = lambda t: (jnp.repeat(jnp.repeat(t, up, 2), up, 3)[:, :, ::down, ::down] * 2.0,)
        (tiled,) = vae_codec._blend_tiles(fn, x, tile=8, overlap=4, up=up, down=down)
        np.testing.assert_allclose(tiled, fn(x)[0], atol=1e-5)


def seam(tiled, untiled):
    """Largest jump between neighbouring pixels that the untiled result does not have."""
    return max(float(jnp.abs(jnp.diff(tiled, axis=a) - jnp.diff(untiled, axis=a)).max()) for a in (2, 3))


def test_tiled_codec_close_to_untiled_without_seams(tiny):
    vae, variables = tiny
    video = smooth_video(jax.random.key(2), (1, 5, 64, 64, 3))  # 16x16 latents; tiles of 8 latents
    full = jitted(vae, "encode")(variables, video)
    untiled = jitted(vae, "decode")(variables, full.mean)
    for name, reference, tiles in (
        ("encode", full.mean, lambda ov: encode_tiled(vae, variables, video, tile_latent=8, overlap_latent=ov).mean),
        ("decode", untiled, lambda ov: decode_tiled(vae, variables, full.mean, tile_latent=8, overlap_latent=ov)),
    ):
        blended, hard = tiles(4), tiles(0)
        assert blended.shape == reference.shape
        # Not exact: a tile's border sees zero padding, and untrained weights have a
        # receptive field wider than the tile, so the bounds are loose on purpose.
        scale = float(jnp.std(reference))
        assert float(jnp.mean(jnp.abs(blended - reference))) < 0.3 * scale, name
        assert seam(blended, reference) < 2.0 * scale, name
        assert seam(blended, reference) < 0.5 * seam(hard, reference), name  # blending removes the hard edges


def test_bfloat16_compute_close_to_float32(tiny, clip):
    vae, variables = tiny
    vae16 = VideoVAE(vae_preset("tiny", dtype="bfloat16"))
    post32 = jitted(vae, "encode")(variables, clip)
    post16 = jitted(vae16, "encode")(variables, clip)
    assert post16.mean.dtype == jnp.float32  # outputs stay float32
    err = float(jnp.abs(post16.mean - post32.mean).max()) / float(jnp.abs(post32.mean).max())
    assert err < 0.05
    rec32, rec16 = jitted(vae, "decode")(variables, post32.mean), jitted(vae16, "decode")(variables, post32.mean)
    assert float(jnp.abs(rec16 - rec32).max()) / float(jnp.abs(rec32).max()) < 0.05


# --------------------------------------------------------------------- losses


def test_kl_zero_for_standard_normal_and_positive_otherwise():
    zeros = jnp.zeros((2, 3, 4, 4, 4))
    np.testing.assert_allclose(DiagonalGaussian(zeros, zeros).kl(), 0.0)
    assert float(DiagonalGaussian(zeros + 1.0, zeros).kl()[0]) == pytest.approx(0.5 * zeros[0].size)
    wide = DiagonalGaussian(jnp.zeros((1, 20_000)), jnp.full((1, 20_000), np.log(4.0)))  # variance 4
    assert float(wide.sample(jax.random.key(0)).std()) == pytest.approx(2.0, abs=0.05)
    video = jnp.zeros((2, 9, 16, 16, 3))
    loss, metrics = vae_loss(video, video, DiagonalGaussian(zeros, zeros), VAELossConfig(kl_weight=1.0))
    assert float(loss) == 0.0 and set(metrics) >= {"loss", "reconstruction", "kl"}
    # One class, from the module below both the model and its codecs (the codec no longer imports vae.py).
    from vidiff.models import gaussian
    assert DiagonalGaussian is gaussian.DiagonalGaussian is vae_codec.DiagonalGaussian


@pytest.mark.slow
def test_loss_drops_in_a_few_steps(tiny):
    vae, variables = tiny
    video = smooth_video(jax.random.key(3), (1, 5, 16, 16, 3))
    config = VAELossConfig(reconstruction="l2", kl_weight=1e-6)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            recon, posterior = vae.apply({"params": p, **rest}, video, key)
            return vae_loss(video, recon, posterior, config)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state, history = optimizer.init(params), []
    for i in range(6):
        params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
        history.append(float(metrics["reconstruction"]))
    assert np.isfinite(history).all() and history[-1] < 0.7 * history[0], history


def test_discriminator_hinge_loss_on_known_logits():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert float(discriminator_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1))
    assert float(discriminator_loss(jnp.full(4, 3.0), jnp.full(4, -3.0))) == 0.0
    assert float(generator_loss(fake)) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A narrow LPIPS with random weights saved in the torchvision/lpips layout (no real VGG offline)."""
    module = LPIPS(widths=(4, 4, 8, 8, 8))
    abstract = jax.eval_shape(module.init, jax.random.key(0), *(jnp.zeros((1, 16, 16, 3)),) * 2)
    rng = np.random.default_rng(0)
    # Drawn on the host (no compile); LPIPS heads are non-negative, as trained.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: np.abs(rng.normal(0, 0.3, a.shape)) if "lin" in str(path) else rng.normal(0, 0.3, a.shape),
        nn.unbox(abstract)["params"])
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    save_lpips({"params": params}, path)
    return path, module, {"params": params}


def test_perceptual_loss_from_safetensors(lpips_file, tmp_path):
    path, module, saved = lpips_file
    loaded_module, loaded = load_lpips(path)
    assert loaded_module.widths == module.widths
    x = smooth_video(jax.random.key(4), (2, 2, 16, 16, 3))
    y = x + 0.3 * jax.random.normal(jax.random.key(5), x.shape)
    perceptual = make_perceptual_fn(path)
    np.testing.assert_allclose(perceptual(x, x), 0.0, atol=1e-7)
    assert perceptual(x, y).shape == (2,) and bool((perceptual(x, y) > 0).all())
    frames = x.reshape(4, 16, 16, 3), y.reshape(4, 16, 16, 3)
    expected = jax.jit(module.apply)(saved, *frames).reshape(2, 2).mean(1)
    np.testing.assert_allclose(perceptual(x, y), expected, rtol=1e-5)

    with pytest.raises(ValueError, match="VAELossConfig.perceptual_weights_path is required"):
        VAELossConfig(perceptual_weight=0.1)
    for field, value, match in [("kl_weight", float("nan"), "kl_weight=nan must be a finite number >= 0"),
                                ("adversarial_weight", -1.0, "adversarial_weight=-1.0 must be a finite number"),
                                ("adversarial_start_step", 2.5, "adversarial_start_step=2.5 must be an int >= 0"),
                                ("adaptive_adversarial_weight", "no", "adaptive_adversarial_weight='no' must be True")]:
        with pytest.raises(ValueError, match=f"VAELossConfig.{match}"):
            VAELossConfig(**{field: value})
    with pytest.raises(ValueError, match="missing LPIPS tensor"):
        from safetensors.numpy import save_file
        save_file({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(tmp_path / "bad.safetensors"))
        load_lpips(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])  # a copy cut short: one line, not a traceback
    with pytest.raises(ValueError, match=r"LPIPS weights '\S+cut.safetensors' are not a readable safetensors file "
                                         r"\(.*\); point vae_loss.perceptual_weights_path at LPIPS weights"):
        load_lpips(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match=r"LPIPS weights '\S+none.safetensors' are not a readable"):
        load_lpips(tmp_path / "none.safetensors")


def test_frames_too_small_for_the_loss_networks_are_refused(lpips_file):
    """Below 16 px LPIPS's last VGG block, below 2**len(channels) the discriminator's logits, are empty: a NaN
    loss; each is a one-line error instead, from the networks and from check_frame_size (train's validate)."""
    from vidiff.models.vae_losses import check_frame_size

    perceptual = make_perceptual_fn(lpips_file[0])
    x = jnp.zeros((1, 2, 12, 16, 3))
    message = ("vae_loss.perceptual_weight > 0 needs frames of at least 16 px (LPIPS's fifth VGG block would leave "
               "none), got 12x16; train larger clips or set vae_loss.perceptual_weight=0")
    with pytest.raises(ValueError) as info:
        perceptual(x, x)
    assert str(info.value) == message
    assert perceptual(jnp.zeros((1, 2, 16, 16, 3)), jnp.zeros((1, 2, 16, 16, 3))).shape == (1,)
    disc = PatchDiscriminator3D(channels=(8, 16, 16))
    with pytest.raises(ValueError, match=r"vae_loss.adversarial_weight > 0 needs frames of at least 8 px \(the "
                                         r"discriminator's 3 halvings would leave none\), got 4x4"):
        disc.init(jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3)))
    config = VAELossConfig(perceptual_weight=1.0, perceptual_weights_path="x", adversarial_weight=0.1)
    with pytest.raises(ValueError) as info:
        check_frame_size(12, 16, config)
    assert str(info.value) == message
    check_frame_size(16, 16, config)
    check_frame_size(8, 8, dataclasses.replace(config, perceptual_weight=0.0))
    with pytest.raises(ValueError, match="got 4x8; train larger clips or set vae_loss.adversarial_weight=0"):
        check_frame_size(4, 8, dataclasses.replace(config, perceptual_weight=0.0))
    check_frame_size(4, 4, VAELossConfig())  # reconstruction and KL take any size


def test_adaptive_adversarial_weight_is_the_gradient_ratio_at_any_clip_size():
    """The weight is ||grad nll|| / ||grad g||: 10 for a discriminator whose logits are 0.1 x the video, at a
    small clip and a large one (the division's guard must not grow with the clip)."""
    config = VAELossConfig(adversarial_weight=1.0)
    for shape in ((1, 5, 16, 16, 3), (1, 17, 128, 128, 3)):
        video = jax.random.uniform(jax.random.key(0), shape, minval=-1, maxval=1)
        recon = video + 0.1 * jax.random.normal(jax.random.key(1), shape)  # no zero errors: |grad l1| is exact
        post = DiagonalGaussian(jnp.zeros((1, 1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1, 1)))
        _, metrics = vae_loss(video, recon, post, config, disc_logits_fn=lambda v: 0.1 * v)
        assert float(metrics["adversarial_weight"]) == pytest.approx(10.0, rel=1e-3), shape


def test_vae_loss_with_perceptual_and_adversarial_terms(lpips_file):
    path = lpips_file[0]
    disc = PatchDiscriminator3D(channels=(8, 16))
    video = smooth_video(jax.random.key(6), (1, 5, 16, 16, 3))
    recon = video + 0.1 * jax.random.normal(jax.random.key(7), video.shape)
    disc_vars = jax.jit(disc.init)(jax.random.key(8, impl="rbg"), video)
    post = DiagonalGaussian(jnp.zeros((1, 2, 4, 4, 4)), jnp.zeros((1, 2, 4, 4, 4)))
    config = VAELossConfig(perceptual_weight=1.0, perceptual_weights_path=str(path),
                           adversarial_weight=0.5, adversarial_start_step=10)
    kwargs = dict(perceptual_fn=make_perceptual_fn(path), disc_logits_fn=lambda v: disc.apply(disc_vars, v))
    loss_and_grad = jax.jit(jax.value_and_grad(
        lambda r, step: vae_loss(video, r, post, config, step=step, **kwargs), has_aux=True))
    (before, m_before), _ = loss_and_grad(recon, 0)
    (after, m_after), grads = loss_and_grad(recon, 10)
    assert float(m_before["adversarial_weight"]) == 0.0 and float(m_after["adversarial_weight"]) > 0.0
    assert float(m_before["perceptual"]) > 0.0
    assert float(after - before) == pytest.approx(float(m_after["adversarial_weight"] * m_after["generator"]), rel=1e-4)
    assert bool(jnp.isfinite(grads).all())
    assert disc.apply(disc_vars, video).shape == (1, 5, 4, 4, 1)  # one logit per 4x4 patch per frame
    with pytest.raises(ValueError, match="needs disc_logits_fn"):
        vae_loss(video, recon, post, VAELossConfig(adversarial_weight=0.1))


# --------------------------------------------------------------- latent stats


def test_latent_stats_normalize_to_unit_variance(tiny, clip):
    vae, variables = tiny
    batches = [clip, smooth_video(jax.random.key(9), clip.shape)]
    shift, scale = compute_latent_stats(vae, variables, batches)
    assert shift.shape == scale.shape == (4,)
    # With a key the stats are those of posterior samples (what training sees), wider than the means'.
    sampled_shift, sampled_scale = compute_latent_stats(vae, variables, batches, key=jax.random.key(5))
    assert np.all(np.asarray(sampled_scale) > np.asarray(scale)) and not np.allclose(sampled_shift, shift)
    variables = set_latent_stats(variables, shift, scale)
    z = jnp.concatenate([jitted(vae, "encode")(variables, b).mean for b in batches])
    normalized = vae.apply(variables, z, method=vae.normalize)
    np.testing.assert_allclose(normalized.reshape(-1, 4).mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalized.reshape(-1, 4).std(0), 1.0, atol=1e-3)
    np.testing.assert_allclose(vae.apply(variables, normalized, method=vae.denormalize), z, atol=1e-5)
    assert isinstance(variables["latent_stats"]["shift"], nn.LogicallyPartitioned)  # still boxed
    # The DiT-space shortcuts are exactly encode -> mode -> normalize and denormalize -> decode.
    np.testing.assert_allclose(jitted(vae, "encode_normalized")(variables, batches[0]), normalized[:1], atol=1e-5)
    np.testing.assert_allclose(jitted(vae, "decode_normalized")(variables, normalized[:1]),
                               jitted(vae, "decode")(variables, z[:1]), atol=1e-5)
    sampled = vae.apply(variables, batches[0], jax.random.key(3), method=vae.encode_normalized)
    assert sampled.shape == normalized[:1].shape and not np.allclose(sampled, normalized[:1])
    with pytest.raises(ValueError, match="no 'latent_stats' collection"):
        vae.apply({"params": variables["params"]}, z, method=vae.normalize)


def test_boxed_variables_export_and_load_back(tiny, clip, tmp_path):
    """``init``'s variables are boxed with logical names; exported as they are, they load back unboxed."""
    from vidiff.models.export import export_vae, load_vae

    vae, variables = tiny
    variables = set_latent_stats(variables, jnp.zeros(4), jnp.ones(4))
    assert isinstance(variables["latent_stats"]["shift"], nn.LogicallyPartitioned)
    umask = os.umask(0o027)
    try:
        export_vae(tmp_path, {"vae": True}, variables)
    finally:
        os.umask(umask)
    # The weights are as readable as vidiff.json, as the umask says (safetensors alone leaves them 0600).
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("vae.safetensors") == mode("vidiff.json") == 0o640
    loaded = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, nn.unbox({k: variables[k] for k in loaded}))


def test_patch_size_folds_pixels_and_keeps_causality_and_chunking():
    vae = VideoVAE(vae_preset("tiny", patch_size=2, spatial_down=(True, False)))
    assert vae.config.spatial_factor == 4
    variables = jax.jit(vae.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 1, 4, 4, 3)))
    assert nn.unbox(variables)["params"]["encoder"]["conv_in"]["conv"]["kernel"].shape[-2] == 12  # 2x2 px x RGB
    video = smooth_video(jax.random.key(3), (1, 9, 16, 16, 3))
    encode = jitted(vae, "encode")
    z = encode(variables, video).mean
    assert z.shape == (1, 3, 4, 4, 4)
    assert jitted(vae, "decode")(variables, z).shape == video.shape
    later = encode(variables, video.at[:, 5].set(-video[:, 5])).mean
    np.testing.assert_allclose(later[:, :2], z[:, :2], atol=1e-6)
    np.testing.assert_allclose(encode_chunked(vae, variables, video, 4).mean, z, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size=3 must be 1, 2 or 4"):
        vae_preset("tiny", patch_size=3)


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2), (2, 1, 1), (1, 2, 2)])
def test_conv3d_as_2d_matches_native_conv3d(strides):
    from vidiff.models.vae_layers import conv3d_as_2d

    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 8, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 5, 6))
    padding = ((0, 0), (1, 1), (1, 1))
    native = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NTHWC", "THWIO", "NTHWC"))
    folded = conv3d_as_2d(x, kernel, strides, padding)
    assert folded.shape == native.shape
    np.testing.assert_allclose(folded, native, atol=1e-4)


def test_time_kernels_one_make_a_per_frame_vae():
    cfg = vae_preset("tiny", temporal_down=(False, False), time_kernels=(1, 1, 1))
    vae = VideoVAE(cfg)
    video = jax.random.uniform(jax.random.key(0), (1, 3, 16, 16, 3), minval=-1, maxval=1)
    variables = vae.init(jax.random.key(1), video[:, :1])
    whole = vae.apply(variables, video)[0]
    frames = jnp.concatenate([vae.apply(variables, video[:, i:i + 1])[0] for i in range(3)], axis=1)
    np.testing.assert_allclose(whole, frames, atol=1e-5)
    with pytest.raises(ValueError, match=r"time_kernels=\(1, 2, 1\) needs one 1 or 3 per level"):
        vae_preset("tiny", time_kernels=(1, 2, 1))
