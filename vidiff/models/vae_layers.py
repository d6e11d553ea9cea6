"""The causal VAE's building blocks: causal 3D conv (with its chunk cache), per-position norm, blocks.

Everything here keeps two properties the VAE's chunked and tiled codecs rely
on: no output frame sees a later input frame, and nothing pools statistics
across frames or pixels. A causal conv keeps the last ``kernel_t - stride_t``
frames it saw in the ``cache`` collection when the caller makes it mutable, so
a clip fed chunk by chunk gives exactly its one-shot result.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vidiff.models.layers import rms_normalize

VIDEO_AXES = ("batch", "time", "height", "width", "channels")
# Conv axes that face pixels (3) or latents (4-16) are too narrow to shard; their own
# logical name keeps them replicated whatever the rules do with conv_in / conv_out.
IO_AXIS = "io_channels"


def constrain_video(x):
    return nn.with_logical_constraint(x, VIDEO_AXES)


def caching(module: nn.Module) -> bool:
    """Chunked mode: the caller made ``cache`` mutable (init never creates caches)."""
    return module.is_mutable_collection("cache") and not module.is_initializing()


class CausalConv3d(nn.Module):
    """3D conv that pads time on the past side only, with zeros, so output frame i sees frames <= i.

    Zeros rather than a replicated first frame: a zero past is exactly what a
    zero-initialised cache gives, so a clip's first chunk and its one-shot
    encoding take the same path, and no made-up still history is invented.
    With ``stride_t = s`` the first chunk gets ``kernel_t - 1`` zero frames, which
    leaves frame 0 in a group of its own (WAN / CogVideoX style); later chunks
    start from the cached last ``kernel_t - s`` input frames.
    """

    features: int
    kernel: tuple[int, int, int] = (3, 3, 3)
    strides: tuple[int, int, int] = (1, 1, 1)
    dtype: Any = jnp.float32
    in_axis: str = "conv_in"  # logical names of the channel axes (IO_AXIS at the model's edges)
    out_axis: str = "conv_out"

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel
        keep = kt - self.strides[0]  # frames of this chunk the next chunk's first window needs
        if kt > 1:
            if caching(self) and self.has_variable("cache", "past"):
                past = self.get_variable("cache", "past").astype(x.dtype)
            else:
                past = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([past, x], axis=1)
            if caching(self) and keep > 0:
                self.put_variable("cache", "past", x[:, x.shape[1] - keep:])
        return nn.Conv(
            self.features, self.kernel, strides=self.strides,
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dtype=self.dtype, param_dtype=jnp.float32,
            conv_general_dilated=conv3d_as_2d if jax.default_backend() == "cpu" else None,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("kernel_t", "kernel_h", "kernel_w", self.in_axis, self.out_axis)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.out_axis,)),
            name="conv",
        )(x)


def conv3d_as_2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None):
    """``lax.conv_general_dilated`` for a channels-last 3D conv with no time padding, done as one 2D conv.

    The ``kt`` time taps of each output frame are stacked into channels, so the
    kernel ``(kt, kh, kw, C, O)`` becomes ``(kh, kw, kt*C, O)``: the same sums,
    but XLA:CPU runs 2D convolutions ~3x faster than 3D ones (forward and
    backward). Accelerators keep the native 3D conv, which needs no stacked copy.
    """
    if feature_group_count != 1 or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        raise ValueError("conv3d_as_2d supports plain convolutions only (no groups or dilation)")
    (pad_t, *pad_hw) = padding
    if tuple(pad_t) != (0, 0):
        raise ValueError("conv3d_as_2d expects time padded by the caller (causal padding)")
    kt, kh, kw, cin, cout = rhs.shape
    st, sh, sw = window_strides
    b, t = lhs.shape[:2]
    out_t = (t - kt) // st + 1
    taps = [lhs[:, i: i + st * (out_t - 1) + 1: st] for i in range(kt)]
    x = jnp.concatenate(taps, axis=-1) if kt > 1 else taps[0]
    kernel = rhs.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, cout)  # channel i*C + c is tap i, channel c
    y = jax.lax.conv_general_dilated(x.reshape(b * out_t, *x.shape[2:]), kernel, (sh, sw), pad_hw,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y.reshape(b, out_t, *y.shape[1:])


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each (frame, pixel): no statistics across time or space.

    GroupNorm pools over the frame (breaks tiling) or the clip (breaks causality
    and chunking); normalising each position alone keeps both exact.
    """

    dtype: Any = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
                           (x.shape[-1],), jnp.float32)
        # The VAE has no remat policy, so the norm is recomputed in backward here: 9.8% less temporary memory
        # for a small bfloat16 VAE's training gradient at 17x128x128 (XLA:CPU).
        return (rms_normalize(x, self.eps, recompute=True) * scale).astype(self.dtype)


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs (1x1x1 shortcut if the width changes)."""

    features: int
    dtype: Any = jnp.float32
    time_kernel: int = 3

    @nn.compact
    def __call__(self, x):
        kernel = (self.time_kernel, 3, 3)
        # The norms' outputs pinned to the video layout, as SpatialAttention's: left to XLA, a data x fsdp x
        # tensor mesh partitioned their backward wrongly (the loss right, gradients off by up to 26%).
        h = nn.silu(constrain_video(ChannelRMSNorm(self.dtype, name="norm1")(x)))
        h = CausalConv3d(self.features, kernel, dtype=self.dtype, name="conv1")(h)
        h = nn.silu(constrain_video(ChannelRMSNorm(self.dtype, name="norm2")(h)))
        h = CausalConv3d(self.features, kernel, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, (1, 1, 1), dtype=self.dtype, name="shortcut")(x)
        return constrain_video(x + h)


def _dense(features, dtype, name):
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


class SpatialAttention(nn.Module):
    """Single-head self-attention within each frame (never across frames, to stay causal)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        # The norm's output pinned to the video layout (channels whole): left to propagation on a
        # data x fsdp x tensor mesh, XLA (jax 0.10.2) partitioned the norm-then-matmul backward wrongly,
        # gradients off by 100% with the loss right; the same norm and matmul in plain JAX do it too.
        y = constrain_video(ChannelRMSNorm(self.dtype, name="norm")(x))
        qkv = _dense(3 * c, self.dtype, "qkv")(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        out = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        return constrain_video(x + _dense(c, self.dtype, "proj")(out))


class MidBlock(nn.Module):
    """ResBlock, per-frame attention (optional), ResBlock: the widest, lowest-resolution stage."""

    features: int
    attention: bool
    dtype: Any = jnp.float32
    time_kernel: int = 3

    @nn.compact
    def __call__(self, x):
        x = ResBlock(self.features, self.dtype, self.time_kernel, name="res1")(x)
        if self.attention:
            x = SpatialAttention(self.dtype, name="attn")(x)
        return ResBlock(self.features, self.dtype, self.time_kernel, name="res2")(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a causal conv; in time latent frame 0 stays one frame.

    Each frame is repeated twice and the very first output frame dropped, so
    ``1 + k`` frames become ``1 + 2k``. Later chunks keep both copies; the
    ``cache/started`` flag tells a later chunk from the first.
    """

    features: int
    time: bool
    space: bool
    dtype: Any = jnp.float32
    time_kernel: int = 3

    @nn.compact
    def __call__(self, x):
        if self.time:
            first = not (caching(self) and self.has_variable("cache", "started"))
            if caching(self):
                self.put_variable("cache", "started", jnp.ones((), jnp.bool_))
            x = jnp.repeat(x, 2, axis=1)[:, 1:] if first else jnp.repeat(x, 2, axis=1)
        if self.space:
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return constrain_video(CausalConv3d(self.features, (self.time_kernel, 3, 3), dtype=self.dtype, name="conv")(x))
