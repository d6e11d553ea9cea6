"""Attention: the one kernel entry point, its registry of implementations, and the attention modules.

All attention math goes through :func:`attention`, a thin wrapper over
``jax.nn.dot_product_attention`` that turns padding lengths, key masks and
packed-sequence segment ids into the masks that function understands, and
picks cuDNN flash attention on GPU. Context parallelism (ring / Ulysses
attention under ``shard_map``, :mod:`vidiff.models.context_attention`) plugs in
here with :func:`register_attention_impl`; the modules never call a kernel
themselves. :class:`Attention` (self- or cross-attention with RMS qk-norm and
optional RoPE) and :class:`JointAttention` (MM-DiT) are the DiT's two kinds.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype
from jax.ad_checkpoint import checkpoint_name

from vidiff.models.layers import RMSNorm
from vidiff.models.rope import apply_rope

Dtype = Any

# --------------------------------------------------------------------------- attention core

# name -> fn(q, k, v, *, mask, kv_lengths, segment_ids, kv_segment_ids) -> out. vidiff.models.context_attention
# registers "ulysses" and "ring" (split over mesh.context) here, vidiff.models.chunked_attention "chunked"
# (local, linear memory), so models only ever pass a string.
_ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {}
# name -> the implementation to use for attention between two different sequences (cross-attention
# to text), which context parallelism leaves local.
_LOCAL_IMPLS: dict[str, str | None] = {}


def register_attention_impl(name: str, fn: Callable[..., jax.Array], *, local: str | None = "self") -> None:
    """Make ``attention(..., implementation=name)`` call ``fn`` (same keyword arguments as :func:`attention`).

    ``local``: what :func:`local_attention_impl` maps ``name`` to: ``"self"`` (``fn`` is fine for
    cross-attention too), or another implementation name / None (auto) for sequence-parallel ``fn``.
    """
    if name in ("xla", "cudnn"):
        raise ValueError(f"attention implementation name {name!r} is reserved for jax.nn.dot_product_attention")
    _ATTENTION_IMPLS[name] = fn
    _LOCAL_IMPLS[name] = name if local == "self" else local


def local_attention_impl(implementation: str | None) -> str | None:
    """The implementation cross-attention uses when self-attention uses ``implementation``."""
    return _LOCAL_IMPLS.get(implementation, implementation)


def resolve_attention_impl(implementation: str | None, dtype: Dtype, head_dim: int) -> str:
    """``None`` -> 'cudnn' (flash attention) on GPU for bf16/fp16 heads of <=128 dims, else 'xla'.

    ``jax.nn.dot_product_attention(implementation=None)`` currently always means XLA, so the
    choice of cuDNN on GPU is made here.
    """
    if implementation is not None:
        if implementation not in ("xla", "cudnn") and implementation not in _ATTENTION_IMPLS:
            valid = ["xla", "cudnn", *_ATTENTION_IMPLS]
            raise ValueError(f"attention_impl: unknown {implementation!r}; valid: None (auto), {valid}")
        return implementation
    fast_dtype = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and fast_dtype and head_dim <= 128 and head_dim % 8 == 0:
        return "cudnn"
    return "xla"


def attention(q, k, v, *, mask=None, kv_lengths=None, segment_ids=None, kv_segment_ids=None, implementation=None,
              pad_head_dim=None):
    """Scaled dot-product attention, ``q (B, T, H, D)``, ``k, v (B, S, H, D)`` -> ``(B, T, H, D)``.

    Args:
      mask: optional bool, True = attend; a key mask ``(B, S)`` (every 2-D mask is read
        as one) or a rank-4 mask broadcastable to ``(B, H, T, S)``, e.g. ``(1, 1, T, S)``
        for one over queries and keys. Prefer ``kv_lengths`` for right-padded keys.
      kv_lengths: optional int ``(B,)``: only keys ``[0, length)`` are attended (cuDNN flash
        attention handles this natively, without a dense mask). Lengths must be >= 1.
      segment_ids: optional int ``(B, T)`` for packed sequences: query i attends key j only if
        their ids are equal. ``kv_segment_ids (B, S)`` gives the keys' ids (default: the same
        ids, i.e. self-attention). On the cuDNN path a ``mask`` or segment ids become a dense
        ``(B, 1, T, S)`` mask (quadratic memory, per call); ``kv_lengths`` stays linear, so
        right-padded keys should come as lengths.
      implementation: None (auto, see :func:`resolve_attention_impl`), 'xla', 'cudnn', or a
        name registered with :func:`register_attention_impl`.
      pad_head_dim: optional size >= the head dim: q, k and v are zero-padded to it for the kernel
        and the output sliced back (zeros add nothing to the logits; the scale stays the true head
        dim's). Flash kernels are built for a few head sizes and round the others up; a size they
        have may run faster than the one they would pick (XL's 72). 'xla' and 'cudnn' only.
    """
    head_dim = q.shape[-1]
    impl = resolve_attention_impl(implementation, q.dtype, pad_head_dim or head_dim)
    if pad_head_dim is not None and (impl in _ATTENTION_IMPLS or pad_head_dim < head_dim):
        raise ValueError(f"pad_head_dim={pad_head_dim} needs an implementation 'xla' or 'cudnn' (got {impl!r}) "
                         f"and a size >= the head dim {head_dim}")
    if impl in _ATTENTION_IMPLS:
        return _ATTENTION_IMPLS[impl](
            q, k, v, mask=mask, kv_lengths=kv_lengths, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids
        )
    if mask is not None:
        if mask.ndim == 2 and mask.shape != (q.shape[0], k.shape[1]):  # a (T, S) mask would be read as (B, S)
            raise ValueError(f"mask: a 2-D mask is a key mask (batch {q.shape[0]}, keys {k.shape[1]}), got "
                             f"{tuple(mask.shape)}; give a mask over queries and keys as (1, 1, T, S)")
        mask = mask[:, None, None, :] if mask.ndim == 2 else mask
        mask = mask.astype(bool)
    if segment_ids is not None:
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        same = segment_ids[:, None, :, None] == kv_ids[:, None, None, :]
        mask = same if mask is None else jnp.logical_and(mask, same)
    if mask is not None and impl == "cudnn":  # cuDNN wants the full (query, key) extent of a mask
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], q.shape[1], k.shape[1]))
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
    if pad_head_dim is not None and pad_head_dim > head_dim:
        widths = [(0, 0)] * (q.ndim - 1) + [(0, pad_head_dim - head_dim)]
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=impl,
                                       scale=head_dim ** -0.5)[..., :head_dim]
    if impl == "cudnn":  # remat policies keep the kernel's own outputs (flash_attention_saveable); a named copy
        return out  # would be a second residual, stacked separately in scanned blocks
    # Named so remat policies can keep attention outputs (see vidiff.models.remat.REMAT_POLICIES).
    return checkpoint_name(out, "attention")


def flash_attention_saveable(prim, *_, **__) -> bool:
    """Remat policy: keep what cuDNN flash attention's forward kernel returns.

    Its outputs (the attention output and the softmax statistics, both linear in the sequence
    length) are all its backward needs besides q, k and v. Keeping the ``"attention"``-named
    output alone is not enough: the backward reads the kernel's own residuals, so under such a
    policy the T^2 forward kernel runs again in the backward pass.
    """
    return prim.name.startswith("dot_product_attention_fwd")


# --------------------------------------------------------------------------- head projections


def _einsum_dense(module, x, equation, kernel_shape, kernel_names, bias_names, init):
    """Kernel/bias created at their true (multi-axis) shapes with logical names, then an einsum.

    ``nn.DenseGeneral`` initialises a flattened 2D kernel, which a rank-3 logical-name box cannot
    constrain under ``jax.set_mesh``; creating the 3D kernel directly avoids that.
    """
    kernel = module.param("kernel", nn.with_logical_partitioning(init, kernel_names), kernel_shape, module.param_dtype)
    bias_shape = kernel_shape[-len(bias_names):]
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_names), bias_shape,
                        module.param_dtype)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    return jnp.einsum(equation, x, kernel) + bias


class ToHeads(nn.Module):
    """Projection ``(..., embed) -> (..., heads, head_dim)``."""

    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _einsum_dense(self, x, "...d,dhk->...hk", (x.shape[-1], self.heads, self.head_dim),
                             ("embed", "heads", "head_dim"), ("heads", "head_dim"),
                             nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2)))


class FromHeads(nn.Module):
    """Projection ``(..., heads, head_dim) -> (..., features)``; ``zero_init`` for branches that start at zero."""

    features: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.xavier_uniform(in_axis=(0, 1),
                                                                                                   out_axis=2)
        return _einsum_dense(self, x, "...hk,hkd->...d", (*x.shape[-2:], self.features),
                             ("heads", "head_dim", "embed"), ("embed",), init)

# --------------------------------------------------------------------------- attention modules


def _norm_and_rotate(module, q, k, q_name, k_name, rope):
    """The q/k RMS norms (``module``'s submodules ``q_name``, ``k_name``), then RoPE when ``rope`` is given;
    the two in one pass when ``module.fuse_rope`` (same parameters either way)."""
    norm_kw = dict(param_dtype=module.param_dtype, recompute=module.recompute_norms)
    query_norm, key_norm = RMSNorm(name=q_name, **norm_kw), RMSNorm(name=k_name, **norm_kw)
    if rope is not None and module.fuse_rope:
        return query_norm(q, rope), key_norm(k, rope)
    q, k = query_norm(q), key_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return q, k


class Attention(nn.Module):
    """Multi-head attention with RMS qk-norm: self-attention, or cross-attention when ``context`` is given.

    ``zero_out`` zero-initialises the output projection (an ungated residual branch that
    starts as the identity, e.g. cross-attention).
    """

    heads: int
    head_dim: int
    zero_out: bool = False
    implementation: str | None = None
    pad_head_dim: int | None = None  # see attention(): the size the kernel sees heads at
    recompute_norms: bool = False  # q/k norms rerun in backward (layers.rms_normalize)
    fuse_rope: bool = False  # q/k norms and RoPE in one pass (models.norm_rope)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, *, rope=None, mask=None, kv_lengths=None, segment_ids=None,
                 kv_segment_ids=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        source = x if context is None else context
        q = ToHeads(self.heads, self.head_dim, name="query", **kw)(x)
        k = ToHeads(self.heads, self.head_dim, name="key", **kw)(source)
        v = ToHeads(self.heads, self.head_dim, name="value", **kw)(source)
        q, k = _norm_and_rotate(self, q, k, "query_norm", "key_norm", rope)
        out = attention(q, k, v, mask=mask, kv_lengths=kv_lengths, segment_ids=segment_ids,
                        kv_segment_ids=kv_segment_ids, implementation=self.implementation,
                        pad_head_dim=self.pad_head_dim)
        return FromHeads(x.shape[-1], zero_init=self.zero_out, name="out", **kw)(out)


class JointAttention(nn.Module):
    """MM-DiT (SD3-style) attention: video and text streams have their own projections and qk-norms
    and attend jointly over the concatenation ``[video; text]``.

    Text follows video so right-padded text is still a key *length* (``N + text_length``) and
    cuDNN flash attention stays usable. RoPE rotates video tokens only (text is unpositioned).
    Returns the (video, text) outputs.
    """

    heads: int
    head_dim: int
    implementation: str | None = None
    pad_head_dim: int | None = None
    recompute_norms: bool = False
    fuse_rope: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, txt, *, rope=None, text_mask=None, text_lengths=None, segment_ids=None,
                 text_segment_ids=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(y, prefix, rope):
            q, k, v = (ToHeads(self.heads, self.head_dim, name=f"{prefix}_{n}", **kw)(y)
                       for n in ("query", "key", "value"))
            return (*_norm_and_rotate(self, q, k, f"{prefix}_query_norm", f"{prefix}_key_norm", rope), v)

        (qx, kx, vx), (qt, kt, vt) = project(x, "video", rope), project(txt, "text", None)
        n, (b, l) = x.shape[1], txt.shape[:2]
        q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((qx, qt), (kx, kt), (vx, vt)))
        mask = None if text_mask is None else jnp.concatenate([jnp.ones((b, n), bool), text_mask.astype(bool)], 1)
        ids = None
        if segment_ids is not None or text_segment_ids is not None:
            seg = jnp.zeros((b, n), jnp.int32) if segment_ids is None else segment_ids
            tseg = jnp.zeros((b, l), jnp.int32) if text_segment_ids is None else text_segment_ids
            ids = jnp.concatenate([seg, tseg], axis=1)
        kv_lengths = None if text_lengths is None else n + text_lengths
        out = attention(q, k, v, mask=mask, kv_lengths=kv_lengths, segment_ids=ids, implementation=self.implementation,
                        pad_head_dim=self.pad_head_dim)
        out_x = FromHeads(x.shape[-1], name="video_out", **kw)(out[:, :n])
        out_t = FromHeads(txt.shape[-1], name="text_out", **kw)(out[:, n:])
        return out_x, out_t
