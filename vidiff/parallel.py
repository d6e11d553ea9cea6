"""Device mesh, the one table of logical-axis rules, and sharding helpers.

Every parameter in vidiff is created with ``nn.with_logical_partitioning`` and
every block-boundary activation passes ``nn.with_logical_constraint``, both
using the logical names below. ``LOGICAL_RULES`` maps those names to the mesh
axes ``data``, ``fsdp``, ``tensor`` and ``context``; changing the parallel
layout means changing this table (or passing another one), never the models.

Logical names
  parameters:  embed (model width), mlp (MLP hidden), heads, head_dim, vocab,
               mod (adaLN modulation outputs), patch (patch features in/out),
               conv_in / conv_out (conv channels), io_channels (pixel/latent-facing
               channels, never sharded), kernel_t / kernel_h / kernel_w
               (conv window; distinct names because flax refuses repeats),
               layers (a scanned stack of blocks), freq (sinusoid features)
  activations: batch, length (spacetime tokens), text_length, act_embed,
               act_heads, act_mlp, time, height, width, channels
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Logical name -> mesh axis (or axes, or None = replicated). A name whose mesh
# axis has size 1 costs nothing, so one table serves every layout.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("mod", "tensor"),
    ("patch", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("io_channels", None),
    ("kernel_t", None),
    ("kernel_h", None),
    ("kernel_w", None),
    ("layers", None),
    ("freq", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("text_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("time", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    context: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor, context); one size may be -1 (the rest).

    Raises a one-line ``ValueError`` naming the sizes when they do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(data=data, fsdp=fsdp, tensor=tensor, context=context)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}; give explicit sizes for the others")
    known = math.prod(v for v in sizes.values() if v != -1)
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if free:
        if len(devices) % known:
            raise ValueError(
                f"mesh: {len(devices)} devices are not divisible by the fixed axes {sizes} (product {known}); "
                "change mesh sizes so their product divides the device count"
            )
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())} but there are {len(devices)} devices; "
            "set one axis to -1 or make the product equal the device count"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Tree of logical ``PartitionSpec``s (e.g. from ``nn.get_partition_spec``) -> ``NamedSharding``s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def param_shardings(abstract_variables, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings for a (possibly abstract) variable tree built with logical partitioning."""
    return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over the data-parallel axes, replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules(rules: Mapping | Sequence = LOGICAL_RULES):
    """Context manager making ``rules`` active for ``nn.with_logical_constraint`` inside jit."""
    return nn.logical_axis_rules(tuple(rules.items()) if isinstance(rules, Mapping) else tuple(rules))
