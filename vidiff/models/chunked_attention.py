"""Chunked attention: an online softmax over query x key chunks with flash attention's VJP, on any backend.

``"chunked"`` (memory-efficient attention, Rabe & Staats; registered with
:func:`vidiff.models.attention.register_attention_impl`) loops over query chunks
and, inside, over key/value chunks of at most ``CHUNK`` tokens, so no
``(T, S)`` logits are ever held: activation memory grows linearly with the
tokens. Its VJP is flash attention's: the forward keeps q, k, v, the output and
the per-query log-sum-exp, and the backward recomputes each chunk's
probabilities once (differentiating the online softmax instead needs its chunks
rematerialised, which ran the logits up to four times). Both kept tensors are
named ``"attention"``, so the DiT's ``attention`` remat policy keeps them and
the backward never reruns the forward. cuDNN flash attention does all this
natively on GPU; ``vidiff plan`` uses ``chunked`` to estimate that memory from a
CPU compile. Ring attention (:mod:`vidiff.models.context_attention`) folds each
visiting key/value block in with :func:`fold` and :func:`fold_grads`.

Masks are key masks ``(B, S)``, ``kv_lengths`` and segment ids; a query with no
valid key gets zeros (the dense kernels average all values instead; the DiT
never produces such a query).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vidiff.models import attention

_NEG = -1e30  # finite "minus infinity": keeps exp() and max() of fully masked blocks free of NaNs


def as_key_mask(mask, batch: int, keys: int):
    """Normalise a key mask ``(B, S)`` / ``(B, 1, 1, S)`` to ``(B, S)`` bool; other masks are refused."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.ndim != 2 or mask.shape[-1] != keys:
        raise ValueError(f"attention_impl: chunked and context-parallel attention take key masks (B, S), "
                         f"kv_lengths and segment ids; got a mask of shape {mask.shape}; use attention_impl=None "
                         f"for it")
    return jnp.broadcast_to(mask.astype(bool), (batch, keys))


