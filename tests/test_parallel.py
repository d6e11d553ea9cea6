"""vidiff.parallel: mesh construction, its error messages, and the logical rules table."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from vidiff import parallel


def test_eight_virtual_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "sizes,shape",
    [
        (dict(), (8, 1, 1, 1)),
        (dict(data=2, fsdp=-1), (2, 4, 1, 1)),
        (dict(data=1, fsdp=2, tensor=2, context=2), (1, 2, 2, 2)),
        (dict(data=1, fsdp=1, context=-1), (1, 1, 1, 8)),
    ],
)
def test_make_mesh_shapes(sizes, shape):
    mesh = parallel.make_mesh(**sizes)
    assert mesh.axis_names == parallel.MESH_AXES
    assert tuple(mesh.devices.shape) == shape


@pytest.mark.parametrize(
    "sizes,message",
    [
        (dict(data=3), "multiply to 3 but there are 8 devices"),
        (dict(data=-1, fsdp=3), "not divisible by the fixed axes"),
        (dict(data=-1, fsdp=-1), "only one axis may be -1"),
        (dict(data=0), "must be positive or -1"),
        (dict(data=2.5), r"mesh.data=2.5 must be an int size \(or -1 for the rest of the devices\)"),
        (dict(fsdp="x"), "mesh.fsdp='x' must be an int size"),
        (dict(devices=[]), "mesh: no devices to lay out"),
    ],
)
def test_make_mesh_errors_name_the_problem(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(**sizes)


def test_rules_map_logical_params_to_mesh():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param(
                "kernel", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (x.shape[-1], 16)
            )
            return x @ kernel

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.ones((4, 8)))
    sharding = parallel.param_shardings(abstract, mesh)["params"]["kernel"]
    assert sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # A rules table as a dict is taken wherever pairs are (flax itself refuses one).
    mine = {**dict(parallel.LOGICAL_RULES), "mlp": None}
    assert parallel.param_shardings(abstract, mesh, mine)["params"]["kernel"].spec == jax.sharding.PartitionSpec(
        "fsdp", None)
    batch = jax.device_put(np.zeros((8, 3)), parallel.batch_sharding(mesh, 2))
    assert batch.sharding.shard_shape(batch.shape) == (2, 3)
    # The DiT's tensor parallelism (Megatron-style): attention heads, the MLP's hidden units and the modulation
    # outputs split over 'tensor', the model width over 'fsdp'.
    from vidiff.models.dit import VideoDiT, dit_preset, dummy_inputs

    cfg = dit_preset("tiny")
    abstract = jax.eval_shape(VideoDiT(cfg).init, jax.random.key(0), *dummy_inputs(cfg))
    block = parallel.param_shardings(abstract, parallel.make_mesh(data=1, fsdp=4, tensor=2))["params"]["blocks_0"]
    P = jax.sharding.PartitionSpec
    for (module, layer), spec in {("self_attn", "query"): P("fsdp", "tensor", None),
                                  ("cross_attn", "key"): P("fsdp", "tensor", None),
                                  ("self_attn", "out"): P("tensor", None, "fsdp"),
                                  ("mlp", "fc1"): P("fsdp", "tensor"), ("mlp", "fc2"): P("tensor", "fsdp"),
                                  ("modulation", "proj"): P("fsdp", "tensor")}.items():
        assert block[module][layer]["kernel"].spec == spec, (module, layer)


def test_rules_that_do_not_fit_are_named_not_silently_replicated():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp"))
            return x @ self.param("kernel", init, (x.shape[-1], 16))

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    abstract = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.ones((4, 8)))
    without_embed = [rule for rule in parallel.LOGICAL_RULES if rule[0] != "embed"]
    with pytest.raises(ValueError, match=r"rules: logical axis name\(s\) \['embed'\] have no rule; add them"):
        parallel.param_shardings(abstract, mesh, without_embed)
    misspelt = [("embed", "dat"), *without_embed]
    with pytest.raises(ValueError, match=r"rules: \('embed', 'dat'\) maps to mesh axis 'dat'; the mesh has "
                                         r"\('data', 'fsdp', 'tensor', 'context'\)"):
        parallel.param_shardings(abstract, mesh, misspelt)


def test_a_mesh_size_that_does_not_divide_a_parameter_is_named_before_jax_tiles_it():
    from vidiff.models.vae import VideoVAE, vae_preset
    from vidiff.train.state import abstract_state

    vae = VideoVAE(vae_preset("tiny"))  # 16-channel convs: fsdp=6 cannot split them
    init = lambda key: vae.init(key, jnp.zeros((1, 1, 8, 8, 3)))["params"]  # noqa: E731
    tx = optax.adam(1e-3)
    with pytest.raises(ValueError, match=r"^mesh.fsdp=6 does not divide params/\S+/kernel \(.*\) along its "
                                         r"'conv_in' axis \(16\); use a mesh.fsdp size that divides 16, or put the "
                                         r"other devices on mesh.data$"):
        abstract_state(init, tx, parallel.make_mesh(data=1, fsdp=6, devices=jax.devices()[:6]))
    abstract_state(init, tx, parallel.make_mesh(data=2, fsdp=4))  # 4 divides every sharded dimension
    # The same line from param_shardings (a researcher's own jit), the parameter named without flax's box.
    with pytest.raises(ValueError, match=r"^mesh.fsdp=6 does not divide \S+/kernel \(.*\) along its 'conv_in'"):
        parallel.param_shardings(jax.eval_shape(init, jax.random.key(0)),
                                 parallel.make_mesh(data=1, fsdp=6, devices=jax.devices()[:6]))


def test_every_rule_names_known_mesh_axes():
    for name, axes in parallel.LOGICAL_RULES:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            assert axis in parallel.MESH_AXES, (name, axis)
    names = [name for name, _ in parallel.LOGICAL_RULES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "spec,sizes",
    [
        ("dp", (8, 1, 1, 1)),
        ("fsdp", (1, 8, 1, 1)),
        ("fsdp_tensor", (1, 4, 2, 1)),
        ("fsdp_context", (1, 4, 1, 2)),
        ("1,2,2,2", (1, 2, 2, 2)),
        ("fsdp=-1,context=4", (1, 2, 1, 4)),
        (dict(preset="fsdp_tensor", tensor=4), (1, 2, 4, 1)),
        (dict(data=-1, fsdp=1, tensor=1, context=1), (8, 1, 1, 1)),  # a config's mesh section
        (None, (8, 1, 1, 1)),
    ],
)
def test_mesh_presets_and_specs(spec, sizes):
    mesh = parallel.mesh_from_config(spec)
    assert tuple(mesh.devices.shape) == sizes
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)  # GSPMD-style propagation


@pytest.mark.parametrize(
    "spec,message",
    [
        ("fsdp_tensr", "not a preset"),
        ("1,2,2", "not a preset"),
        (dict(preset="zero3"), "mesh.preset: unknown 'zero3'"),
        (dict(pipeline=2), "mesh: unknown axes \\['pipeline'\\]"),
        ("data=3,fsdp=1,tensor=1,context=1", "set one of mesh.data/fsdp/tensor/context to -1"),
    ],
)
def test_mesh_spec_errors_are_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parallel.mesh_from_config(spec)
    assert "\n" not in str(info.value)


def test_processes_go_on_the_data_axis_when_it_divides():
    assert parallel.default_dcn(dict(data=2, fsdp=2, tensor=2, context=1), 2) == {"data": 2}
    assert parallel.default_dcn(dict(data=1, fsdp=8, tensor=1, context=1), 4) == {"fsdp": 4}
    with pytest.raises(ValueError, match="3 processes must split mesh.data"):
        parallel.default_dcn(dict(data=2, fsdp=2, tensor=2, context=1), 3)


@pytest.mark.parametrize("dcn, message", [
    ({"tensor": 2}, r"^mesh.dcn: \{'tensor': 2\} puts processes along tensor; each process loads its own rows of "
                    r"the batch, so processes must span mesh.data or mesh.fsdp$"),
    ({"data": 2, "context": 2}, "puts processes along context;"),
    ({"hosts": 2}, r"^mesh.dcn: unknown axes \['hosts'\]; valid: \['data', 'fsdp'\]$"),
])
def test_processes_may_span_only_the_axes_that_split_the_batch(dcn, message):
    """On tensor or context each process's devices would cover the whole batch, and each process's own rows
    would be read as all of it: different data on every host, silently. Refused even before a second process."""
    with pytest.raises(ValueError, match=message):
        parallel.mesh_from_config({"data": 4, "tensor": 2, "dcn": dcn})
    parallel.mesh_from_config({"data": 4, "tensor": 2, "dcn": {"data": 1, "tensor": 1}})


def test_device_batch_and_gather_roundtrip():
    mesh = parallel.make_mesh(data=2, fsdp=4)
    batch = parallel.device_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(parallel.gather(batch)["x"], np.arange(16.0).reshape(8, 2))
    with pytest.raises(ValueError, match=r"batch: 'x' has 3 rows in all, not a multiple of the mesh's data x fsdp = 8"):
        parallel.device_batch({"x": np.zeros((3, 2))}, mesh)
