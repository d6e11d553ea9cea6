"""Device mesh, the one table of logical-axis rules, and sharding helpers.

Every parameter in vidiff is created with ``nn.with_logical_partitioning`` and
every block-boundary activation passes ``nn.with_logical_constraint``, both
using the logical names below. ``LOGICAL_RULES`` maps those names to the mesh
axes ``data``, ``fsdp``, ``tensor`` and ``context``; changing the parallel
layout means changing the mesh sizes (a config's ``mesh`` section or a preset
in ``MESH_PRESETS``), never the models.

Logical names
  parameters:  embed (model width), mlp (MLP hidden), heads, head_dim, vocab,
               mod (adaLN modulation outputs), patch (patch features in/out),
               conv_in / conv_out (conv channels), io_channels (pixel/latent-facing
               channels, never sharded), kernel_t / kernel_h / kernel_w
               (conv window; distinct names because flax refuses repeats),
               layers (a scanned stack of blocks), freq (sinusoid features)
  activations: batch, length (spacetime tokens), text_length, act_embed,
               act_heads, act_mlp, time, height, width, channels

Across hosts (``jax.process_count() > 1``) the mesh is hybrid: each process's
devices form the fast (ICI / NVLink) part and processes are laid out along the
slow (DCN) axis, by default ``data`` (gradient all-reduce is the only traffic
that crosses hosts), so ``fsdp`` / ``tensor`` / ``context`` collectives stay
inside a host.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Named layouts; any size can still be overridden (e.g. fsdp_tensor with tensor=4).
MESH_PRESETS: dict[str, dict[str, int]] = {
    "dp": dict(data=-1, fsdp=1, tensor=1, context=1),  # replicated params, batch split
    "fsdp": dict(data=1, fsdp=-1, tensor=1, context=1),  # ZeRO-3: params, grads, optimizer state sharded
    "fsdp_tensor": dict(data=1, fsdp=-1, tensor=2, context=1),  # + Megatron-style heads / MLP split
    "fsdp_context": dict(data=1, fsdp=-1, tensor=1, context=2),  # + spacetime tokens split (long clips)
}

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


def mesh_sizes(spec: str | Mapping | None = None, **overrides) -> dict[str, int]:
    """Axis sizes from a preset name, ``"d,f,t,c"``, ``"fsdp=4,tensor=2"`` or a mapping (``preset`` key allowed).

    Sizes not given are 1 (``data`` is -1, the rest, when nothing else is); ``overrides`` win.
    """
    if spec is None:
        given = {}
    elif isinstance(spec, str):
        given = _parse_mesh_text(spec.strip())
    else:
        given = {k: v for k, v in dict(spec).items() if k != "dcn"}
    preset = given.pop("preset", None)
    if preset is not None:
        if preset not in MESH_PRESETS:
            raise ValueError(f"mesh.preset: unknown {preset!r}; valid: {sorted(MESH_PRESETS)}")
        given = {**MESH_PRESETS[preset], **given}
    given.update(overrides)
    unknown = sorted(set(given) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; valid: {list(MESH_AXES)} (and preset, dcn)")
    if not given:
        return dict(MESH_PRESETS["dp"])
    return {a: _axis_size(a, given.get(a, 1)) for a in MESH_AXES}


def _axis_size(axis: str, value) -> int:
    """``value`` as an int size; a one-line error naming ``mesh.<axis>`` for "x" or 2.5 (int() would truncate)."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = None
    if size is None or size != value and str(size) != str(value).strip():
        raise ValueError(f"mesh.{axis}={value!r} must be an int size (or -1 for the rest of the devices)")
    return size


def _parse_mesh_text(text: str) -> dict:
    if text in MESH_PRESETS:
        return {"preset": text}
    try:
        if "=" in text:
            pairs = (item.split("=") for item in text.split(","))
            return {k.strip(): (v.strip() if k.strip() == "preset" else int(v)) for k, v in pairs}
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(MESH_AXES):
        raise ValueError(f"mesh: {text!r} is not a preset {sorted(MESH_PRESETS)}, 'data,fsdp,tensor,context' sizes "
                         "or 'axis=size,...'; e.g. --mesh fsdp or --mesh 1,4,2,1")
    return dict(zip(MESH_AXES, values))


