"""The frozen text encoder used by training, ``prepare`` and the pipeline.

``text_encoder("minilm")`` (the default) or ``text_encoder("t5:<dir>")`` gives a
``TextEncoder``: captions -> ``TextEmbeddings(tokens (B, L, D), mask (B, L),
pooled (B, D'), truncated (B,))`` as float32/bool numpy arrays. It holds its own
parameters, outside any optimizer, and every output passes ``stop_gradient``,
so the encoder is frozen by construction.

Captions repeat across epochs, so results are cached per caption: in memory
(LRU) and, with ``cache_dir``, on disk as one ``<sha256>.npz`` per caption
(keyed by the encoder's identity — kind, a hash of every byte of the weights and
of the tokenizer's files, config, max length, dtype, batch size — and the caption;
each weight file's digest is remembered in ``cache_dir/weight-digests.json``).
Only real tokens are stored; padded positions are zero by definition (see
``common.finish``), so a cache hit is bit-identical to a fresh computation.

A caption's embedding does not depend on which captions, or how many, were encoded
with it: ``encode`` runs the model on one fixed batch shape, ``(batch_size,
max_length)`` (the last chunk padded), and at a fixed shape a row's result depends
only on its own tokens (bitwise, whatever its neighbours and position: checked on
XLA:CPU for BERT, T5, umT5 and CLIP at batch 8 and 32; at batch 1 there are none).
Different batch shapes pick different matmul kernels (on XLA:CPU the same caption
differs by ~1e-6 between a batch of 1 and one of 8), so a resumed run, which starts
with an empty cache and meets its captions in other groupings, would otherwise
drift from the uninterrupted one. The default ``batch_size=1`` compiles one
program, needs no padding rows (which cost as much as real ones: a lone new caption
would pay for a whole larger batch, as every caption of ``vidiff prepare --latents``
does) and on XLA:CPU costs MiniLM about what batching did (the same at max_length
128, ~2x at 24); a larger one pays off on accelerators.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vidiff.io.files import save_npz
from vidiff.models.text import common, loading
from vidiff.models.text.registry import KINDS, abstract_init, read_model, resolve_name

class TextEmbeddings(NamedTuple):
    """Encoded captions (numpy): tokens (B, L, D) float32, zero where ``mask`` is False;
    mask (B, L) bool; pooled (B, D') float32; truncated (B,) bool."""

    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray
    truncated: np.ndarray


class TextEncoder:
    """A frozen text encoder with a tokenizer and a per-caption embedding cache.

    Build one with ``text_encoder`` / ``load_text_encoder``. ``encode(captions)`` is the
    host-side entry point (cached); ``apply(params, ids, mask)`` is the pure function
    for use inside your own ``jit`` and ``forward`` its jitted form.

    ``batch_size`` is the one batch shape ``encode`` ever runs: captions go through the
    model in chunks of exactly that many rows (the last chunk padded), so an embedding is
    the same bits whatever was encoded with it (``forward`` on your own batches gives no
    such promise). It is part of the cache identity.
    """

    def __init__(self, *, kind: str, module: nn.Module, params, tokenizer: loading.Tokenizer,
                 abstract_params=None, identity: str = "", cache_dir: str | Path | None = None,
                 batch_size: int = 1, memory_cache_size: int = 10_000):
        self.kind, self.module, self.params, self.tokenizer = kind, module, params, tokenizer
        if abstract_params is None:
            abstract_params = abstract_init(module, tokenizer.max_length)
        self.abstract_params = abstract_params  # boxed ShapeDtypeStructs: logical axis names
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise ValueError(f"text encoder batch_size={batch_size!r} must be an int >= 1 (captions per model call)")
        self.batch_size = batch_size
        self.memory_cache_size = int(memory_cache_size)
        self._memory: collections.OrderedDict[str, TextEmbeddings] = collections.OrderedDict()
        dtype = jnp.dtype(module.dtype).name
        self.cache_id = hashlib.sha256(
            f"{kind}|{identity}|{module.config!r}|{tokenizer.max_length}|{dtype}|batch{self.batch_size}".encode()
        ).hexdigest()[:16]
        self.forward = functools.partial(_forward, module)  # the jitted ``apply``
        out = jax.eval_shape(self.apply, params, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
        self.dim = out.tokens.shape[-1]  # width D of the token embeddings (what cross-attention sees)
        self.pooled_dim = out.pooled.shape[-1]  # width D' of the pooled vector
        self.forward_calls = self.cache_hits = self.cache_misses = 0
        self.captions_truncated = 0  # rows encode returned cut to max_length, cached or not (training reports it)

    # -- properties ---------------------------------------------------------------------
    @property
    def config(self):
        """The encoder module's config (``BertConfig``, ``T5Config`` or ``CLIPTextConfig``)."""
        return self.module.config

    @property
    def max_length(self) -> int:
        """Tokens per caption after padding / truncation."""
        return self.tokenizer.max_length

    @property
    def param_specs(self):
        """Logical ``PartitionSpec`` of every parameter (for ``vidiff.parallel``)."""
        return nn.get_partition_spec(self.abstract_params)

    # -- compute ------------------------------------------------------------------------
    def apply(self, params, ids: jax.Array, mask: jax.Array) -> common.TextOutput:
        """Pure forward (jit-able): ids/mask (B, L) -> ``TextOutput``, gradients stopped."""
        return _apply(self.module, params, ids, mask)

    def tokenize(self, texts: Sequence[str]) -> loading.Tokens:
        """Token ids, mask and truncation flags, padded to ``max_length``."""
        return self.tokenizer(texts)

    def shard(self, mesh, rules=None) -> "TextEncoder":
        """Place the parameters on ``mesh`` by their logical axis names (in place; returns self)."""
        from vidiff.parallel import LOGICAL_RULES, logical_to_sharding

        shardings = logical_to_sharding(self.param_specs, mesh, LOGICAL_RULES if rules is None else rules)
        self.params = jax.device_put(self.params, shardings)
        return self

    def encode(self, texts: Sequence[str], *, use_cache: bool = True) -> TextEmbeddings:
        """Encode captions (``""`` is the unconditional prompt) -> ``TextEmbeddings``."""
        if not isinstance(texts, (str, Sequence)):
            raise TypeError(f"text encoder: captions are {type(texts).__name__}, expected a str or a list of str")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not use_cache:
            return self._counted(_stack(self._compute(texts), self.max_length, self.dim, self.pooled_dim))
        found: list[TextEmbeddings | None] = [self._lookup(t) for t in texts]
        missing = list(dict.fromkeys(t for t, e in zip(texts, found) if e is None))
        if missing:
            fresh = dict(zip(missing, self._compute(missing)))
            self.cache_misses += len(missing)
            for t, e in fresh.items():
                self._store(t, e)
            found = [fresh[t] if e is None else e for t, e in zip(texts, found)]
        return self._counted(_stack(found, self.max_length, self.dim, self.pooled_dim))

    def _counted(self, embeddings: TextEmbeddings) -> TextEmbeddings:
        self.captions_truncated += int(embeddings.truncated.sum())
        return embeddings

    __call__ = encode

    def _compute(self, texts: list[str]) -> list[TextEmbeddings]:
        """Run the model on ``texts`` in chunks of exactly ``batch_size`` rows, the last one
        padded with copies of its first row: one compiled shape, and each caption's result
        independent of the others in its chunk, of their number and of its position (see
        the module docstring). Returns compact per-text entries."""
        tok = self.tokenize(texts)
        out: list[TextEmbeddings] = []
        b = self.batch_size
        for s in range(0, len(texts), b):
            ids, mask = tok.ids[s:s + b], tok.mask[s:s + b]
            n = len(ids)
            if b > n:
                ids = np.concatenate([ids, np.repeat(ids[:1], b - n, 0)])
                mask = np.concatenate([mask, np.repeat(mask[:1], b - n, 0)])
            res = jax.device_get(self.forward(self.params, ids, mask))
            self.forward_calls += 1
            for i in range(n):
                m = np.asarray(res.mask[i])
                out.append(TextEmbeddings(np.asarray(res.tokens[i][m], np.float32), m,
                                          np.asarray(res.pooled[i], np.float32), np.bool_(tok.truncated[s + i])))
        return out

    # -- cache --------------------------------------------------------------------------
    def cache_key(self, text: str) -> str:
        """sha256 of this encoder's identity and the caption: the on-disk file name."""
        return hashlib.sha256(f"{self.cache_id}\0{text}".encode()).hexdigest()

    def _lookup(self, text: str) -> TextEmbeddings | None:
        if not isinstance(text, str):
            raise TypeError(f"text encoder: caption is {type(text).__name__}, expected str (use '' for no prompt)")
        key = self.cache_key(text)
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
        elif self.cache_dir is not None and (self.cache_dir / f"{key}.npz").is_file():
            try:
                with np.load(self.cache_dir / f"{key}.npz", allow_pickle=False) as z:
                    entry = TextEmbeddings(z["tokens"], z["mask"], z["pooled"], z["truncated"][()])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a torn or foreign file: recompute it
                return None
            self._remember(key, entry)
        if entry is not None:
            self.cache_hits += 1
        return entry

    def _remember(self, key: str, entry: TextEmbeddings) -> None:
        if self.memory_cache_size <= 0:
            return
        self._memory[key] = entry
        while len(self._memory) > self.memory_cache_size:
            self._memory.popitem(last=False)

    def _store(self, text: str, entry: TextEmbeddings) -> None:
        key = self.cache_key(text)
        self._remember(key, entry)
        if self.cache_dir is not None:
            # Unsynced: a file a crash cuts short is recomputed like a foreign one (_lookup).
            save_npz(self.cache_dir / f"{key}.npz", dict(tokens=entry.tokens, mask=entry.mask, pooled=entry.pooled,
                                                         truncated=np.asarray(entry.truncated)), sync=False)

    def clear_memory_cache(self) -> None:
        """Forget the in-memory per-caption cache (the on-disk cache, if any, stays)."""
        self._memory.clear()


def _apply(module: nn.Module, params, ids, mask) -> common.TextOutput:
    params = jax.lax.stop_gradient(params)
    # float32 compute means full float32 matmuls: GPUs default to TF32 (~1e-3 relative
    # error vs. the reference); a frozen, cached encoder can afford exactness.
    exact = jnp.dtype(module.dtype) == jnp.float32
    with jax.default_matmul_precision("highest") if exact else contextlib.nullcontext():
        out = module.apply({"params": params}, ids, mask)
    return jax.tree.map(jax.lax.stop_gradient, out)


# Module-level jit with the (hashable) module static: encoders built from the same
# config share compiled programs.
_forward = jax.jit(_apply, static_argnums=0)


def _stack(entries: list[TextEmbeddings], length: int, dim: int, pooled_dim: int) -> TextEmbeddings:
    """Compact per-caption entries -> padded batch arrays."""
    if not entries:
        return TextEmbeddings(np.zeros((0, length, dim), np.float32), np.zeros((0, length), bool),
                              np.zeros((0, pooled_dim), np.float32), np.zeros((0,), bool))
    tokens = np.zeros((len(entries), length, dim), np.float32)
    for i, e in enumerate(entries):
        tokens[i, e.mask] = e.tokens
    return TextEmbeddings(tokens, np.stack([e.mask for e in entries]), np.stack([e.pooled for e in entries]),
                          np.asarray([bool(e.truncated) for e in entries]))


def load_text_encoder(kind: str, path: str | Path, *, max_length: int | None = None, dtype: Any = jnp.float32,
                      cache_dir: str | Path | None = None, online: bool = False, tokenizer: str | Path | None = None,
                      batch_size: int = 1, memory_cache_size: int = 10_000, **config_overrides) -> TextEncoder:
    """Load a ``kind`` ("bert", "t5" (also umT5), "clip") encoder from ``path``: a directory,
    an installed package or (cache / ``online``) a Hub repo id.

    ``dtype`` is the compute dtype (params stay float32); ``batch_size`` the fixed number of
    rows per model call (see ``TextEncoder``); ``config_overrides`` go to the model config
    (e.g. ``normalize=False`` for BERT).
    """
    if kind not in KINDS:
        raise ValueError(f"text encoder kind '{kind}' is unknown; valid: {', '.join(KINDS)}")
    model_file, module_cls, config_cls, default_length = KINDS[kind]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if unknown := sorted(set(config_overrides) - fields):
        raise ValueError(f"text encoder: unknown option(s) {unknown}; besides max_length, dtype, cache_dir, online, "
                         f"tokenizer, batch_size, memory_cache_size, a {kind} encoder takes its config's fields: "
                         f"{', '.join(sorted(fields))}")
    model_dir, config, state = read_model(kind, path, online=online, **config_overrides)
    params = model_file.params_from_hf(state, config)
    module = module_cls(config, dtype=jnp.dtype(dtype))

    if max_length is None:
        max_length = min(default_length, getattr(config, "max_position_embeddings", default_length))
    abstract = abstract_init(module, max_length)
    _check_params(params, nn.unbox(abstract), str(model_dir))
    params = jax.tree.map(jnp.asarray, params)

    tok_dir = Path(tokenizer) if tokenizer is not None else loading.find_tokenizer_dir(model_dir)
    tokenizer = loading.Tokenizer.from_dir(tok_dir, max_length)
    # Only the disk cache outlives this encoder: it alone needs the weights' identity (a full hash).
    identity = "" if cache_dir is None else loading.fingerprint(model_dir, tok_dir, memo_dir=cache_dir)
    return TextEncoder(kind=kind, module=module, params=params, abstract_params=abstract, tokenizer=tokenizer,
                       identity=identity, cache_dir=cache_dir, batch_size=batch_size,
                       memory_cache_size=memory_cache_size)


def text_encoder(name: str = "minilm", **kwargs) -> TextEncoder:
    """The registry: "minilm" (default; real weights from the installed package),
    "bert:<dir>", "t5:<dir>" (T5 or umT5), "clip:<dir>". ``kwargs`` as ``load_text_encoder``."""
    return load_text_encoder(*resolve_name(name, online=kwargs.get("online", False)), **kwargs)


def _check_params(params, expected, source: str) -> None:
    """Converted checkpoint vs. the module's own parameter tree: same names, same shapes."""
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    if got.keys() != want.keys():
        raise ValueError(f"{source}: checkpoint does not fit the model: missing {sorted(want.keys() - got.keys())[:3]}, "
                         f"unexpected {sorted(got.keys() - want.keys())[:3]}")
    bad = [(k, got[k], want[k]) for k in want if tuple(got[k]) != tuple(want[k])]
    if bad:
        k, g, w = bad[0]
        raise ValueError(f"{source}: parameter {k} has shape {g} in the checkpoint but the config implies {w}")
