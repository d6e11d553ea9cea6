"""Training losses for the video VAE: reconstruction + KL, LPIPS-style perceptual, 3D patch GAN.

    config = VAELossConfig(reconstruction="l1", kl_weight=1e-6)
    recon, posterior = vae.apply(variables, video, key)          # VideoVAE.__call__
    loss, metrics = vae_loss(video, recon, posterior, config, step=step,
                             perceptual_fn=make_perceptual_fn(config.perceptual_weights_path),
                             disc_logits_fn=lambda v: disc.apply(disc_variables, v))
    d_loss = discriminator_loss(disc.apply(dv, video), disc.apply(dv, recon))  # separate optimizer

Perceptual: ``LPIPS`` is VGG16's conv stack plus LPIPS's per-layer linear
heads, applied per frame. Nothing is downloaded: ``load_lpips(path)`` reads a
safetensors file with torchvision names (``features.N.weight/bias``, OIHW) and
lpips names (``linK.model.1.weight``), i.e. torchvision's vgg16 ``features``
merged with the lpips package's ``vgg.pth`` heads; widths come from the file.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vidiff.models.vae import DiagonalGaussian
from vidiff.models.vae_layers import IO_AXIS

# ------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """Which terms ``vae_loss`` uses and their weights; a weight of 0 switches a term off.

    Reconstruction is a per-pixel mean. The KL is summed over latent elements
    and divided by the number of pixel values, so ``kl_weight`` means what it
    does in LDM-style trainers (1e-6) whatever the clip size.
    ``adaptive_adversarial_weight`` scales the generator term by
    ||grad nll|| / ||grad g|| (VQGAN), with gradients taken w.r.t. the
    reconstruction rather than the decoder's last kernel, so the loss needs no
    access to decoder internals.
    """

    reconstruction: str = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None
    adversarial_weight: float = 0.0
    adversarial_start_step: int = 0
    adaptive_adversarial_weight: bool = True

    def __post_init__(self):
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"VAELossConfig.reconstruction={self.reconstruction!r} must be 'l1' or 'l2'")
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ValueError(
                "VAELossConfig.perceptual_weights_path is required when "
                f"perceptual_weight={self.perceptual_weight} > 0 "
                "(no VGG is downloaded): point it at an LPIPS safetensors file or set perceptual_weight=0")
        for name in ("kl_weight", "perceptual_weight", "adversarial_weight"):
            value = getattr(self, name)
            # NaN passes a ``< 0`` test and would only show as a non-finite loss blamed on the learning rate.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"VAELossConfig.{name}={value!r} must be a finite number >= 0 (0 switches the term off)")
        if isinstance(self.adversarial_start_step, bool) or not isinstance(self.adversarial_start_step, int) \
                or self.adversarial_start_step < 0:
            raise ValueError(f"VAELossConfig.adversarial_start_step={self.adversarial_start_step!r} must be an int >= 0")
        if not isinstance(self.adaptive_adversarial_weight, bool):  # a config string "no" would read as True
            raise ValueError(f"VAELossConfig.adaptive_adversarial_weight={self.adaptive_adversarial_weight!r} "
                             "must be True or False")


# ----------------------------------------------------------------------------- loss


def vae_loss(video, recon, posterior: DiagonalGaussian, config: VAELossConfig = VAELossConfig(), *,
             step=0, perceptual_fn: Callable | None = None, disc_logits_fn: Callable | None = None):
    """Generator-side VAE loss; returns ``(scalar, metrics)``.

    ``perceptual_fn(x, y) -> (B,)`` (see ``make_perceptual_fn``) is needed when
    ``perceptual_weight > 0``; ``disc_logits_fn(video) -> logits`` when
    ``adversarial_weight > 0``. ``step`` may be traced (the GAN term turns on
    at ``adversarial_start_step`` without recompiling).
    """
    if config.perceptual_weight > 0 and perceptual_fn is None:
        raise ValueError("vae_loss: perceptual_weight > 0 needs "
                         "perceptual_fn=make_perceptual_fn(config.perceptual_weights_path)")
    if config.adversarial_weight > 0 and disc_logits_fn is None:
        raise ValueError("vae_loss: adversarial_weight > 0 needs disc_logits_fn "
                         "(e.g. lambda v: disc.apply(disc_variables, v))")
    video = video.astype(jnp.float32)

    def nll(r):  # everything that pulls the reconstruction toward the target
        err = jnp.abs(r - video) if config.reconstruction == "l1" else jnp.square(r - video)
        rec = jnp.mean(err)
        perc = jnp.mean(perceptual_fn(r, video)) if config.perceptual_weight > 0 else jnp.zeros(())
        return rec + config.perceptual_weight * perc, (rec, perc)

    nll_value, (rec, perc) = nll(recon)
    pixels_per_example = math.prod(video.shape[1:])
    kl = jnp.mean(posterior.kl()) / pixels_per_example
    loss = nll_value + config.kl_weight * kl
    metrics = {"reconstruction": rec, "kl": kl, "perceptual": perc}

    if config.adversarial_weight > 0:
        gen = lambda r: generator_loss(disc_logits_fn(r))
        g = gen(recon)
        weight = jnp.asarray(config.adversarial_weight, jnp.float32)
        if config.adaptive_adversarial_weight:
            fixed = jax.lax.stop_gradient(recon)
            nll_grad = jax.grad(lambda r: nll(r)[0])(fixed)
            g_grad = jax.grad(gen)(fixed)
            norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a)))
            # Both losses are means over the clip's values, so their gradients shrink like 1/sqrt(size):
            # VQGAN's 1e-4 guard is scaled down with them, or it would outweigh g's gradient on large clips.
            ratio = norm(nll_grad) / (norm(g_grad) + 1e-4 / recon.size)
            weight = weight * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))
        weight = weight * adversarial_factor(step, config.adversarial_start_step)
        loss = loss + weight * g
        metrics.update(generator=g, adversarial_weight=weight)
    metrics["loss"] = loss
    return loss, metrics


def adversarial_factor(step, start_step: int):
    """1.0 from ``start_step`` on, else 0.0 (works on traced steps)."""
    return jnp.where(jnp.asarray(step) >= start_step, 1.0, 0.0)


def discriminator_loss(real_logits, fake_logits):
    """Hinge loss ``0.5 * (mean relu(1 - real) + mean relu(1 + fake))`` (VQGAN's scale)."""
    return 0.5 * (jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits)))