def valid_keys(mask, kv_lengths, batch: int, keys: int, padded: int):
    """``(valid, lengths, key_mask)``: ``valid (B, padded)`` folds the key mask, the lengths and the
    padding beyond ``keys`` together; ``lengths (B,)`` int32; ``key_mask (B, padded)`` or None."""
    lengths = jnp.full((batch,), keys, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    valid = jnp.arange(padded)[None, :] < lengths[:, None]
    key_mask = as_key_mask(mask, batch, keys)
    if key_mask is None:
        return valid, lengths, None
    key_mask = pad_to(key_mask, padded, value=False)
    return valid & key_mask, lengths, key_mask


def pad_to(x, length: int, axis: int = 1, value=0):
    """``x`` padded with ``value`` at the end of ``axis`` to ``length``."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def padded_segment_ids(segment_ids, kv_segment_ids, tp: int, sp: int):
    """Segment ids padded with -2 (a padded query or key matches nothing real), or ``(None, None)``."""
    if segment_ids is None:
        return None, None
    kv = segment_ids if kv_segment_ids is None else kv_segment_ids
    return (pad_to(jnp.asarray(segment_ids, jnp.int32), tp, value=-2),
            pad_to(jnp.asarray(kv, jnp.int32), sp, value=-2))


CHUNK = 1024  # tokens per query / key chunk: one chunk pair's logits are CHUNK^2 per head


def chunk_padded(n: int) -> int:
    """``n`` rounded up so it splits into equal chunks of at most CHUNK tokens."""
    return n if n <= CHUNK else -(-n // CHUNK) * CHUNK


def _split(x, chunk: int, axis: int = 1):
    """``(..., n, ...)`` -> ``(n / chunk, ..., chunk, ...)``: chunks first, for ``lax.scan`` / ``lax.map``."""
    x = x.reshape(*x.shape[:axis], x.shape[axis] // chunk, chunk, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis: int = 1):
    """Inverse of :func:`_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _logits(q, k, allowed):
    """Scaled, masked logits ``(b, h, t, s)`` in float32 of ``q (b, t, h, d)``, ``k (b, s, h, d)``."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    return jnp.where(allowed[:, None], logits, _NEG)


def _allowed(valid, q_ids, kv_ids):
    """``(b, t, s)``: key valid and in the query's segment."""
    return valid[:, None, :] & (q_ids[:, :, None] == kv_ids[:, None, :])


def _online_block(carry, q, k, v, allowed):
    """Fold one key/value chunk into the running (output, max, denominator), all float32."""
    out, m, l = carry
    logits = _logits(q, k, allowed)
    m_new = jnp.maximum(m, logits.max(-1))
    p = jnp.where(allowed[:, None], jnp.exp(logits - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l = l * correction + p.sum(-1)
    pv = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out * jnp.swapaxes(correction, 1, 2)[..., None] + pv
    return out, m_new, l


def _tied_to(q, *masks):
    """``masks``, made to depend on ``q`` (an optimisation barrier over both).

    Inside a scan (the DiT's scanned blocks) the masks are loop-invariant, and JAX's partial
    evaluation hoists loop-invariant work out of a scan body, stacking its per-chunk results:
    every chunk pair's ``(CHUNK, CHUNK)`` mask, quadratic memory in all. Tied to the queries,
    they are computed chunk by chunk, where they are used.
    """
    return jax.lax.optimization_barrier((q, masks))[1]


def fold(acc, q, k, v, valid, q_ids, kv_ids):
    """Fold keys/values ``(b, s, h, d)`` into the accumulators of queries ``(b, t, h, d)``, CHUNK x CHUNK
    at a time: memory O(t + CHUNK^2) per head, never O(t * s). Forward only (see :func:`_flash`).

    ``acc = (out (b, t, h, d), max (b, h, t), denominator (b, h, t))``; ``valid (b, s)`` key mask,
    ``q_ids (b, t)`` / ``kv_ids (b, s)`` segment ids. ``t`` and ``s`` split into equal chunks.
    """
    cq, ck = min(CHUNK, q.shape[1]), min(CHUNK, k.shape[1])
    valid, q_ids, kv_ids = _tied_to(q, valid, q_ids, kv_ids)
    keys = (_split(k, ck), _split(v, ck), _split(valid, ck), _split(kv_ids, ck))

    def one_query_chunk(args):
        acc_c, q_c, ids_c = args

        def step(acc, key):
            k_c, v_c, valid_c, kv_ids_c = key
            return _online_block(acc, q_c, k_c, v_c, _allowed(valid_c, ids_c, kv_ids_c)), None

        return jax.lax.scan(step, acc_c, keys)[0]

    out, m, l = acc
    out, m, l = jax.lax.map(one_query_chunk, ((_split(out, cq), _split(m, cq, 2), _split(l, cq, 2)),
                                              _split(q, cq), _split(q_ids, cq)))
    return _merge(out), _merge(m, 2), _merge(l, 2)


def fold_grads(q, k, v, valid, q_ids, kv_ids, lse, d_out, delta):
    """Flash-attention backward of one key/value block: float32 ``(dq, dk, dv)``, CHUNK x CHUNK at a time.

    The probabilities are recomputed once from the saved log-sum-exp ``lse (b, h, t)``;
    ``delta (b, h, t) = rowsum(d_out * out)``. Same chunking and memory as :func:`fold`.
    """
    cq, ck = min(CHUNK, q.shape[1]), min(CHUNK, k.shape[1])
    valid, q_ids, kv_ids = _tied_to(q, valid, q_ids, kv_ids)
    keys = (_split(k, ck), _split(v, ck), _split(valid, ck), _split(kv_ids, ck))
    scale = 1.0 / math.sqrt(q.shape[-1])

    def one_query_chunk(dkv, query):
        q_c, ids_c, lse_c, do_c, delta_c = query

        def one_key_chunk(carry, key):  # dk / dv updated in place: no stacked per-chunk copies
            dq_c, dk_all, dv_all = carry
            j, k_c, v_c, valid_c, kv_ids_c = key
            allowed = _allowed(valid_c, ids_c, kv_ids_c)
            p = jnp.where(allowed[:, None], jnp.exp(_logits(q_c, k_c, allowed) - lse_c[..., None]), 0.0)
            dv = jnp.einsum("bhts,bthd->bshd", p.astype(do_c.dtype), do_c, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bthd,bshd->bhts", do_c, v_c, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_c[..., None]) * scale).astype(q_c.dtype)
            dq_c = dq_c + jnp.einsum("bhts,bshd->bthd", ds, k_c, preferred_element_type=jnp.float32)
            dk = jnp.einsum("bhts,bthd->bshd", ds, q_c, preferred_element_type=jnp.float32)
            return (dq_c, dk_all.at[j].add(dk), dv_all.at[j].add(dv)), None

        (dq_c, *dkv), _ = jax.lax.scan(one_key_chunk, (jnp.zeros_like(q_c, jnp.float32), *dkv),
                                       (jnp.arange(keys[0].shape[0]), *keys))
        return tuple(dkv), dq_c

    dkv = (jnp.zeros_like(keys[0], jnp.float32), jnp.zeros_like(keys[1], jnp.float32))
    (dk, dv), dq = jax.lax.scan(one_query_chunk, dkv, (_split(q, cq), _split(q_ids, cq), _split(lse, cq, 2),
                                                      _split(d_out, cq), _split(delta, cq, 2)))
    return _merge(dq), _merge(dk), _merge(dv)


def empty_accumulators(q):
    """Zero output, -inf max, zero denominator for queries ``q``; made *like* ``q`` so that under
    ``shard_map`` they vary over the same mesh axes (scan carries must)."""
    stats = jnp.zeros_like(jnp.swapaxes(q[..., 0], 1, 2), jnp.float32)  # (b, h, t)
    return jnp.zeros_like(q, jnp.float32), stats + _NEG, stats


def finish(acc, dtype):
    """Output and log-sum-exp ``(b, h, t)`` of the accumulators, both named ``"attention"`` (what the
    backward keeps, so remat policies may keep them). A query with no valid key gets zeros and an lse
    of +1e30, so the backward's recomputed probabilities of it are exactly zero."""
    out, m, l = acc
    has_key = l > 0
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), -_NEG)
    denominator = jnp.swapaxes(jnp.where(has_key, l, 1.0), 1, 2)[..., None]
    out = jnp.where(jnp.swapaxes(has_key, 1, 2)[..., None], out / denominator, 0.0).astype(dtype)
    return checkpoint_name(out, "attention"), checkpoint_name(lse, "attention")


def softmax_delta(out, d_out):
    """``rowsum(d_out * out)`` as ``(b, h, t)`` float32: the softmax backward's per-query term."""
    return jnp.swapaxes(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 2)


# The custom VJP is flash attention's: forward keeps q, k, v, the output and the per-query
# log-sum-exp (all linear in the tokens); backward recomputes each chunk's probabilities once.
# Differentiating the online softmax instead would need its chunks rematerialised, and nested
# rematerialisation ran the logits up to four times.
@jax.custom_vjp
def _flash(q, k, v, valid, q_ids, kv_ids):
    return _flash_fwd(q, k, v, valid, q_ids, kv_ids)[0]


def _flash_fwd(q, k, v, valid, q_ids, kv_ids):
    out, lse = finish(fold(empty_accumulators(q), q, k, v, valid, q_ids, kv_ids), q.dtype)
    return out, (q, k, v, valid, q_ids, kv_ids, out, lse)


def _flash_bwd(res, d_out):
    q, k, v, valid, q_ids, kv_ids, out, lse = res
    dq, dk, dv = fold_grads(q, k, v, valid, q_ids, kv_ids, lse, d_out, softmax_delta(out, d_out))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None):
    """Memory-efficient local attention (query chunks x key chunks, online softmax); same arguments
    as :func:`attention.attention`. A query with no valid key gets zeros."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = chunk_padded(t), chunk_padded(s)
    valid, _, _ = valid_keys(mask, kv_lengths, b, s, sp)
    q_ids, kv_ids = padded_segment_ids(segment_ids, kv_segment_ids, tp, sp)
    if q_ids is None:
        q_ids, kv_ids = jnp.zeros((b, tp), jnp.int32), jnp.zeros((b, sp), jnp.int32)
    return _flash(pad_to(q, tp), pad_to(k, sp), pad_to(v, sp), valid, q_ids, kv_ids)[:, :t]


attention.register_attention_impl("chunked", chunked_attention)
