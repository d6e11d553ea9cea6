"""Sampling latents from a VideoDiT: the velocity function, guidance and the sampler, jitted together.

``sample_latents`` is what both the training loop (periodic sample clips) and
``vidiff.pipeline.TextToVideo`` call. Text conditioning arrives as a context
dict ``{"tokens" (B, L, D), "lengths" (B,), "pooled" (B, D')}``, plus optional
``"cond_latents"`` / ``"cond_mask"`` for known frames (image-to-video,
extension, connection, loops); the unconditional context is the empty prompt's.

Progress: ``sample_latents(..., progress=True)`` reports every finished step
to the callbacks registered with :func:`on_sampler_step` (a host callback
inside the compiled loop; the flag, not the callback, is part of the compiled
program, so a new progress bar does not recompile).

Also here: a prompting mode's :class:`Plan` (which latent frames are known,
tied or noised from an input) and per-sample seeded noise. The causal VAE's
pixel <-> latent frame arithmetic is the VAE's (``vidiff.models.vae``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vidiff.diffusion.samplers import classifier_free_guidance, sample
from vidiff.models.gaussian import standard_normal
# Not used here: vidiff/pipeline.py imports the VAE's frame arithmetic from this module.
from vidiff.models.vae import latent_count, pixel_count, pixel_frames_of  # noqa: F401

_step_listeners: list[Callable[[int], None]] = []


def text_context(embeddings) -> dict:
    """``TextEmbeddings`` (host, from ``TextEncoder.encode``) -> the model's context dict."""
    return {
        "tokens": jnp.asarray(embeddings.tokens),
        "lengths": jnp.asarray(embeddings.mask.sum(-1), jnp.int32),
        "pooled": jnp.asarray(embeddings.pooled),
    }


def encode_prompts(text, prompts: Sequence[str]):
    """``TextEmbeddings`` of ``prompts`` from encoder ``text``: empty prompts are errors, over-long ones are
    truncated with a warning saying what the model reads."""
    which = lambda i: "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
    if not prompts:
        raise ValueError("no prompts given; pass at least one, e.g. 'a red circle moving left'")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{which(i)} is a {type(p).__name__} ({p!r}); prompts are strings")
        if not p.strip():
            raise ValueError(f"{which(i)} is empty; describe the video, e.g. 'a red circle moving left'")
    emb = text.encode(list(prompts))
    for i in np.nonzero(emb.truncated)[0]:
        kept = text.tokenizer.hf.decode(text.tokenize([prompts[i]]).ids[0], skip_special_tokens=True)
        warnings.warn(f"{which(i)} is longer than the text encoder's {text.max_length} tokens; the model "
                      f"reads only {kept!r}", stacklevel=3)
    return emb


def dit_velocity_fn(dit, params, *, cond_from_x: bool = False):
    """``velocity(x, t, context)`` for a VideoDiT with ``params`` (conditioning frames from the context).

    ``cond_from_x``: read the known frames' clean latents from ``x`` itself
    (the sampler holds them there), which lets tied frames change every step.
    """

    def velocity(x, t, context):
        mask = context.get("cond_mask")
        cond = x if cond_from_x and mask is not None else context.get("cond_latents")
        return dit.apply(
            {"params": params}, x, t, context["tokens"], context["lengths"], context["pooled"],
            cond_latents=cond, cond_mask=mask,
        )

    return velocity


@contextlib.contextmanager
def on_sampler_step(callback: Callable[[int], None]):
    """Within the block, ``callback(step)`` runs after each step of ``sample_latents(progress=True)``.

    Block on the result inside the block: callbacks arrive while the program runs.
    """
    _step_listeners.append(callback)
    try:
        yield
    finally:
        _step_listeners.remove(callback)


def _report_step(step) -> None:
    for callback in list(_step_listeners):
        callback(int(step))


@functools.partial(jax.jit, static_argnames=("dit", "steps", "sampler", "guidance", "interval", "shift", "t_start",
                                             "tie", "progress"))