def resolve_sizes(sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Replace the one -1 by the rest of ``device_count``; one-line ``ValueError`` naming ``mesh.*`` otherwise."""
    sizes = {a: _axis_size(a, sizes.get(a, 1)) for a in MESH_AXES}
    if device_count < 1:
        raise ValueError("mesh: no devices to lay out; pass devices=None for all of jax.devices()")
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {['mesh.' + k for k in free]}; give the others sizes")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}; fix the mesh.* sizes")
    known = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if device_count % known:
            raise ValueError(
                f"mesh: {device_count} devices are not divisible by the fixed axes {sizes} (product {known}); "
                "change the mesh.* sizes so their product divides the device count"
            )
        sizes[free[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise ValueError(
            f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())} but there are {device_count} devices; "
            f"set one of mesh.data/fsdp/tensor/context to -1 or make the product {device_count}"
        )
    return sizes


def default_dcn(sizes: Mapping[str, int], processes: int) -> dict[str, int]:
    """Processes along ``data`` if it divides, else ``fsdp``: the axes whose traffic tolerates slow links."""
    for axis in ("data", "fsdp"):
        if sizes[axis] % processes == 0:
            return {axis: processes}
    raise ValueError(
        f"mesh: {processes} processes must split mesh.data ({sizes['data']}) or mesh.fsdp ({sizes['fsdp']}); "
        "make one a multiple of the process count, or give mesh.dcn explicitly"
    )


# Each process loads its own rows of the batch, so processes may span only the axes that split it.
DCN_AXES = ("data", "fsdp")


def check_dcn(dcn: Mapping[str, int]) -> None:
    """One-line errors for a ``mesh.dcn`` naming an unknown axis, or putting processes along an axis that
    does not split the batch (each process's rows would be read as the whole batch)."""
    if unknown := sorted(set(dcn) - set(MESH_AXES)):
        raise ValueError(f"mesh.dcn: unknown axes {unknown}; valid: {list(DCN_AXES)}")
    if across := [a for a in MESH_AXES if a in dcn and a not in DCN_AXES and int(dcn[a]) != 1]:
        raise ValueError(f"mesh.dcn: {dict(dcn)} puts processes along {', '.join(across)}; each process loads its "
                         f"own rows of the batch, so processes must span mesh.data or mesh.fsdp")


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    context: int = 1,
    devices: Sequence[jax.Device] | None = None,
    dcn: Mapping[str, int] | None = None,
) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor, context) and Auto axis types; one size may be -1 (the rest).

    With devices of several processes the device order is hybrid ICI x DCN
    (``dcn``: per-axis process counts, default :func:`default_dcn`). Raises a
    one-line ``ValueError`` naming the ``mesh.*`` sizes when they do not fit.
    """
    if dcn is not None:
        check_dcn(dcn)
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(dict(data=data, fsdp=fsdp, tensor=tensor, context=context), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    processes = len({d.process_index for d in devices})
    if processes > 1:
        dcn = {a: int(v) for a, v in (dcn or default_dcn(sizes, processes)).items()}
        dcn_shape = tuple(dcn.get(a, 1) for a in MESH_AXES)
        if math.prod(dcn_shape) != processes or any(s % d for s, d in zip(shape, dcn_shape)):
            raise ValueError(f"mesh.dcn: {dcn} must multiply to the {processes} processes and divide the sizes {sizes}")
        ici_shape = tuple(s // d for s, d in zip(shape, dcn_shape))
        array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, process_is_granule=True)
    else:
        array = np.asarray(devices).reshape(shape)
    # Auto axes: GSPMD propagates shardings from the logical constraints (Explicit would not).
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sampling_mesh(devices: int) -> Mesh | None:
    """Data parallelism over this process's first ``devices`` devices, as ``vidiff generate --devices`` samples;
    None for one device: no mesh, so nothing is copied or split."""
    return None if devices == 1 else make_mesh(data=devices, devices=jax.local_devices()[:devices])


def mesh_from_config(mesh_config: Mapping | str | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a config's ``mesh`` section asks for: sizes, an optional ``preset`` and optional ``dcn``."""
    dcn = None if isinstance(mesh_config, (str, type(None))) else dict(mesh_config).get("dcn")
    return make_mesh(**mesh_sizes(mesh_config), devices=devices, dcn=dict(dcn) if dcn else None)


