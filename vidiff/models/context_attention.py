"""Context-parallel self-attention: spacetime tokens split over the mesh's ``context`` axis.

Two context-parallel implementations, registered with :func:`vidiff.models.attention.register_attention_impl`
and chosen by name (``DiTConfig.attention_impl``; in a config ``dit.overrides.attention_impl="ring"``):

* ``"ulysses"`` (DeepSpeed-Ulysses): an all-to-all turns sequence-sharded q/k/v into
  head-sharded ones, each device attends over the *whole* sequence for ``heads / context``
  heads with the ordinary local kernel (cuDNN flash attention on GPU), and a second
  all-to-all turns the output back. Needs ``heads / tensor`` divisible by ``context``.
* ``"ring"`` (ring attention): each device keeps its query block and the key/value blocks
  travel around the ring (``ppermute``); an online softmax folds each block in, CHUNK x CHUNK
  tokens at a time, so no device holds the full sequence or a full block of logits. Works
  for any head count. Its VJP is flash attention's: the forward keeps only the output and
  the per-query log-sum-exp, and the backward sends the blocks round the ring again with
  their dk / dv, recomputing each chunk's probabilities once: memory O(tokens / context).

Both run under ``jax.shard_map`` over the mesh in context (``jax.set_mesh``, or the legacy
``with mesh:``), with batch on the data axes and heads on ``tensor`` as the logical rules
say. Sequences whose length is not a multiple of ``context`` are padded (padded keys are
masked, padded queries dropped). Masks may be key masks ``(B, S)`` / ``(B, 1, 1, S)``,
``kv_lengths`` and segment ids; a query with no valid key gets zeros from ``ring`` (the
dense kernels average all values instead; the DiT never produces such a query).
Attention between two different sequences (the DiT's cross-attention to text) stays local:
``attention.local_attention_impl`` maps both names to ``"context_local"``, which attends each
device's own queries to keys every device holds whole, with the local kernel under ``shard_map``
(left to GSPMD, cuDNN's partitioner refuses a query sharded along the sequence).
Without a mesh, or with a ``context`` axis of size 1, all three fall back to local attention.

The online softmax both ring and the local ``"chunked"`` implementation use lives in
:mod:`vidiff.models.chunked_attention`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from vidiff import parallel
from vidiff.models import attention
from vidiff.models.chunked_attention import (as_key_mask, chunk_padded, empty_accumulators, finish, fold, fold_grads,
                                             pad_to, padded_segment_ids, softmax_delta, valid_keys)


def _current_mesh():
    """The mesh in context: ``jax.set_mesh`` (abstract) or the deprecated ``with mesh:`` (physical)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    from jax._src import mesh as mesh_lib  # only place the legacy context mesh is visible

    physical = mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def _mesh_axes(logical: str, mesh) -> tuple[str, ...]:
    """Mesh axes (size > 1) a logical activation name maps to under the active rules."""
    rules = nn.get_logical_axis_rules() or parallel.LOGICAL_RULES
    spec = nn.logical_to_mesh_axes((logical,), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def _fitting(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...] | None:
    """``axes`` if ``size`` splits evenly over them, else None (replicated): init traces batch 1."""
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None


class _Layout(NamedTuple):
    """Where sequence-sharded attention runs: the mesh, its context axis and size, and the mesh axes of the
    batch and the heads (None: replicated)."""
    mesh: object
    axis: str
    context: int
    batch: tuple[str, ...] | None
    heads: tuple[str, ...] | None


def _context_layout(q) -> _Layout | None:
    """The layout for ``q (B, T, heads, D)`` under the mesh in context; None without one context axis of size
    > 1, where there is nothing to gain from the collectives and callers attend locally."""
    mesh = _current_mesh()
    ctx = _mesh_axes("length", mesh) if mesh is not None else ()
    if len(ctx) != 1:
        return None
    return _Layout(mesh, ctx[0], mesh.shape[ctx[0]], _fitting(_mesh_axes("batch", mesh), q.shape[0], mesh),
                   _fitting(_mesh_axes("act_heads", mesh), q.shape[2], mesh))


def _context_call(body, q, k, v, *, mask, kv_lengths, segment_ids, kv_segment_ids):
    """Shared driver: find the layout, pad (``body.padded``), ``shard_map`` ``body``, unpad.

    ``body(q, k, v, aux, *, axis, context, local)`` gets sequence-sharded q/k/v and ``aux``:
    ``valid (B, S')`` (every key mask folded in, padding included), ``kv_lengths (B,)``,
    and, when given, ``key_mask (B, S')``, ``q_ids`` and ``kv_ids``; each sharded along the
    sequence for ring (``body.aux_sharded``) and whole on every device for Ulysses.
    """
    layout = _context_layout(q)
    local = None  # the auto kernel: cuDNN flash attention on a GPU
    if layout is None:
        return attention.attention(q, k, v, mask=mask, kv_lengths=kv_lengths, segment_ids=segment_ids,
                                   kv_segment_ids=kv_segment_ids, implementation=local)
    mesh, axis, context, batch, heads = layout
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = body.padded(t, context), body.padded(s, context)
    valid, lengths, key_mask = valid_keys(mask, kv_lengths, b, s, sp)
    q_ids, kv_ids = padded_segment_ids(segment_ids, kv_segment_ids, tp, sp)
    aux = {k: x for k, x in dict(valid=valid, kv_lengths=lengths, key_mask=key_mask, q_ids=q_ids,
                                  kv_ids=kv_ids).items() if x is not None}
    qkv_spec = P(batch, axis, heads, None)
    seq = axis if body.aux_sharded else None
    aux_specs = {key: P(batch) if x.ndim == 1 else P(batch, seq) for key, x in aux.items()}
    fn = jax.shard_map(
        lambda q, k, v, aux: body(q, k, v, aux, axis=axis, context=context, local=local), mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, aux_specs), out_specs=qkv_spec)
    # Not named for remat policies here: the kernels inside name what their backward needs.
    return fn(pad_to(q, tp), pad_to(k, sp), pad_to(v, sp), aux)[:, :t]