def generator_loss(fake_logits):
    """Hinge generator term: ``-mean(fake_logits)``."""
    return -jnp.mean(fake_logits)


# ---------------------------------------------------------------------- discriminator


def _conv(features, kernel, strides, dtype, name, bias=True, in_axis="conv_in", out_axis="conv_out"):
    """Conv with 'same' padding for odd kernels (and k=4, stride 2); pixel-facing axes pass IO_AXIS."""
    names = ("kernel_t", "kernel_h", "kernel_w")[3 - len(kernel):] + (in_axis, out_axis)
    return nn.Conv(features, kernel, strides=strides, padding=[((k - 1) // 2, (k - 1) // 2) for k in kernel],
                   use_bias=bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)))


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: plain (non-causal) 3x4x4 convs halving space, keeping time; one logit per patch.

    It judges whole clips, so it may look at the future; it works on images
    (1-frame videos) too. Output: ``(B, T, H / 2**len(channels), W / ..., 1)``.
    """

    channels: tuple[int, ...] = (64, 128, 256)
    dtype: Any = jnp.float32

    @property
    def min_side(self) -> int:
        """The smallest frame side its halvings keep a pixel of."""
        return 2 ** len(self.channels)

    @nn.compact
    def __call__(self, video):
        _check_disc_side(video.shape[-3:-1], self)
        x = video.astype(self.dtype)
        for i, ch in enumerate(self.channels):
            x = _conv(ch, (3, 4, 4), (1, 2, 2), self.dtype, f"conv{i}", in_axis=IO_AXIS if i == 0 else "conv_in")(x)
            if i > 0:  # no norm on raw pixels, as in PatchGAN; statistics over the whole clip are fine here
                boxed = lambda init: nn.with_logical_partitioning(init, ("conv_out",))
                x = nn.GroupNorm(num_groups=math.gcd(32, ch), dtype=self.dtype, param_dtype=jnp.float32,
                                 scale_init=boxed(nn.initializers.ones_init()),
                                 bias_init=boxed(nn.initializers.zeros_init()), name=f"norm{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return _conv(1, (3, 3, 3), (1, 1, 1), self.dtype, "logits", out_axis=IO_AXIS)(x).astype(jnp.float32)


def check_frame_size(height: int, width: int, config: VAELossConfig,
                     disc: PatchDiscriminator3D = PatchDiscriminator3D()) -> None:
    """One-line error when the loss's networks would leave no pixel of ``height x width`` frames (the loss
    would be NaN): LPIPS needs ``LPIPS_MIN_SIDE``, the discriminator its ``min_side``."""
    if config.perceptual_weight > 0:
        _check_lpips_side((height, width))
    if config.adversarial_weight > 0:
        _check_disc_side((height, width), disc)


def _check_disc_side(size, disc: PatchDiscriminator3D) -> None:
    _check_side(size, disc.min_side, "adversarial", f"the discriminator's {len(disc.channels)} halvings")


def _check_lpips_side(size) -> None:
    _check_side(size, LPIPS_MIN_SIDE, "perceptual", "LPIPS's fifth VGG block")


def _check_side(size, least: int, term: str, why: str) -> None:
    if min(size) < least:
        raise ValueError(f"vae_loss.{term}_weight > 0 needs frames of at least {least} px ({why} would leave "
                         f"none), got {size[0]}x{size[1]}; train larger clips or set vae_loss.{term}_weight=0")


# ------------------------------------------------------------------------ perceptual

# torchvision vgg16.features indices of the 3x3 convs, per block; LPIPS taps
# the ReLU after the last conv of each block (relu1_2 ... relu5_3).
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
LPIPS_MIN_SIDE = 2 ** (len(VGG16_BLOCKS) - 1)  # four 2x2 poolings before the last block
_LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nn.Module):
    """LPIPS distance between image batches ``(N, H, W, 3)`` in [-1, 1] -> ``(N,)``.

    ``widths`` are the five VGG block widths (64, 128, 256, 512, 512 for the
    real network); frames must be at least ``LPIPS_MIN_SIDE`` pixels so block 5 is not empty.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        _check_lpips_side(x.shape[1:3])
        n = x.shape[0]
        h = (jnp.concatenate([x, y]).astype(jnp.float32) - _LPIPS_SHIFT) / _LPIPS_SCALE
        h = h.astype(self.dtype)
        distance = jnp.zeros((n,), jnp.float32)
        for block, (indices, width) in enumerate(zip(VGG16_BLOCKS, self.widths)):
            if block > 0:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i in indices:
                in_axis = IO_AXIS if i == 0 else "conv_in"
                h = nn.relu(_conv(width, (3, 3), (1, 1), self.dtype, f"features_{i}", in_axis=in_axis)(h))
            f = h.astype(jnp.float32)
            f = f * jax.lax.rsqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True) + 1e-20)  # unit norm per pixel
            diff = jnp.square(f[:n] - f[n:])
            head = _conv(1, (1, 1), (1, 1), jnp.float32, f"lin{block}", bias=False, out_axis=IO_AXIS)(diff)
            distance = distance + jnp.mean(head, axis=(1, 2, 3))
        return distance