def rule_pairs(rules: Mapping | Sequence) -> tuple:
    """A rules table as flax takes it, ``((logical name, mesh axes), ...)``: a dict is as good as pairs everywhere
    here (flax refuses one with "Unknown axis rule specification type")."""
    return tuple(rules.items()) if isinstance(rules, Mapping) else tuple(rules)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Tree of logical ``PartitionSpec``s (e.g. from ``nn.get_partition_spec``) -> ``NamedSharding``s."""
    check_rules(logical_specs, mesh, rules)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rule_pairs(rules))


def check_rules(logical_specs, mesh: Mesh, rules=LOGICAL_RULES) -> None:
    """One-line errors for a rules table that does not fit: flax would replicate an unnamed logical axis
    silently (FSDP that shards nothing), and a misspelt mesh axis fails in jax without naming the rule."""
    rules = rule_pairs(rules)
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if missing := [a for a in axes if a not in mesh.axis_names]:
            raise ValueError(f"rules: ({name!r}, {target!r}) maps to mesh axis {missing[0]!r}; the mesh has "
                             f"{mesh.axis_names}")
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    used = {n for spec in specs if isinstance(spec, PartitionSpec) for entry in spec if entry is not None
            for n in ((entry,) if isinstance(entry, str) else entry)}
    if unruled := sorted(used - {name for name, _ in rules}):
        raise ValueError(f"rules: logical axis name(s) {unruled} have no rule; add them to the rules table "
                         "(None to replicate; see vidiff.parallel.LOGICAL_RULES)")


def check_divisible(shapes, logical_specs, mesh: Mesh, rules=LOGICAL_RULES) -> None:
    """One line for the first array whose dimension a mesh size does not divide (fsdp=6 and a 32-channel conv),
    naming the array, its logical axis and the mesh field, before jax fails deep inside with tiling factors."""
    rules = dict(rule_pairs(rules))
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    flat_specs = jax.tree.leaves(logical_specs, is_leaf=is_spec)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for (path, leaf), spec in zip(flat_shapes, flat_specs):
        for dim, name in zip(getattr(leaf, "shape", ()), spec if is_spec(spec) else ()):
            target = rules.get(name) if isinstance(name, str) else None
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            split = math.prod(sizes[a] for a in axes)
            if split > 1 and dim % split:
                fields = " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
                raise ValueError(
                    f"{fields} does not divide {_path_name(path)} {tuple(leaf.shape)} along its "
                    f"{name!r} axis ({dim}); use a mesh.{axes[-1]} size that divides {dim}, or put the other "
                    f"devices on mesh.data")


def _path_name(path) -> str:
    """``params/vae/decoder/conv_out/kernel`` for a tree path (attribute, dict key or index entries)."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def param_shardings(abstract_variables, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings for a (possibly abstract) variable tree built with logical partitioning; a mesh size
    that does not divide a parameter is named in one line (``check_divisible``)."""
    specs = nn.get_partition_spec(abstract_variables)
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x, abstract_variables,
                          is_leaf=boxed)
    shardings = logical_to_sharding(specs, mesh, rules)  # first: the rules must name real mesh axes
    check_divisible(shapes, specs, mesh, rules)
    return shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Shard the leading (batch) axis over the data-parallel axes, replicate the rest."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def device_batch(local: Mapping, mesh: Mesh) -> dict:
    """This process's rows of a batch (host arrays) -> global arrays sharded over the data axes.

    Every process's rows appear once in the global batch: in process order when the processes span
    ``data`` (the default ``mesh.dcn``), interleaved when they span ``fsdp`` beside an in-host ``data``.
    """
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    for k, v in local.items():
        rows = np.shape(v)[0] * jax.process_count() if np.ndim(v) else 0
        if rows % ways or not rows:
            raise ValueError(f"batch: {k!r} has {rows} rows in all, not a multiple of the mesh's data x fsdp = {ways}; "
                             f"use a batch size that is")
    arrays = {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
              for k, v in local.items()}
    for k, v in arrays.items():
        if v.shape[0] != np.shape(local[k])[0] * jax.process_count():  # processes along tensor or context
            raise ValueError(f"batch: {k!r} has {v.shape[0]} rows on the mesh but the processes hold "
                             f"{np.shape(local[k])[0] * jax.process_count()}; processes must span mesh.data or "
                             f"mesh.fsdp (see vidiff.parallel.check_dcn)")
    return arrays


def gather(tree):
    """Every leaf as a full numpy array on every process (a collective: call it on all processes),
    e.g. parameters for export or samples to save on process 0."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def axis_rules(rules: Mapping | Sequence = LOGICAL_RULES):
    """Context manager making ``rules`` active for ``nn.with_logical_constraint`` inside jit."""
    return nn.logical_axis_rules(rule_pairs(rules))