# --------------------------------------------------------------------------- Ulysses (all-to-all)


def _ulysses_body(q, k, v, aux, *, axis, context, local):
    if q.shape[2] % context:
        raise ValueError(f"attention_impl='ulysses': {q.shape[2]} heads per tensor shard are not divisible by "
                         f"mesh.context={context}; use attention_impl='ring' or a context size dividing the heads")
    # sequence-sharded (b, n/c, h, d) -> head-sharded (b, n, h/c, d), and back afterwards
    to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
    # Lengths (not a dense mask) keep cuDNN flash attention usable; padding is beyond every length.
    out = attention.attention(to_heads(q), to_heads(k), to_heads(v), mask=aux.get("key_mask"),
                           kv_lengths=aux["kv_lengths"], segment_ids=aux.get("q_ids"), kv_segment_ids=aux.get("kv_ids"),
                           implementation=local)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


_ulysses_body.aux_sharded = False
_ulysses_body.padded = lambda n, context: -(-n // context) * context


def ulysses_attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None):
    """All-to-all (Ulysses) context-parallel attention; same arguments as :func:`attention.attention`."""
    return _context_call(_ulysses_body, q, k, v, mask=mask, kv_lengths=kv_lengths,
                         segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


# --------------------------------------------------------------------------- ring (ppermute + online softmax)


# Forward: each step folds the visiting key/value block into the local queries' accumulators and
# passes the block on. Backward: a second trip round the ring carries each block with its dk / dv
# accumulators, which are back on the block's own device after ``context`` steps.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ring(q, k, v, valid, q_ids, kv_ids, axis, context):
    return _ring_fwd(q, k, v, valid, q_ids, kv_ids, axis, context)[0]


def _ring_fwd(q, k, v, valid, q_ids, kv_ids, axis, context):
    perm = [(i, (i + 1) % context) for i in range(context)]

    def step(carry, _):
        acc, block = carry
        acc = fold(acc, q, *block[:3], q_ids, block[3])
        return (acc, jax.lax.ppermute(block, axis, perm)), None

    # context - 1 steps pass the block on; the last one's block has nowhere it is needed
    (acc, last), _ = jax.lax.scan(step, (empty_accumulators(q), (k, v, valid, kv_ids)), None, length=context - 1)
    out, lse = finish(fold(acc, q, *last[:3], q_ids, last[3]), q.dtype)
    return out, (q, k, v, valid, q_ids, kv_ids, out, lse)


def _ring_bwd(axis, context, res, d_out):
    q, k, v, valid, q_ids, kv_ids, out, lse = res
    perm = [(i, (i + 1) % context) for i in range(context)]
    delta = softmax_delta(out, d_out)

    def step(carry, _):
        dq, block = carry
        k, v, valid, kv_ids, dk, dv = block
        dq_s, dk_s, dv_s = fold_grads(q, k, v, valid, q_ids, kv_ids, lse, d_out, delta)
        block = (k, v, valid, kv_ids, dk + dk_s, dv + dv_s)
        return (dq + dq_s, jax.lax.ppermute(block, axis, perm)), None

    zeros = lambda x: jnp.zeros_like(x, jnp.float32)  # noqa: E731
    (dq, (*_, dk, dv)), _ = jax.lax.scan(step, (zeros(q), (k, v, valid, kv_ids, zeros(k), zeros(v))), None,
                                         length=context)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_body(q, k, v, aux, *, axis, context, local):
    del local
    q_ids = aux.get("q_ids")
    q_ids = jnp.zeros_like(q[..., 0, 0], jnp.int32) if q_ids is None else q_ids
    kv_ids = aux["kv_ids"] if "kv_ids" in aux else jnp.zeros_like(aux["valid"], jnp.int32)
    return _ring(q, k, v, aux["valid"], q_ids, kv_ids, axis, context)


_ring_body.aux_sharded = True
# Every device's block splits into equal chunks.
_ring_body.padded = lambda n, context: chunk_padded(-(-n // context)) * context


def ring_attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None):
    """Ring context-parallel attention; same arguments as :func:`attention.attention`."""
    return _context_call(_ring_body, q, k, v, mask=mask, kv_lengths=kv_lengths,
                         segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


# --------------------------------------------------------------------------- sharded queries, whole keys


def context_local_attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None):
    """Queries split over ``context``, keys and values whole on every device (cross-attention to text):
    each device attends its own queries with the local kernel; same arguments as :func:`attention.attention`.

    No collective but the keys' gather, if they arrive split. Queries are padded to a multiple of
    ``context`` (segment id -2: they match nothing) and the padding dropped.
    """
    layout = _context_layout(q)
    if layout is None:
        return attention.attention(q, k, v, mask=mask, kv_lengths=kv_lengths, segment_ids=segment_ids,
                                   kv_segment_ids=kv_segment_ids)
    mesh, axis, context, batch, heads = layout
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp = -(-t // context) * context
    q_ids, kv_ids = padded_segment_ids(segment_ids, kv_segment_ids, tp, s)
    aux = {name: x for name, x in dict(key_mask=as_key_mask(mask, b, s), kv_lengths=kv_lengths, q_ids=q_ids,
                                       kv_ids=kv_ids).items() if x is not None}
    aux_specs = {name: P(batch) if x.ndim == 1 else P(batch, axis if name == "q_ids" else None)
                 for name, x in aux.items()}

    def local(q, k, v, aux):
        return attention.attention(q, k, v, mask=aux.get("key_mask"), kv_lengths=aux.get("kv_lengths"),
                                   segment_ids=aux.get("q_ids"), kv_segment_ids=aux.get("kv_ids"))

    fn = jax.shard_map(local, mesh=mesh, out_specs=P(batch, axis, heads, None),
                       in_specs=(P(batch, axis, heads, None), P(batch, None, heads, None), P(batch, None, heads, None),
                                 aux_specs))
    return fn(pad_to(q, tp), k, v, aux)[:, :t]


# --------------------------------------------------------------------------- registration

attention.register_attention_impl("context_local", context_local_attention)
attention.register_attention_impl("ulysses", ulysses_attention, local="context_local")
attention.register_attention_impl("ring", ring_attention, local="context_local")