def load_lpips(path: str, dtype=jnp.float32) -> tuple[LPIPS, dict]:
    """``(LPIPS module, variables)`` from a safetensors file in torchvision/lpips naming."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, FileNotFoundError) as error:  # missing, cut short, or another kind of file
        raise ValueError(f"LPIPS weights {str(path)!r} are not a readable safetensors file ({error}); point "
                         "vae_loss.perceptual_weights_path at LPIPS weights in torchvision/lpips naming") from None
    params = {}
    for block, indices in enumerate(VGG16_BLOCKS):
        names = [f"features.{i}.{p}" for i in indices for p in ("weight", "bias")] + [f"lin{block}.model.1.weight"]
        if missing := [k for k in names if k not in tensors]:
            raise ValueError(f"{path}: missing LPIPS tensor {missing[0]!r}; expected torchvision vgg16 "
                             "'features.N.weight/bias' and lpips 'linK.model.1.weight'")
        for i in indices:  # OIHW -> HWIO
            params[f"features_{i}"] = {"kernel": tensors[f"features.{i}.weight"].transpose(2, 3, 1, 0),
                                       "bias": tensors[f"features.{i}.bias"]}
        params[f"lin{block}"] = {"kernel": tensors[f"lin{block}.model.1.weight"].transpose(2, 3, 1, 0)}
    widths = tuple(int(params[f"features_{b[0]}"]["bias"].shape[0]) for b in VGG16_BLOCKS)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return LPIPS(widths, dtype), {"params": params}


def save_lpips(variables, path: str) -> None:
    """Write LPIPS variables in the layout ``load_lpips`` reads (tests; converting your own weights)."""
    from safetensors.numpy import save_file

    params = nn.unbox(variables)["params"]
    out = {}
    for block, indices in enumerate(VGG16_BLOCKS):
        for i in indices:
            out[f"features.{i}.weight"] = np.asarray(params[f"features_{i}"]["kernel"]).transpose(3, 2, 0, 1)
            out[f"features.{i}.bias"] = np.asarray(params[f"features_{i}"]["bias"])
        out[f"lin{block}.model.1.weight"] = np.asarray(params[f"lin{block}"]["kernel"]).transpose(3, 2, 0, 1)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, str(path))


def make_perceptual_fn(path: str, dtype=jnp.float32) -> Callable:
    """``fn(x, y) -> (B,)``: LPIPS from ``path`` averaged over the frames of videos ``(B, T, H, W, 3)``.

    The weights are frozen (closed over with ``stop_gradient``); the function is
    jitted, and inlines when called inside another jitted function.
    """
    module, variables = load_lpips(path, dtype)
    variables = jax.lax.stop_gradient(variables)

    def perceptual(x, y):
        b, t = x.shape[:2]
        frames = lambda v: v.reshape(b * t, *v.shape[2:])
        return module.apply(variables, frames(x), frames(y)).reshape(b, t).mean(axis=1)

    return jax.jit(perceptual)
