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
  for any head count; each step is rematerialised in backward: memory O(tokens / context).

Both run under ``jax.shard_map`` over the mesh in context (``jax.set_mesh``, or the legacy
``with mesh:``), with batch on the data axes and heads on ``tensor`` as the logical rules
say. Sequences whose length is not a multiple of ``context`` are padded (padded keys are
masked, padded queries dropped). Masks may be key masks ``(B, S)`` / ``(B, 1, 1, S)``,
``kv_lengths`` and segment ids; a query with no valid key gets zeros from ``ring`` (the
dense kernels average all values instead; the DiT never produces such a query).
Attention between two different sequences (the DiT's cross-attention to text) stays local:
``attention.local_attention_impl`` maps these names to the auto local kernel.
Without a mesh, or with a ``context`` axis of size 1, both fall back to local attention.

A third, local implementation shares the ring's chunked online softmax: ``"chunked"``
(memory-efficient attention, Rabe & Staats) loops over query chunks and, inside, over
key/value chunks, rematerialising both in the backward pass, so activation memory grows
linearly with the tokens on any backend. cuDNN flash attention does this natively on GPU;
``vidiff plan`` uses ``chunked`` to estimate that memory from a CPU compile.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from vidiff import parallel
from vidiff.models import attention

_NEG = -1e30  # finite "minus infinity": keeps exp() and max() of fully masked blocks free of NaNs


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


def _key_mask(mask, batch: int, keys: int):
    """Normalise a key mask ``(B, S)`` / ``(B, 1, 1, S)`` to ``(B, S)`` bool; other masks are refused."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.ndim != 2 or mask.shape[-1] != keys:
        raise ValueError(f"attention_impl: context-parallel attention takes key masks (B, S), kv_lengths and "
                         f"segment ids; got a mask of shape {mask.shape}; use attention_impl=None for it")
    return jnp.broadcast_to(mask.astype(bool), (batch, keys))


def _pad(x, length: int, axis: int = 1, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _padded_ids(segment_ids, kv_segment_ids, tp: int, sp: int):
    """Segment ids padded with -2 (a padded query or key matches nothing real), or ``(None, None)``."""
    if segment_ids is None:
        return None, None
    kv = segment_ids if kv_segment_ids is None else kv_segment_ids
    return (_pad(jnp.asarray(segment_ids, jnp.int32), tp, value=-2),
            _pad(jnp.asarray(kv, jnp.int32), sp, value=-2))


def _context_call(name, body, q, k, v, *, mask, kv_lengths, segment_ids, kv_segment_ids):
    """Shared driver: find the mesh and axes, pad (``body.padded``), ``shard_map`` ``body``, unpad.

    ``body(q, k, v, aux, *, axis, context, local)`` gets sequence-sharded q/k/v and ``aux``:
    ``valid (B, S')`` (every key mask folded in, padding included), ``kv_lengths (B,)``,
    and, when given, ``key_mask (B, S')``, ``q_ids`` and ``kv_ids``; each sharded along the
    sequence for ring (``body.aux_sharded``) and whole on every device for Ulysses.
    """
    mesh = _current_mesh()
    ctx = _mesh_axes("length", mesh) if mesh is not None else ()
    local = attention.local_attention_impl(name)
    if len(ctx) != 1:  # no context parallelism in this layout: nothing to gain from the collectives
        return attention.attention(q, k, v, mask=mask, kv_lengths=kv_lengths, segment_ids=segment_ids,
                                kv_segment_ids=kv_segment_ids, implementation=local)
    axis = ctx[0]
    context = mesh.shape[axis]
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = body.padded(t, context), body.padded(s, context)
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    key_mask = _key_mask(mask, b, s)
    key_mask = None if key_mask is None else _pad(key_mask, sp, value=False)
    valid = jnp.arange(sp)[None, :] < lengths[:, None]
    valid = valid if key_mask is None else valid & key_mask
    q_ids, kv_ids = _padded_ids(segment_ids, kv_segment_ids, tp, sp)
    aux = {k: x for k, x in dict(valid=valid, kv_lengths=lengths, key_mask=key_mask, q_ids=q_ids,
                                  kv_ids=kv_ids).items() if x is not None}
    batch = _fitting(_mesh_axes("batch", mesh), b, mesh)
    heads = _fitting(_mesh_axes("act_heads", mesh), q.shape[2], mesh)
    qkv_spec = P(batch, axis, heads, None)
    seq = axis if body.aux_sharded else None
    aux_specs = {key: P(batch) if x.ndim == 1 else P(batch, seq) for key, x in aux.items()}
    fn = jax.shard_map(
        lambda q, k, v, aux: body(q, k, v, aux, axis=axis, context=context, local=local), mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, aux_specs), out_specs=qkv_spec)
    out = fn(_pad(q, tp), _pad(k, sp), _pad(v, sp), aux)[:, :t]
    return checkpoint_name(out, "attention")  # remat policies may keep it, as for local attention


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
    return _context_call("ulysses", _ulysses_body, q, k, v, mask=mask, kv_lengths=kv_lengths,
                         segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


# --------------------------------------------------------------------------- online softmax in chunks

CHUNK = 1024  # tokens per query / key chunk: one chunk pair's logits are CHUNK^2 per head


def _chunk_padded(n: int) -> int:
    """``n`` rounded up so it splits into equal chunks of at most CHUNK tokens."""
    return n if n <= CHUNK else -(-n // CHUNK) * CHUNK


def _online_block(carry, q, k, v, allowed):
    """Fold one key/value chunk into the running (output, max, denominator), all float32.

    ``q (b, t, h, d)``, ``k, v (b, s, h, d)``, ``allowed (b, t, s)``.
    """
    out, m, l = carry
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    allowed = allowed[:, None]
    logits = jnp.where(allowed, logits, _NEG)
    m_new = jnp.maximum(m, logits.max(-1))
    p = jnp.where(allowed, jnp.exp(logits - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(-1)
    pv = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out * jnp.swapaxes(correction, 1, 2)[..., None] + pv
    return out, m_new, l


def _fold(acc, q, k, v, valid, q_ids, kv_ids):
    """Fold keys/values ``(b, s, h, d)`` into the accumulators of queries ``(b, t, h, d)``, CHUNK x CHUNK
    at a time, each chunk rematerialised in backward: memory O(t + CHUNK^2) per head, not O(t * s).

    ``acc = (out (b, t, h, d), max (b, h, t), denominator (b, h, t))``; ``valid (b, s)`` key mask,
    ``q_ids (b, t)`` / ``kv_ids (b, s)`` segment ids. ``t`` and ``s`` split into equal chunks.
    """
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    cq, ck = min(CHUNK, t), min(CHUNK, s)
    split = lambda x, c: jnp.moveaxis(x.reshape(b, x.shape[1] // c, c, *x.shape[2:]), 1, 0)  # noqa: E731
    split_stats = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], t // cq, cq), 2, 0)  # noqa: E731
    keys = (split(k, ck), split(v, ck), split(valid, ck), split(kv_ids, ck))

    @jax.checkpoint  # backward keeps each query chunk's inputs only and recomputes its key loop
    def one_query_chunk(args):
        acc_c, q_c, ids_c = args

        @jax.checkpoint
        def step(acc, key):
            k_c, v_c, valid_c, kv_ids_c = key
            allowed = valid_c[:, None, :] & (ids_c[:, :, None] == kv_ids_c[:, None, :])
            return _online_block(acc, q_c, k_c, v_c, allowed), None

        return jax.lax.scan(step, acc_c, keys)[0]

    out, m, l = acc
    out, m, l = jax.lax.map(one_query_chunk, ((split(out, cq), split_stats(m), split_stats(l)), split(q, cq),
                                              split(q_ids, cq)))
    merge_stats = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, -1, t)  # noqa: E731
    return jnp.moveaxis(out, 0, 1).reshape(b, t, *out.shape[3:]), merge_stats(m), merge_stats(l)


def _empty_acc(q):
    """Zero output, -inf max, zero denominator for queries ``q``; made *like* ``q`` so that under
    ``shard_map`` they vary over the same mesh axes (scan carries must)."""
    stats = jnp.zeros_like(jnp.swapaxes(q[..., 0], 1, 2), jnp.float32)  # (b, h, t)
    return jnp.zeros_like(q, jnp.float32), stats + _NEG, stats


def _normalize(acc, dtype):
    """Output of the accumulators; a query with no valid key gets zeros."""
    out, _, l = acc
    l = jnp.swapaxes(l, 1, 2)[..., None]
    return jnp.where(l > 0, out / jnp.where(l > 0, l, 1.0), 0.0).astype(dtype)


# --------------------------------------------------------------------------- ring (ppermute + online softmax)


def _ring_body(q, k, v, aux, *, axis, context, local):
    del local
    perm = [(i, (i + 1) % context) for i in range(context)]
    q_ids = aux.get("q_ids")
    q_ids = jnp.zeros_like(q[..., 0, 0], jnp.int32) if q_ids is None else q_ids
    kv_ids = aux["kv_ids"] if "kv_ids" in aux else jnp.zeros_like(aux["valid"], jnp.int32)

    @jax.checkpoint  # keep only the carry per ring step; its chunks are recomputed in backward
    def step(carry, _):
        acc, k, v, valid, kv_ids = carry
        acc = _fold(acc, q, k, v, valid, q_ids, kv_ids)
        k, v, valid, kv_ids = jax.lax.ppermute((k, v, valid, kv_ids), axis, perm)
        return (acc, k, v, valid, kv_ids), None

    (acc, *_), _ = jax.lax.scan(step, (_empty_acc(q), k, v, aux["valid"], kv_ids), None, length=context)
    return _normalize(acc, q.dtype)


_ring_body.aux_sharded = True
# Every device's block splits into equal chunks.
_ring_body.padded = lambda n, context: _chunk_padded(-(-n // context)) * context


def ring_attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None):
    """Ring context-parallel attention; same arguments as :func:`attention.attention`."""
    return _context_call("ring", _ring_body, q, k, v, mask=mask, kv_lengths=kv_lengths,
                         segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)


# --------------------------------------------------------------------------- chunked (local, linear memory)


def chunked_attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None):
    """Memory-efficient local attention (query chunks x key chunks, online softmax); same arguments
    as :func:`attention.attention`. A query with no valid key gets zeros."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = _chunk_padded(t), _chunk_padded(s)
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    valid = jnp.arange(sp)[None, :] < lengths[:, None]
    key_mask = _key_mask(mask, b, s)
    if key_mask is not None:
        valid &= _pad(key_mask, sp, value=False)
    q_ids, kv_ids = _padded_ids(segment_ids, kv_segment_ids, tp, sp)
    if q_ids is None:
        q_ids, kv_ids = jnp.zeros((b, tp), jnp.int32), jnp.zeros((b, sp), jnp.int32)
    q = _pad(q, tp)
    acc = _fold(_empty_acc(q), q, _pad(k, sp), _pad(v, sp), valid, q_ids, kv_ids)
    return checkpoint_name(_normalize(acc, q.dtype)[:, :t], "attention")


attention.register_attention_impl("chunked", chunked_attention)
attention.register_attention_impl("ulysses", ulysses_attention, local=None)
attention.register_attention_impl("ring", ring_attention, local=None)
