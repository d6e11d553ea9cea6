"""What ``vidiff.pipeline.TextToVideo`` makes of one call before it samples.

A prompting mode's :class:`Plan` (which latent frames are known, tied or
noised from an input), its input's frames read at their own size, the call's
arguments checked (prompts and negative prompts encoded, seeds, whole numbers;
a float or a string is an error, never truncated) and the progress bar over the
sampler's steps. Sampling itself is ``vidiff.diffusion.sampling``'s.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from vidiff import io
from vidiff.checks import is_int


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


def input_frames(source, what: str, first: int | None = None, last: int | None = None) -> np.ndarray:
    """``uint8 (T, H, W, 3)`` at the input's own size, from a path (``io.reads_as_video`` picks the reader) or an
    array. ``first`` / ``last``: only that many frames from the start / the end are used, and only about those
    are decoded (the frames are full size until the caller resizes them)."""
    if not isinstance(source, (str, Path)):
        frames = io.check_frames(source, f"TextToVideo ({what})")
    elif not io.reads_as_video(source, video_expected=what == "video"):
        frames = io.read_image(source)[None]
    elif last is None:
        frames = io.read_video(source, max_frames=first)[0]
    else:
        frames = _video_tail(source, last)
    return frames[:first] if first else frames[max(len(frames) - last, 0):] if last else frames


def _video_tail(path, count: int) -> np.ndarray:
    """The last ``count`` frames of a video (all of a shorter one), from a window before its end that grows until
    it holds them: the duration and rate are the container's word, and a truncated file's data stops early."""
    info = io.probe(path)
    span = (count + 1) / info.fps
    while True:
        start = max(info.duration - span, 0.0)
        try:
            frames = io.read_video(path, start=start)[0]
        except io.VideoReadError:
            if start == 0.0:
                raise
            frames = ()  # the window lies past the frames that decode
        if len(frames) >= count or start == 0.0:
            return frames[max(len(frames) - count, 0):]
        span *= 4


# Clips per compiled sampling call when ``batch_size`` is None (and ``vidiff generate --batch-size``'s default):
# a long prompt list sampled at once asked the device for all of its clips' memory and ran out.
DEFAULT_BATCH_SIZE = 8


def sampled_batch(batch_size: int, clips: int, ways: int = 1) -> int:
    """Clips per sampling call: ``batch_size`` or fewer when there are fewer, padded up to a multiple of the
    ``ways`` data-parallel devices (else every device would run the whole batch)."""
    return -(-min(batch_size, clips) // ways) * ways


def whole_number(value, name: str) -> int:
    """``value`` as an int if it is one (a Python or numpy integer), else a one-line ``ValueError``.

    Checked before any conversion: ``int()`` would silently truncate 5.9 to 5 and accept the string "5".
    """
    if not is_int(value):
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}; pass a whole number (an int)")
    return int(value)


def positive_whole_number(value, name: str, alternative: str = "") -> int:
    """``value`` as an int if it is a whole number >= 1, else a one-line ``ValueError`` (``alternative``: what
    else the caller accepts, e.g. ", or None for one batch")."""
    if not is_int(value) or value < 1:
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


def prompt_name(prompts: Sequence, i: int, what: str = "prompt") -> str:
    """How a message names prompt ``i``: "the prompt" when it is the only one, else "prompt <i + 1>"."""
    return f"the {what}" if len(prompts) == 1 else f"{what} {i + 1}"


def check_prompts(prompts: Sequence) -> None:
    """A one-line ``ValueError`` for no prompts, a prompt that is not a string, an empty (blank) one, or one that
    is not UTF-8 text. ``vidiff generate`` runs it before the model loads, so its errors are worded as the
    pipeline's."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one, e.g. 'a red circle moving left'")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{prompt_name(prompts, i)} is a {type(prompt).__name__} ({prompt!r}); "
                             "prompts are strings")
        if not prompt.strip():
            raise ValueError(f"{prompt_name(prompts, i)} is empty; describe the video, e.g. 'a red circle moving left'")
        check_utf8(prompt, prompt_name(prompts, i))


def check_utf8(text: str, name: str) -> None:
    """A one-line ``ValueError`` when ``text`` holds a surrogate, which the tokenizer cannot encode (it failed only
    after the model loaded): Python reads an argument's invalid byte ``0xff`` as ``\\udcff``; an API caller can
    pass a lone one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte \\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"surrogate \\u{code:04x}"
        raise ValueError(f"{name} is not valid UTF-8 ({what} at position {e.start}); pass UTF-8 text") from None


def negative_prompts(negative, prompts: Sequence[str], guidance: float) -> list[str] | None:
    """``negative_prompt`` as a list (one string for every prompt, or one per prompt), checked; None: none given
    (the unconditional branch reads the empty prompt). A blank one is the empty prompt."""
    if negative is None:
        return None
    if guidance == 1.0:  # the unconditional branch, which the negative prompt replaces, is not run
        raise ValueError("negative_prompt has no effect with guidance=1 (no classifier-free guidance); pass a "
                         "guidance other than 1 (vidiff generate: --guidance), or no negative prompt")
    if isinstance(negative, (bytes, bytearray)):
        raise ValueError("negative_prompt is bytes; decode it to a string first (negative_prompt.decode())")
    if not isinstance(negative, (str, Sequence, np.ndarray)):
        raise ValueError(f"negative_prompt must be a string or one string per prompt, got {type(negative).__name__}")
    negatives = [negative] if isinstance(negative, str) else list(negative)
    if not isinstance(negative, str) and len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} strings for {len(prompts)} prompt(s); give one "
                         "string for every prompt, or one per prompt")
    for i, text in enumerate(negatives):
        if not isinstance(text, str):
            raise ValueError(f"{prompt_name(negatives, i, 'negative prompt')} is a {type(text).__name__} "
                             f"({text!r}); negative prompts are strings")
        check_utf8(text, prompt_name(negatives, i, "negative prompt"))
    return negatives


def warn_truncated(text, prompts: Sequence[str], what: str = "prompt") -> None:
    """A warning for each of ``prompts`` longer than encoder ``text`` reads, saying what it reads: from the
    tokenizer alone, so every warning comes before sampling, though prompts are encoded a batch at a time."""
    tokens = text.tokenize(list(prompts))
    for i in np.nonzero(tokens.truncated)[0]:
        kept = text.tokenizer.hf.decode(tokens.ids[i], skip_special_tokens=True)
        warnings.warn(f"{prompt_name(prompts, i, what)} is longer than the text encoder's {text.max_length} "
                      f"tokens; the model reads only {kept!r}", stacklevel=3)


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
