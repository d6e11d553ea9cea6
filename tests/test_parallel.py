"""vidiff.parallel: mesh construction, its error messages, and the logical rules table."""
import jax
import jax.numpy as jnp
import numpy as np
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
    batch = jax.device_put(np.zeros((8, 3)), parallel.batch_sharding(mesh, 2))
    assert batch.sharding.shard_shape(batch.shape) == (2, 3)


def test_every_rule_names_known_mesh_axes():
    for name, axes in parallel.LOGICAL_RULES:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            assert axis in parallel.MESH_AXES, (name, axis)
    names = [name for name, _ in parallel.LOGICAL_RULES]
    assert len(names) == len(set(names))
