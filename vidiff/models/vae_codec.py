"""Running a ``VideoVAE`` on long clips and large frames, and measuring its latent statistics.

Everything here drives a model from outside, as ``f(vae, variables, ...)``;
``vidiff.models.vae`` re-exports it all.

    encode_chunked(vae, variables, video, chunk_frames)        # == encode, flat memory in T
    decode_chunked(vae, variables, latents, chunk_latent_frames)   # == decode, to host, flat device memory
    encode_tiled(vae, variables, video, tile_latent=32, overlap_latent=8)   # ~ encode, big frames
    decode_tiled(vae, variables, latents, tile_latent=32, overlap_latent=8)
    compiled(vae, "decode_normalized")(variables, latents)   # one jitted method, shared
    shift, scale = compute_latent_stats(vae, variables, video_batches)
    variables = set_latent_stats(variables, shift, scale)

Chunks are exact: each causal conv in the model keeps its last input frames in
the ``cache`` collection when applied with ``mutable=["cache"]``, and the next
chunk starts from them (to ~1e-6 in float32 on CPU; a GPU's default TF32 convs
pick per-shape algorithms, so expect ~1e-3 there unless
``jax_default_matmul_precision="highest"``). Tiles are approximate: a tile's
edge sees zero padding instead of its neighbours, so overlapping tiles are
blended with linear ramps.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vidiff.models.gaussian import DiagonalGaussian

if TYPE_CHECKING:
    from vidiff.models.vae import VideoVAE  # vae.py re-exports this module, so only type checkers import it

# ------------------------------------------------------------------ chunks and tiles


@functools.lru_cache(maxsize=32)
def compiled(vae: VideoVAE, method: str, with_cache: bool = False):
    """``jax.jit`` of ``vae.apply(variables, x, method=method)``, one per (module, method, mode).

    Cached, so every caller (training's latent cache and sample decode, latent
    precompute, the pipeline, the chunked and tiled codecs) shares one traced
    function, which re-traces per input shape. ``with_cache`` gives
    ``step(variables, cache, x) -> (out, cache)`` for chunked causal convs.
    """
    if not with_cache:
        return jax.jit(lambda variables, x: vae.apply(variables, x, method=method))

    def step(variables, cache, x):
        out, mutated = vae.apply({**variables, "cache": cache}, x, method=method, mutable=["cache"])
        return out, mutated.get("cache", {})

    return jax.jit(step)


def _chunks(total: int, first: int, size: int):
    bounds, start = [(0, min(first, total))], min(first, total)
    while start < total:
        bounds.append((start, min(start + size, total)))
        start += size
    return bounds


def encode_chunked(vae: VideoVAE, variables, video, chunk_frames: int, *,
                   first_chunk_frames: int = 1) -> DiagonalGaussian:
    """Encode ``video`` in temporal chunks, carrying each causal conv's past frames; equals ``encode``.

    The first chunk has ``first_chunk_frames = 1 + m*tf`` frames (frame 0 alone
    by default), the others ``chunk_frames`` (a multiple of the time factor).
    A host (NumPy) ``video`` goes to the device one chunk at a time, so device
    memory stays flat in clip length on the way in too.
    """
    cfg, tf = vae.config, vae.config.time_factor
    cfg.check_video_dtype(video.dtype)
    cfg.check_video_shape(video.shape)
    if (first_chunk_frames - 1) % tf or first_chunk_frames < 1:
        raise ValueError(f"first_chunk_frames={first_chunk_frames} must be 1 + m*{tf} (frame 0 is encoded alone)")
    if chunk_frames % tf or chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of the time factor {tf}")
    step, cache, parts = compiled(vae, "encode", True), {}, []
    for start, stop in _chunks(video.shape[1], first_chunk_frames, chunk_frames):
        posterior, cache = step(variables, cache, video[:, start:stop])
        parts.append(posterior)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)


def decode_chunked(vae: VideoVAE, variables, latents, chunk_latent_frames: int, *,
                   first_chunk_frames: int = 1) -> np.ndarray:
    """Decode ``latents`` a few latent frames at a time (first chunk ``first_chunk_frames``); equals ``decode``.

    Returns host memory (NumPy float32): each chunk's frames are copied out while
    the next chunk decodes, so the device holds at most two chunks of frames and
    its peak stays flat however long the clip (every caller ends on the host anyway).
    """
    vae.config.check_latent_shape(latents.shape)  # the whole clip's, before a chunk's shape could be blamed
    if chunk_latent_frames < 1 or first_chunk_frames < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_latent_frames={chunk_latent_frames}, "
                         f"first_chunk_frames={first_chunk_frames}")
    step, cache, parts, pending = compiled(vae, "decode", True), {}, [], None
    for start, stop in _chunks(latents.shape[1], first_chunk_frames, chunk_latent_frames):
        frames, cache = step(variables, cache, latents[:, start:stop])
        frames.copy_to_host_async()
        if pending is not None:
            parts.append(np.asarray(pending))  # waits for the previous chunk only; this one is queued
        pending = frames
    parts.append(np.asarray(pending))
    return np.concatenate(parts, axis=1)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]  # last tile flush with the edge: every tile has the same shape


def _ramp(n: int, overlap: int) -> np.ndarray:
    """Blend weights along one tile axis: linear over ``overlap`` at both ends, 1 inside, never 0."""
    i = np.arange(n, dtype=np.float32)
    return np.minimum(1.0, np.minimum(i + 1, n - i) / (overlap + 1))


def _blend_tiles(fn, x, tile: int, overlap: int, up: int = 1, down: int = 1):
    """Run ``fn`` on overlapping spatial tiles of ``x`` (axes 2, 3) and blend its outputs linearly.

    ``tile`` / ``overlap`` are in input pixels; an input position p maps to
    output position ``p * up // down`` (decode: up = sf; encode: down = sf).
    ``fn`` returns a tuple of arrays; the blended tuple comes back as a list of host (NumPy) arrays.
    """
    H, W = x.shape[2], x.shape[3]
    th, tw = min(tile, H), min(tile, W)
    to_out = lambda p: p * up // down
    totals = weight = None
    for y0 in _tile_starts(H, th, overlap):
        for x0 in _tile_starts(W, tw, overlap):
            outs = [np.asarray(o, np.float32) for o in fn(x[:, :, y0:y0 + th, x0:x0 + tw])]
            oh, ow = outs[0].shape[2:4]
            w = _ramp(oh, to_out(overlap))[:, None] * _ramp(ow, to_out(overlap))[None, :]
            w = w[None, None, :, :, None]
            if totals is None:  # accumulate on the host: tiles of big frames need not fit at once
                totals = [np.zeros((*o.shape[:2], to_out(H), to_out(W), o.shape[4]), np.float32) for o in outs]
                weight = np.zeros((*outs[0].shape[:2], to_out(H), to_out(W), 1), np.float32)
            region = np.s_[:, :, to_out(y0):to_out(y0) + oh, to_out(x0):to_out(x0) + ow]
            for total, o in zip(totals, outs):
                total[region] += o * w
            weight[region] += w
    return [total / weight for total in totals]


def encode_tiled(vae: VideoVAE, variables, video, tile_latent: int = 32, overlap_latent: int = 8,
                 chunk_frames: int | None = None) -> DiagonalGaussian:
    """Encode large frames as overlapping spatial tiles (sizes in latent pixels), blended linearly.

    Close to, not equal to, ``encode``: a tile's edge sees zero padding instead
    of its neighbours. ``chunk_frames`` also chunks each tile in time.
    """
    sf = vae.config.spatial_factor
    _check_tiles(tile_latent, overlap_latent)
    vae.config.check_video_shape(video.shape)

    def encode(tile):
        if chunk_frames:
            p = encode_chunked(vae, variables, tile, chunk_frames)
        else:
            p = compiled(vae, "encode")(variables, tile)
        return p.mean, p.logvar

    mean, logvar = _blend_tiles(encode, video, tile_latent * sf, overlap_latent * sf, down=sf)
    return DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))  # latents go on to device models


def decode_tiled(vae: VideoVAE, variables, latents, tile_latent: int = 32, overlap_latent: int = 8,
                 chunk_latent_frames: int | None = None) -> np.ndarray:
    """Decode large latents as overlapping spatial tiles, blending pixels linearly across the overlap (on the host)."""
    sf = vae.config.spatial_factor
    vae.config.check_latent_shape(latents.shape)
    _check_tiles(tile_latent, overlap_latent)

    def decode(tile):
        if chunk_latent_frames:
            return (decode_chunked(vae, variables, tile, chunk_latent_frames),)
        return (compiled(vae, "decode")(variables, tile),)

    return _blend_tiles(decode, latents, tile_latent, overlap_latent, up=sf)[0]


def _check_tiles(tile: int, overlap: int):
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap_latent={overlap} must be >= 0 and smaller than tile_latent={tile}")


# -------------------------------------------------------------------- latent stats


def compute_latent_stats(vae: VideoVAE, variables, videos: Iterable, *, key: jax.Array | None = None):
    """Per-channel (shift, scale) = mean and std of the latents of ``videos`` (an iterable of batches).

    Uses the posterior mean, or samples when ``key`` is given (what training sees).
    Accumulates in float64 on the host, so any number of batches fits.
    """
    encode = compiled(vae, "encode")
    c = vae.config.latent_channels
    total, total_sq, count = np.zeros(c), np.zeros(c), 0
    for i, video in enumerate(videos):
        posterior = encode(variables, video)
        z = posterior.mode() if key is None else posterior.sample(jax.random.fold_in(key, i))
        z = np.asarray(z, np.float64).reshape(-1, c)
        total, total_sq, count = total + z.sum(0), total_sq + np.square(z).sum(0), count + z.shape[0]
    if count == 0:
        raise ValueError("compute_latent_stats: videos yielded no batches")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return jnp.asarray(mean, jnp.float32), jnp.asarray(np.maximum(std, 1e-6), jnp.float32)


def set_latent_stats(variables, shift, scale) -> dict:
    """A copy of ``variables`` whose ``latent_stats`` hold ``shift`` / ``scale`` (boxed or not)."""
    def put(old, new):
        new = jnp.asarray(new, jnp.float32)
        return old.replace_boxed(new) if isinstance(old, nn.meta.AxisMetadata) else new

    stats = variables["latent_stats"]
    channels = nn.meta.unbox(stats["shift"]).shape
    for name, value in (("shift", shift), ("scale", scale)):
        if np.shape(value) != channels:  # a scalar or a wrong length would broadcast silently, or fail in normalize
            raise ValueError(f"set_latent_stats: {name} needs shape {channels} (one per latent channel), "
                             f"got {np.shape(value)}")
    if not np.all(np.asarray(scale) > 0):
        raise ValueError(f"set_latent_stats: scale must be positive, got {np.asarray(scale)}")
    return {**variables, "latent_stats": {"shift": put(stats["shift"], shift), "scale": put(stats["scale"], scale)}}
