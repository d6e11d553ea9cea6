"""The clip sizes a training stage may use: ``check_clip_sizes`` takes ``data.num_frames`` x ``data.size`` and
every ``data.buckets`` entry against the VAE's time and spatial factors (and the DiT's patch on top of them when
training the DiT), and a VAE stage's frame sizes against its loss networks, with a one-line error that names the
field and a size that works; ``check_frame_count`` is its frame rule alone (the VAE's evaluation clips take it).
"""
from __future__ import annotations

from typing import NamedTuple


class _ClipFactors(NamedTuple):
    """What a trained clip's size must fit."""

    time_factor: int  # the VAE's: frames = 1 + k * time_factor
    time_patch: int  # the DiT's patch in time (1 when training the VAE): divides the latent frames
    divisors: tuple[int, int]  # of (height, width)
    why: str  # the words that explain the divisors


def _clip_factors(vae_cfg, dit_cfg) -> _ClipFactors:
    """The VAE's factors, and the DiT's patch on top of them when training the DiT (``dit_cfg`` not None)."""
    spatial = vae_cfg.spatial_factor
    if dit_cfg is None:
        return _ClipFactors(vae_cfg.time_factor, 1, (spatial, spatial), "the VAE's spatial factor")
    return _ClipFactors(vae_cfg.time_factor, dit_cfg.patch[0], (spatial * dit_cfg.patch[1], spatial * dit_cfg.patch[2]),
                        "VAE spatial factor x DiT patch")


def check_clip_sizes(config, model: str, size: tuple[int, int], vae_cfg, dit_cfg) -> None:
    """``data.num_frames`` x ``data.size`` and every ``data.buckets`` entry against the factors of ``vae_cfg``
    and, when training the DiT, ``dit_cfg``'s patch (None for the VAE, whose frame sizes are checked against its
    loss networks too)."""
    from vidiff.data.transforms import parse_buckets
    from vidiff.models.vae_losses import VAELossConfig, check_frame_size

    factors = _clip_factors(vae_cfg, dit_cfg)
    clips = [(int(config.data.num_frames), *size, None)]
    if config.data.get("buckets"):  # the clip sizes trained, when bucketed
        clips += [(f, h, w, f"{f}x{h}x{w}") for f, h, w in parse_buckets(config.data.buckets, clips[0][:3])]
    vae_loss = VAELossConfig(**dict(config.vae_loss)) if model == "vae" else None
    for k, (frames, h, w, bucket) in enumerate(clips):
        _check_clip_size(frames, h, w, bucket, factors)
        if vae_loss is not None:  # a loss network that leaves no pixel of the frame gives a NaN loss
            check_frame_size(h, w, vae_loss)
        if k == 0:  # data.num_frames is named first, then images, before a bucket they would ask for
            _check_images(config.data.get("image_fraction") or 0, factors.time_patch, clips)


def _check_images(image_fraction: float, time_patch: int, clips: list) -> None:
    """Images are one latent frame each; under a DiT time patch above 1 the data's hint (add a 1-frame bucket)
    would lead to that bucket's refusal, so the fix that works is named first."""
    if image_fraction and time_patch > 1:
        buckets = " and drop the 1-frame data.buckets entries" if any(c[3] and c[0] == 1 for c in clips) else ""
        raise ValueError(f"data.image_fraction={image_fraction} trains images, one latent frame each, which dit "
                         f"patch time {time_patch} cannot take; set data.image_fraction=0.0{buckets}, or "
                         f"dit.overrides.patch with time 1")


def check_frame_count(field: str, frames: int, time_factor: int) -> None:
    """``field``'s ``frames`` as the VAE takes them, ``1 + k * time_factor``; else one line with a count that does."""
    if (frames - 1) % time_factor:
        good = 1 + round((frames - 1) / time_factor) * time_factor
        raise ValueError(f"{field}={frames} must be 1 + k*{time_factor} (the VAE's time factor), e.g. {good}")


def _check_clip_size(frames: int, height: int, width: int, bucket: str | None, factors: _ClipFactors) -> None:
    """One trained clip size against ``factors``: a one-line error naming the field (``data.num_frames`` /
    ``data.size``, or the ``data.buckets`` entry ``bucket``)."""
    from vidiff.models.vae import latent_count

    time_factor, time_patch = factors.time_factor, factors.time_patch
    field = "data.num_frames" if bucket is None else f"data.buckets entry {bucket!r}: frames"
    check_frame_count(field, frames, time_factor)
    latent_frames = latent_count(frames, time_factor)
    if latent_frames % time_patch:
        raise ValueError(f"{field}={frames} gives {latent_frames} latent frames, not divisible by dit patch time "
                         f"{time_patch}; change {'data.num_frames' if bucket is None else 'data.buckets'} or "
                         f"dit.overrides.patch")
    field = "data.size " if bucket is None else f"data.buckets entry {bucket!r}: "
    for name, value, divisor in (("height", height, factors.divisors[0]), ("width", width, factors.divisors[1])):
        if value % divisor:
            raise ValueError(f"{field}{name}={value} must be divisible by {divisor} ({factors.why}); "
                             f"use e.g. {max(1, round(value / divisor)) * divisor}")
