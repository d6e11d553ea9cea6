"""Spacetime patches: latents <-> token rows, their (time, height, width) positions, and NaViT-style packing.

A latent clip ``(t, h, w, c)`` is cut into patches of ``(pt, ph, pw)`` cells and
flattened in (time, height, width) raster order; each token's grid position
feeds RoPE. Packing puts several clips of different shapes into one row
(host-side NumPy, so it can run in data-loader workers); segment ids keep their
attention apart and :func:`unpack_clips` splits the model's outputs again.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from einops import rearrange


def _check_divisible(shape: Sequence[int], patch: Sequence[int]) -> None:
    for axis, size, p in zip(("time", "height", "width"), shape, patch):
        if size % p:
            raise ValueError(f"patch: latent {axis} {size} is not divisible by patch {tuple(patch)}; crop/pad latents")


def patchify(x, patch: Sequence[int]):
    """Latents ``(B, t, h, w, c)`` -> tokens ``(B, N, pt*ph*pw*c)`` in (time, height, width) raster order."""
    if np.ndim(x) != 5:
        raise ValueError(f"patchify: latents must be (B, t, h, w, c), got shape {np.shape(x)}")
    _check_divisible(x.shape[1:4], patch)
    pt, ph, pw = patch
    return rearrange(x, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def token_count(latent_shape: Sequence[int], patch: Sequence[int]) -> int:
    """Spacetime patches in latents of ``latent_shape`` ``(t, h, w, ...)`` cut into ``patch`` ``(pt, ph, pw)``."""
    return math.prod(s // p for s, p in zip(latent_shape[:3], patch))


def latent_shape_for_tokens(tokens: int, patch: Sequence[int]) -> tuple[int, int, int]:
    """A latent ``(t, h, w)`` that ``patch`` cuts into exactly ``tokens`` patches: a grid ``(nt, s, s)`` of
    square frames, ``nt`` the divisor nearest the cube root (ties: fewer frames), e.g. with patch (1, 2, 2)
    256 -> latents 4x16x16, 4096 -> 16x32x32, 16384 -> 16x64x64.

    Full attention's cost depends on the token count alone, so benchmarks and ``vidiff plan`` size clips by it.
    """
    if not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"tokens: must be a positive int, got {tokens!r}")
    best = None
    for frames in range(1, tokens + 1):
        side = math.isqrt(tokens // frames)
        if tokens % frames or side * side != tokens // frames:
            continue
        distance = abs(math.log(frames) - math.log(tokens) / 3)
        if best is None or distance < best[0] - 1e-9:
            best = (distance, frames, side)
    return tuple(g * p for g, p in zip((best[1], best[2], best[2]), patch))


def unpatchify(tokens, patch: Sequence[int], latent_shape: Sequence[int]):
    """Tokens ``(B, N, pt*ph*pw*c)`` -> latents ``(B, t, h, w, c)`` for ``latent_shape = (t, h, w)``."""
    _check_divisible(latent_shape, patch)
    pt, ph, pw = patch
    t, h, w = (s // p for s, p in zip(latent_shape, patch))
    if np.ndim(tokens) != 3 or tokens.shape[1] != t * h * w or tokens.shape[2] % (pt * ph * pw):
        raise ValueError(f"unpatchify: tokens must be (B, {t * h * w}, pt*ph*pw*c) for latents {tuple(latent_shape)} "
                         f"and patch {tuple(patch)}, got shape {np.shape(tokens)}")
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def patch_positions(grid: Sequence[int], offset: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """Integer (time, height, width) positions ``(N, 3)`` of a ``grid = (nt, nh, nw)`` of patches (numpy float32)."""
    axes = [np.arange(n, dtype=np.float32) + o for n, o in zip(grid, offset)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


class PackedClips(NamedTuple):
    """One packed row: ``tokens (N, D)``, ``positions (N, 3)``, ``segment_ids (N,)`` (clip index, -1 = padding),
    and the clips' ``(t, h, w)`` latent shapes for :func:`unpack_clips`."""

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    shapes: tuple[tuple[int, int, int], ...]


def pack_clips(clips: Sequence[np.ndarray], patch: Sequence[int], length: int | None = None) -> PackedClips:
    """Pack clips ``(t_i, h_i, w_i, C)`` into one row; for a DiT, model inputs from ``dit.concat_conditioning``.

    Host-side numpy, so it can run in data-loader workers. Each clip keeps its own RoPE grid
    starting at 0; ``length`` pads the row (segment id -1). Stack rows on a leading batch axis
    to feed ``VideoDiT.forward_tokens``.
    """
    clips = [np.asarray(c, np.float32) for c in clips]
    if not clips:
        raise ValueError("pack_clips: no clips to pack")
    if any(c.ndim != 4 or c.shape[-1] != clips[0].shape[-1] for c in clips):
        raise ValueError(f"pack_clips: clips must be (t, h, w, C) with one C, got shapes {[c.shape for c in clips]}")
    tokens = [patchify(c[None], patch)[0] for c in clips]
    grids = [[s // p for s, p in zip(c.shape[:3], patch)] for c in clips]
    n = sum(len(t) for t in tokens)
    pad = (n if length is None else length) - n  # length=0 is too short, not "no padding"
    if pad < 0:
        raise ValueError(f"length: {length} is shorter than the {n} tokens of the packed clips")
    return PackedClips(
        tokens=np.concatenate(tokens + [np.zeros((pad, tokens[0].shape[1]), np.float32)]),
        positions=np.concatenate([patch_positions(g) for g in grids] + [np.zeros((pad, 3), np.float32)]),
        segment_ids=np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(tokens)]
                                   + [np.full(pad, -1, np.int32)]),
        shapes=tuple(tuple(int(s) for s in c.shape[:3]) for c in clips),
    )


def pack_texts(texts: Sequence[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-clip valid text tokens ``(L_i, D)`` into ``(text (L, D), text_segment_ids (L,))``, pad id -1."""
    texts = [np.asarray(t, np.float32) for t in texts]
    if not texts:
        raise ValueError("pack_texts: no texts to pack")
    if any(t.ndim != 2 or t.shape[-1] != texts[0].shape[-1] for t in texts):
        raise ValueError(f"pack_texts: texts must be (L_i, D) with one D, got shapes {[t.shape for t in texts]}")
    n = sum(len(t) for t in texts)
    pad = (n if length is None else length) - n  # length=0 is too short, not "no padding"
    if pad < 0:
        raise ValueError(f"length: {length} is shorter than the {n} packed text tokens")
    ids = [np.full(len(t), i, np.int32) for i, t in enumerate(texts)] + [np.full(pad, -1, np.int32)]
    return np.concatenate(texts + [np.zeros((pad, texts[0].shape[-1]), np.float32)]), np.concatenate(ids)


def unpack_clips(tokens, shapes: Sequence[Sequence[int]], patch: Sequence[int]) -> list:
    """Inverse of :func:`pack_clips` for one row of outputs ``(N, D)``: a list of ``(t, h, w, c)`` latents."""
    counts = [token_count(shape, patch) for shape in shapes]
    if np.ndim(tokens) != 2 or len(tokens) < sum(counts):
        raise ValueError(f"unpack_clips: tokens must be one row (N, D) with N >= {sum(counts)} for clips {list(shapes)}, "
                         f"got shape {np.shape(tokens)}")
    out, start = [], 0
    for shape, n in zip(shapes, counts):
        out.append(unpatchify(tokens[None, start:start + n], patch, shape)[0])
        start += n
    return out
