"""Causal 3D video VAE: config presets, Encoder, Decoder, VideoVAE.

A clip ``(B, T, H, W, 3)`` in [-1, 1] becomes a diagonal Gaussian over latents
``(B, t, h, w, c)`` with ``t = 1 + (T - 1) / time_factor`` and ``h, w = H, W /
spatial_factor`` (default 4 x 8 x 8). Time is causal: frame 0 is encoded alone,
then every group of ``time_factor`` frames gives one latent frame, so an image is
a 1-frame video and no latent frame depends on later frames.

Public API::

    vae = VideoVAE(vae_preset("tiny"))                 # or VideoVAE(VAEConfig(...))
    variables = vae.init(key, video)                   # {"params", "latent_stats"}; any valid
                                                       # shape, (1, 1, sf, sf, 3) traces fastest
    post = vae.apply(variables, video, method=vae.encode)     # DiagonalGaussian
    z = post.sample(key)                               # or post.mode()
    video = vae.apply(variables, z, method=vae.decode)
    z_dit = vae.apply(variables, z, method=vae.normalize)     # unit-variance latents
    z = vae.apply(variables, z_dit, method=vae.denormalize)

    encode_chunked(vae, variables, video, chunk_frames)   # long clips, flat memory
    decode_chunked(vae, variables, latents, chunk_latent_frames)
    encode_tiled(vae, variables, video, tile_latent=32, overlap_latent=8)  # big frames
    decode_tiled(vae, variables, latents, tile_latent=32, overlap_latent=8)
    shift, scale = compute_latent_stats(vae, variables, video_batches)
    variables = set_latent_stats(variables, shift, scale)

(the last six live in ``vae_codec.py`` and are re-exported here; the posterior,
``DiagonalGaussian``, lives in ``gaussian.py`` and is importable from here too.)

Chunking: every causal conv (``vae_layers.py``) keeps the last ``kernel_t - stride_t``
frames it saw in a ``cache`` variable collection. Applying with ``mutable=["cache"]`` turns
that on; feeding the returned cache to the next chunk makes chunked results
equal the one-shot ones. Norms (per-position channel RMSNorm) and the mid-block
attention (per frame) never mix frames, which is what makes this exact.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import linen as nn

from vidiff.models.gaussian import DiagonalGaussian
from vidiff.models.presets import from_preset
from vidiff.models.vae_layers import (
    IO_AXIS, CausalConv3d, ChannelRMSNorm, MidBlock, ResBlock, Upsample, caching, constrain_video,
)
# Drivers for long clips, big frames and latent statistics (vae_codec.py), re-exported here.
from vidiff.models.vae_codec import (  # noqa: F401
    compiled, compute_latent_stats, decode_chunked, decode_tiled, encode_chunked, encode_tiled, set_latent_stats,
)


# --------------------------------------------------------------------------- config

# Frame arithmetic of the causal time axis, for callers that hold only a time factor ``tf``
# (``VAEConfig.time_factor``): latent 0 encodes pixel frame 0 alone and latent ``j > 0``
# pixel frames ``1 + tf (j - 1) .. tf j`` with every earlier frame as context; so ``L``
# latents decode to ``1 + tf (L - 1)`` frames, and the first ``k`` latents of a clip are
# exactly the latents of its first ``1 + tf (k - 1)`` frames.


def latent_count(num_frames: int, time_factor: int) -> int:
    """Latent frames of a ``1 + tf k`` frame clip: ``1 + k``."""
    return 1 + (num_frames - 1) // time_factor


def pixel_count(latent_frames: int, time_factor: int) -> int:
    """Pixel frames ``L`` latents decode to: ``1 + tf (L - 1)``."""
    return 1 + time_factor * (latent_frames - 1)


def pixel_frames_of(latent: int, time_factor: int) -> range:
    """The pixel frames latent ``j`` encodes: ``[0]`` for ``j = 0``, else ``1 + tf (j - 1) .. tf j``."""
    return range(0, 1) if latent == 0 else range(1 + time_factor * (latent - 1), time_factor * latent + 1)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of the causal video VAE.

    ``temporal_down`` / ``spatial_down`` have one flag per transition between
    levels (``len(channel_mults) - 1``); each True halves that axis, so the
    time factor is ``2 ** sum(temporal_down)`` (1, 2 or 4) and the spatial
    factor ``patch_size * 2 ** sum(spatial_down)`` (4, 8 or 16). ``patch_size``
    folds p x p pixel blocks into channels before the first conv (and unfolds
    them after the last, as LTX-Video's VAE does): the full-resolution layers,
    the costliest ones, then run at 1/p^2 of the positions. ``dtype`` is the
    compute dtype ("bfloat16" on accelerators); parameters are always float32.
    """

    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 16
    temporal_down: tuple[bool, ...] = (False, True, True)
    spatial_down: tuple[bool, ...] = (True, True, True)
    mid_attention: bool = True
    patch_size: int = 1
    # Time taps of each level's convs: 3 mixes neighbouring frames; 1 makes the level per-frame 2D
    # (a third of the cost at full resolution, where it matters most). None = 3 everywhere.
    time_kernels: tuple[int, ...] | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("channel_mults", "temporal_down", "spatial_down", "time_kernels"):
            if isinstance(getattr(self, name), list):  # as JSON gives them: the module must hash
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.mid_attention, bool):  # a config string "no" would otherwise read as True
            raise ValueError(f"VAEConfig.mid_attention={self.mid_attention!r} must be True or False")
        if not self.channel_mults:
            raise ValueError("VAEConfig.channel_mults is empty; give one multiplier per level, e.g. (1, 2, 4)")
        if self.patch_size not in (1, 2, 4):
            raise ValueError(f"VAEConfig.patch_size={self.patch_size} must be 1, 2 or 4")
        transitions = len(self.channel_mults) - 1
        for name in ("temporal_down", "spatial_down"):
            if not all(isinstance(flag, bool) for flag in getattr(self, name)):  # "no" or 2 would count as True
                raise ValueError(f"VAEConfig.{name}={getattr(self, name)!r} must hold True or False per transition")
            if len(getattr(self, name)) != transitions:
                raise ValueError(f"VAEConfig.{name} needs {transitions} flags (one per level transition), "
                                 f"got {getattr(self, name)}")
        if self.time_factor not in (1, 2, 4):
            raise ValueError(f"VAEConfig.temporal_down gives time factor {self.time_factor}; it must be 1, 2 or 4")
        if self.spatial_factor not in (4, 8, 16):
            raise ValueError(f"VAEConfig.spatial_down gives spatial factor {self.spatial_factor}; "
                             "it must be 4, 8 or 16")
        if self.time_kernels is not None and (len(self.time_kernels) != transitions + 1
                                              or any(k not in (1, 3) for k in self.time_kernels)):
            raise ValueError(f"VAEConfig.time_kernels={self.time_kernels} needs one 1 or 3 per level "
                             f"({transitions + 1} levels)")
        if min(self.base_channels, self.num_res_blocks, self.latent_channels, *self.channel_mults) < 1:
            raise ValueError("VAEConfig: base_channels, channel_mults, num_res_blocks and latent_channels must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"VAEConfig.dtype={self.dtype!r} must be one of float32, bfloat16, float16")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level: ``base_channels * channel_mults``."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    def time_kernel(self, level: int) -> int:
        """Time taps of ``level``'s convs: 3 (causal, two past frames) or 1 (per frame)."""
        return 3 if self.time_kernels is None else int(self.time_kernels[level])

    def resample_time_kernel(self, level: int) -> int:
        """Time taps of the down/upsampling conv between ``level`` and ``level + 1``: a change of
        frame rate needs neighbouring frames, whatever the level's own kernel."""
        return 3 if self.temporal_down[level] else self.time_kernel(level)

    @property
    def time_factor(self) -> int:
        """Temporal compression: ``1 + tf k`` frames -> ``1 + k`` latent frames."""
        return 2 ** sum(self.temporal_down)

    @property
    def spatial_factor(self) -> int:
        """Spatial compression per side (pixel folding x downsampling levels)."""
        return self.patch_size * 2 ** sum(map(bool, self.spatial_down))

    def check_video_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a one-line ValueError unless ``shape`` is ``(B, 1 + k*tf, H, W, 3)`` with H, W divisible."""
        if len(shape) != 5 or shape[-1] != 3:
            raise ValueError(f"video shape {tuple(shape)} must be (batch, frames, height, width, 3)")
        frames, tf, sf = shape[1], self.time_factor, self.spatial_factor
        if frames < 1 or (frames - 1) % tf:  # (0 - 1) % 1 == 0: a time factor of 1 would take an empty clip
            good = 1 + max(round((frames - 1) / tf), 0) * tf
            raise ValueError(f"num_frames={frames} must be 1 + k*{tf} (e.g. {good}); trim or pad the clip")
        for name, size in (("height", shape[2]), ("width", shape[3])):
            if size % sf or size == 0:
                good = max(round(size / sf), 1) * sf
                raise ValueError(f"{name}={size} must be divisible by the spatial factor {sf} (e.g. {good}); "
                                 "resize or crop")

    def check_video_dtype(self, dtype) -> None:
        """Raise unless frames are floating point: uint8 frames in [0, 255] would encode to garbage, silently."""
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"video dtype {jnp.dtype(dtype)}: the VAE takes float frames in [-1, 1]; "
                             "convert uint8 frames with vidiff.io.to_float")

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a one-line ValueError unless ``shape`` is ``(B, t, h, w, latent_channels)``."""
        if len(shape) != 5 or shape[-1] != self.latent_channels:
            raise ValueError(f"latents shape {tuple(shape)} must be (batch, t, h, w, {self.latent_channels})")

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The latent shape a video of ``video_shape`` encodes to (validating it first)."""
        self.check_video_shape(video_shape)
        b, t, h, w, _ = video_shape
        sf = self.spatial_factor
        return (b, latent_count(t, self.time_factor), h // sf, w // sf, self.latent_channels)


# tiny: CPU tests and the tiny end-to-end model. Three levels and 4x4x4
# compression, so a (17, 32, 32) clip gives (5, 8, 8) latents (enough tokens for
# a tiny DiT) and compiles in seconds; small and base use the default 4x8x8.
PRESETS = {
    "tiny": VAEConfig(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                      temporal_down=(True, True), spatial_down=(True, True)),
    "small": VAEConfig(base_channels=64, channel_mults=(1, 2, 4, 4), num_res_blocks=1, latent_channels=16),
    "base": VAEConfig(base_channels=128, channel_mults=(1, 2, 4, 4), num_res_blocks=2, latent_channels=16),
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """A named ``VAEConfig`` ("tiny", "small", "base") with any fields replaced."""
    return from_preset(VAEConfig, PRESETS, name, overrides, "VAE")


# --------------------------------------------------------------------------- the networks


class Encoder(nn.Module):
    """Video -> (mean, logvar) of the latents, both float32 ``(B, t, h, w, c)``."""

    config: VAEConfig

    @nn.compact
    def __call__(self, video):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        widths = cfg.widths
        p = cfg.patch_size
        x = rearrange(video.astype(dtype), "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)
        x = CausalConv3d(widths[0], (cfg.time_kernel(0), 3, 3), dtype=dtype, in_axis=IO_AXIS,
                         name="conv_in")(constrain_video(x))
        for level, width in enumerate(widths):
            for i in range(cfg.num_res_blocks):
                x = ResBlock(width, dtype, cfg.time_kernel(level), name=f"down{level}_res{i}")(x)
            if level < len(widths) - 1 and (cfg.temporal_down[level] or cfg.spatial_down[level]):
                st, ss = 2 if cfg.temporal_down[level] else 1, 2 if cfg.spatial_down[level] else 1
                kt = cfg.resample_time_kernel(level)
                x = constrain_video(CausalConv3d(width, (kt, 3, 3), strides=(st, ss, ss), dtype=dtype,
                                            name=f"down{level}_sample")(x))
        x = MidBlock(widths[-1], cfg.mid_attention, dtype, cfg.time_kernel(-1), name="mid")(x)
        x = nn.silu(ChannelRMSNorm(dtype, name="norm_out")(x))
        moments = CausalConv3d(2 * cfg.latent_channels, (cfg.time_kernel(-1), 3, 3), dtype=dtype, out_axis=IO_AXIS,
                               name="conv_out")(x)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return constrain_video(mean), constrain_video(logvar)


class Decoder(nn.Module):
    """Latents ``(B, t, h, w, c)`` -> video ``(B, 1 + (t-1)*tf, h*sf, w*sf, 3)`` float32."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        widths = cfg.widths
        x = CausalConv3d(widths[-1], (cfg.time_kernel(-1), 3, 3), dtype=dtype, in_axis=IO_AXIS,
                         name="conv_in")(constrain_video(z.astype(dtype)))
        x = MidBlock(widths[-1], cfg.mid_attention, dtype, cfg.time_kernel(-1), name="mid")(x)
        for level in reversed(range(len(widths))):
            for i in range(cfg.num_res_blocks + 1):
                x = ResBlock(widths[level], dtype, cfg.time_kernel(level), name=f"up{level}_res{i}")(x)
            if level > 0 and (cfg.temporal_down[level - 1] or cfg.spatial_down[level - 1]):
                kt = cfg.resample_time_kernel(level - 1)
                x = Upsample(widths[level - 1], cfg.temporal_down[level - 1], cfg.spatial_down[level - 1],
                             dtype, kt, name=f"up{level}_sample")(x)
        x = nn.silu(ChannelRMSNorm(dtype, name="norm_out")(x))
        p = cfg.patch_size
        x = CausalConv3d(3 * p * p, (cfg.time_kernel(0), 3, 3), dtype=dtype, out_axis=IO_AXIS,
                         name="conv_out")(x).astype(jnp.float32)
        return constrain_video(rearrange(x, "b t h w (p q c) -> b t (h p) (w q) c", p=p, q=p))


class VideoVAE(nn.Module):
    """Causal video VAE with ``encode``, ``decode``, ``normalize`` / ``denormalize`` and the DiT-space
    shortcuts ``encode_normalized`` / ``decode_normalized``.

    ``__call__(video, key=None)`` returns ``(reconstruction, posterior)``,
    decoding a posterior sample when ``key`` is given and its mean otherwise.
    Per-channel latent ``shift`` / ``scale`` live in the non-trainable
    ``latent_stats`` collection (0 and 1 until ``set_latent_stats``).
    """

    config: VAEConfig

    def setup(self):
        """Encoder, decoder, and the ``latent_stats`` variables when they exist or may be created."""
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        if self.has_variable("latent_stats", "shift") or self.is_mutable_collection("latent_stats"):
            c = self.config.latent_channels
            stat = lambda fill: nn.with_logical_partitioning(lambda: jnp.full((c,), fill, jnp.float32), (IO_AXIS,))
            self.shift = self.variable("latent_stats", "shift", stat(0.0))
            self.scale = self.variable("latent_stats", "scale", stat(1.0))

    def __call__(self, video, key: jax.Array | None = None):
        posterior = self.encode(video)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior

    def encode(self, video) -> DiagonalGaussian:
        """Video ``(B, 1 + tf k, H, W, 3)`` in [-1, 1] -> posterior over raw latents ``(B, 1 + k, h, w, c)``."""
        self.config.check_video_dtype(video.dtype)
        if not caching(self):  # chunk shapes are checked by encode_chunked
            self.config.check_video_shape(video.shape)
        mean, logvar = self.encoder(video)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents) -> jax.Array:
        """Raw (not normalised) latents ``(B, t, h, w, c)`` -> video in roughly [-1, 1]."""
        self.config.check_latent_shape(latents.shape)
        return self.decoder(latents)

    def encode_normalized(self, video, key: jax.Array | None = None):
        """Video in [-1, 1] -> DiT-space latents: the posterior mode (a sample with ``key``), normalised."""
        posterior = self.encode(video)
        return self.normalize(posterior.mode() if key is None else posterior.sample(key))

    def decode_normalized(self, latents):
        """DiT-space latents -> video in roughly [-1, 1] (inverse of :meth:`encode_normalized`)."""
        return self.decode(self.denormalize(latents))

    def _stats(self):
        if not hasattr(self, "shift"):
            raise ValueError("variables have no 'latent_stats' collection; pass the full variables from vae.init")
        return self.shift.value, self.scale.value

    def normalize(self, latents):
        """Raw latents -> roughly zero-mean unit-variance latents (what the DiT sees)."""
        shift, scale = self._stats()
        return (latents - shift) / scale

    def denormalize(self, latents):
        """Inverse of :meth:`normalize`: DiT-space latents -> raw latents for :meth:`decode`."""
        shift, scale = self._stats()
        return latents * scale + shift