def sample_latents(dit, params, context, uncond_context, x_start, *, steps: int, sampler: str = "euler",
                   guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), shift: float = 1.0,
                   t_start: float = 1.0, tie: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                   progress: bool = False):
    """Integrate from ``x_start`` (noise at ``t_start``) to clean normalised latents, with CFG.

    Known frames in ``context["cond_mask"]`` stay at ``context["cond_latents"]``;
    ``tie`` ties generated frames together (see ``samplers.sample``).
    """
    # Both guidance branches see the same known frames; only the text differs.
    known = {k: context[k] for k in ("cond_latents", "cond_mask") if k in context}
    uncond_context = {**uncond_context, **known}
    velocity_fn = dit_velocity_fn(dit, params, cond_from_x=True)
    velocity = classifier_free_guidance(velocity_fn, context, uncond_context, guidance, interval)
    return sample(velocity, x_start, steps=steps, sampler=sampler, shift=shift, t_start=t_start,
                  known_latents=context.get("cond_latents"), known_mask=context.get("cond_mask"), tie=tie,
                  progress=_report_step if progress else None)


@dataclasses.dataclass
class Plan:
    """What a mode fixes before sampling (normalised latents, batch 1, broadcast over prompts and seeds)."""

    latent_frames: int
    known: np.ndarray | None = None  # (1, L, h, w, c) clean latents where ``mask`` is 1
    mask: np.ndarray | None = None  # (L,) 1 = known (or tied) latent frame
    tie: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    clean: np.ndarray | None = None  # (1, L, h, w, c) latents to noise to ``t_start`` (SDEdit)
    t_start: float = 1.0
    keep_frames: int | None = None  # decoded frames to return (a loop drops its wrap-around)


def known_plan(latent_frames: int, frames: dict) -> Plan:
    """A plan whose latent frames ``frames`` (index -> (1, h, w, c) latents) are known."""
    if not frames or not all(0 <= j < latent_frames for j in frames):
        raise ValueError(f"known_plan: known latent frames {sorted(frames)} must be a non-empty subset of "
                         f"0..{latent_frames - 1}")
    some = next(iter(frames.values()))
    known = np.zeros((1, latent_frames, *some.shape[1:]), np.float32)
    mask = np.zeros(latent_frames, np.float32)
    for j, z in frames.items():
        known[:, j], mask[j] = np.asarray(z), 1.0
    return Plan(latent_frames, known=known, mask=mask)


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool (an int to Python, but never a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def whole_number(value, name: str) -> int:
    """``value`` as an int if it is one (a Python or numpy integer), else a one-line ``ValueError``.

    Checked before any conversion: ``int()`` would silently truncate 5.9 to 5 and accept the string "5".
    """
    if not _is_int(value):
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}; pass a whole number (an int)")
    return int(value)


def positive_whole_number(value, name: str, alternative: str = "") -> int:
    """``value`` as an int if it is a whole number >= 1, else a one-line ``ValueError`` (``alternative``: what
    else the caller accepts, e.g. ", or None for one batch")."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int{alternative}")
    return int(value)


def sample_seeds(seed, num_per_prompt: int = 1) -> list[int]:
    """The seeds every prompt is sampled with: ``seed, seed + 1, ...`` or an explicit list, each a uint32."""
    num_per_prompt = positive_whole_number(num_per_prompt, "num_per_prompt")
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed[()]  # a 0-d array: its numpy scalar
    if np.ndim(seed) == 0:
        seeds = [whole_number(seed, "seed") + j for j in range(num_per_prompt)]
    elif num_per_prompt != 1:
        raise ValueError(f"num_per_prompt={num_per_prompt} with a list of seeds: give one or the other (a list "
                         "samples every prompt once per seed)")
    else:
        seeds = [whole_number(s, "seed") for s in seed]
    if not seeds:
        raise ValueError("seed=[] gives no samples; pass an int or a non-empty list of seeds")
    if not all(0 <= s < 2**32 for s in seeds):  # the noise is keyed by a uint32
        raise ValueError(f"seeds {seeds} must be in [0, 2**32)")
    return seeds


@functools.partial(jax.jit, static_argnums=1)
def seeded_noise(seeds, shape):
    """Per-sample noise from each sample's own seed, so a clip does not depend on its batch."""
    return jax.vmap(lambda s: standard_normal(jax.random.key(s), shape))(seeds)


class ProgressBar:
    """A tqdm bar (stderr) counting sampler steps, or a no-op; usable as the step callback."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="sampling", unit="step", leave=False)

    def __call__(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
