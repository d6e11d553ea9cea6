"""What the training loop trains: the VAE task and the DiT task.

A task owns a model's parameter init (boxed with logical axis names), its
loss ``loss_fn(params, batch, rng, frozen, step)``, the frozen inputs the loss
needs (the trained VAE for the DiT), how a host batch from the Grain pipeline
becomes sharded device arrays, and its periodic evaluation (VAE: PSNR / SSIM
on fixed held-out clips and a reconstruction grid; DiT: sample clips for fixed
prompts). Both train from ``config`` sections ``vae`` / ``dit`` (preset +
overrides), ``vae_loss``, ``flow``, ``text``, ``data`` and ``sample``.
Beside them: ``vae_from_config``, ``video_shape``, ``export_dir`` (what other
modules read of a config), ``sample_preview_clips`` and ``load_vae_variables``
(the trained VAE the DiT loads). The VAE's evaluation clips are ``vidiff.train.eval_clips``'s.
"""
from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vidiff import io, parallel
from vidiff.checks import height_width
from vidiff.diffusion import resolve_shift
from vidiff.diffusion.samplers import SAMPLE_DEFAULTS
from vidiff.diffusion.sampling import sample_latents, text_context
from vidiff.models.dit import VideoDiT, dit_preset
from vidiff.models.dit import init_params as dit_init_params
from vidiff.models.patches import token_count
from vidiff.models.vae import VideoVAE, compiled, compute_latent_stats, set_latent_stats, vae_preset
from vidiff.models.vae_losses import (PatchDiscriminator3D, VAELossConfig, adversarial_factor, discriminator_loss,
                                      make_perceptual_fn, vae_loss)
from vidiff.models.export import export_dit, export_vae, file_sha256, load_vae, recorded_config
from vidiff.train.dit_loss import dit_condition, dit_loss_fn, encode_latents
from vidiff.train.eval_clips import validation_clips
from vidiff.train.latent_cache import LatentCache, vae_fingerprint
from vidiff.train.metrics import psnr, ssim
from vidiff.train.state import skipped_steps_clause


def build(config, model: str, mesh):
    """The task for ``model`` ("vae" | "dit")."""
    return {"vae": VAETask, "dit": DiTTask}[model](config, mesh)


def vae_from_config(config) -> VideoVAE:
    """The VAE ``config.vae`` describes (its preset with its overrides)."""
    return VideoVAE(vae_preset(config.vae.preset, **config.vae.overrides))


def video_shape(config, batch: int | None = None) -> tuple[int, ...]:
    """``(batch, frames, height, width, 3)`` of a training batch (``data.batch_size`` unless ``batch``)."""
    return (batch or config.data.batch_size, config.data.num_frames, *height_width(config.data.size), 3)


class Task:
    """Shared plumbing: data pipeline, host -> device batches, frozen inputs."""

    batch_keys: tuple[str, ...] = ("video",)
    rate_name = "tokens_per_s"  # what a log row calls tokens_in's count per second
    networks: dict[str, int] | None = None  # parameter group -> first update training it (make_optimizer)
    # Captions this process trained on that were cut to text.max_length (none without text). The loop adds
    # each batch's count when a step consumes it: a batch prepared ahead (vidiff.train.prefetch) is not counted.
    captions_truncated = 0

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        self.frozen, self.frozen_shardings = {}, {}

    def pipeline(self, config):
        """The Grain pipeline of ``config.data`` (the loop passes this process's share of the batch)."""
        from vidiff.data import make_pipeline

        return make_pipeline(config.data)

    def host_arrays(self, raw: dict) -> tuple[dict, int]:
        """The batch's numeric host arrays, and how many of its captions were cut to ``text.max_length``."""
        return {k: np.asarray(raw[k]) for k in self.batch_keys}, 0

    def device_batch(self, raw: dict, mesh) -> tuple[dict, int]:
        """Numeric batch entries as global arrays sharded over the data axes (multi-host safe), and the
        count of its captions that were cut (:meth:`host_arrays`)."""
        arrays, truncated = self.host_arrays(raw)
        return parallel.device_batch(arrays, mesh), truncated

    @property
    def batch_shardings(self):
        ndims = {"video": 5, "latents": 5, "text_tokens": 3, "text_lengths": 1, "pooled": 2}
        return {k: parallel.batch_sharding(self.mesh, ndims[k]) for k in self.batch_keys}

    def save_cache(self, workdir: Path) -> None:
        """Persist host-side caches beside a checkpoint (the DiT's latent cache, written in the background
        until :meth:`wait_cache`); none by default."""

    def wait_cache(self) -> None:
        """Block until what :meth:`save_cache` started is on disk; a failed write raises here."""

    def load_cache(self, workdir: Path) -> str | None:
        """Reload what :meth:`save_cache` wrote; a line for the log, or None."""
        return None


class VAETask(Task):
    """Reconstruction + KL (+ optional perceptual and 3D-patch adversarial terms)."""

    rate_name = "frames_per_s"  # its tokens_in counts frames: no spacetime patch to count

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.vae = vae_from_config(config)
        self.loss_config = VAELossConfig(**dict(config.vae_loss))
        self.perceptual_fn = (make_perceptual_fn(self.loss_config.perceptual_weights_path)
                              if self.loss_config.perceptual_weight > 0 else None)
        self.disc = PatchDiscriminator3D() if self.loss_config.adversarial_weight > 0 else None
        # Clipped and stepped apart; the discriminator's optimizer starts with its loss.
        self.networks = ({"vae": 0, "disc": self.loss_config.adversarial_start_step} if self.disc is not None
                         else None)
        self._val = None

    def init_params(self, key):
        # Parameters do not depend on the clip size: a 1-frame, one-latent-cell video
        # initialises them with far less to compile.
        sf = self.vae.config.spatial_factor
        video = jnp.zeros((1, 1, sf, sf, 3), jnp.float32)
        params = {"vae": self.vae.init(key, video)["params"]}
        if self.disc is not None:  # the smallest frame it takes
            side = self.disc.min_side
            params["disc"] = self.disc.init(jax.random.fold_in(key, 7), jnp.zeros((1, 1, side, side, 3)))["params"]
        return params

    def loss_fn(self, params, batch, rng, frozen, step):
        video = io.unit_range(batch["video"])
        recon, posterior = self.vae.apply({"params": params["vae"]}, video, rng)
        disc_logits = None
        if self.disc is not None:
            fixed_disc = jax.lax.stop_gradient(params["disc"])
            disc_logits = lambda v: self.disc.apply({"params": fixed_disc}, v)
        loss, metrics = vae_loss(video, recon, posterior, self.loss_config, step=step,
                                 perceptual_fn=self.perceptual_fn, disc_logits_fn=disc_logits)
        if self.disc is not None:
            # The discriminator learns from the same step; its loss touches only its own params. metrics["loss"]
            # stays the generator side: the row's loss, and what keep_best ranks, is the VAE's, not the sum.
            d = lambda v: self.disc.apply({"params": params["disc"]}, v)
            d_loss = discriminator_loss(d(video), d(jax.lax.stop_gradient(recon)))
            loss = loss + adversarial_factor(step, self.loss_config.adversarial_start_step) * d_loss
            metrics["discriminator"] = d_loss
        metrics["psnr"] = jnp.mean(psnr(jax.lax.stop_gradient(recon), video))
        return loss, metrics

    def tokens_in(self, batch: dict) -> int:
        return math.prod(batch["video"].shape[:2])  # frames

    def validation_videos(self) -> np.ndarray:
        """Fixed clips the model never trains on: held-out world combos, or the eval split."""
        if self._val is None:
            self._val = validation_clips(self.config)
        return self._val

    def evaluate(self, state, workdir: Path, step: int) -> dict:
        video = io.unit_range(self.validation_videos())
        recon = _reconstruct(self.vae, state.ema_params["vae"], video)
        grid = np.concatenate([io.to_uint8(video[:4]), io.to_uint8(recon[:4])], axis=2)  # originals | recons
        io.write_video(Path(workdir) / "samples" / f"recon_{step:06d}.gif", _tile(grid), preview_fps(self.config))
        return {"val_psnr": float(jnp.mean(psnr(recon, video))), "val_ssim": float(jnp.mean(ssim(recon, video)))}

    def finalize(self, state, config_json: dict, export_dir: Path, made_with: dict | None = None) -> dict:
        """Latent statistics of the EMA VAE over training batches, then export VAE + stats (``made_with``: its
        provenance, ``export_vae``'s)."""
        c = self.vae.config.latent_channels
        variables = {"params": jax.device_get(state.ema_params["vae"]),
                     "latent_stats": {"shift": np.zeros(c, np.float32), "scale": np.ones(c, np.float32)}}
        wanted = int(self.config.vae_train.stats_batches)
        # Finite data (data.num_epochs) may hold fewer batches than asked for: the stats use those there are.
        used = 0

        def videos():  # one batch on the host at a time
            nonlocal used
            for batch in itertools.islice(iter(self.pipeline(self.config)), wanted):
                used += 1
                yield io.unit_range(batch["video"])

        shift, scale = compute_latent_stats(self.vae, variables, videos())
        if not (np.all(np.isfinite(shift)) and np.all(np.isfinite(scale))):
            # Finite but huge parameters (a learning rate far too high) can still overflow on real clips.
            raise ValueError(
                f"the vae's latents of training clips are not finite after step {int(state.step)}"
                f"{skipped_steps_clause(state)}; nothing "
                f"exported. Lower vae_train.optim.lr (or set optim.grad_clip) and train again from a new workdir"
            )
        variables = set_latent_stats(variables, shift, scale)
        export_vae(export_dir, config_json, variables, vae_config=self.vae.config, made_with=made_with)
        return {"latent_shift": np.asarray(shift).tolist(), "latent_scale": np.asarray(scale).tolist(),
                "latent_stats_batches": used}


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(vae, params, video):
    return vae.apply({"params": params}, video)[0]


def _tile(videos: np.ndarray) -> np.ndarray:
    """(N, T, H, W, 3) -> (T, H, N*W, 3): clips side by side."""
    return np.concatenate(list(videos), axis=2)


def preview_fps(config) -> float:
    """The data's frame rate for the preview gifs, within what a gif plays (60 fps footage would stop the run)."""
    low, high = io.FPS_RANGES[".gif"]
    return min(max(config.data.get("fps") or 8, low), high)


LATENT_SOURCES = ("on_the_fly", "cached", "prepared")


def _latent_source(config) -> str:
    """``dit_train.latents``, one of ``LATENT_SOURCES``."""
    mode = config.dit_train.get("latents", "on_the_fly")
    if mode not in LATENT_SOURCES:
        raise ValueError(f"dit_train.latents={mode!r} must be one of {', '.join(map(repr, LATENT_SOURCES))}")
    return mode


class DiTTask(Task):
    """Rectified-flow velocity regression on VAE latents, text from a frozen encoder.

    ``dit_train.latents`` says where the latents come from: ``"on_the_fly"``
    encodes each batch inside the step (a posterior sample); ``"cached"`` encodes
    each distinct clip once on the host (posterior mode, up to ``dit_train.cache_clips``
    clips, :mod:`vidiff.train.latent_cache`) and reuses it in later epochs and, saved
    with each checkpoint, after a resume; ``"prepared"``
    reads ``latents`` / ``text_embedding`` / ``text_mask`` / ``text_pooled`` stored
    by ``vidiff prepare --latents``. Text embeddings are cached per caption by the encoder.
    """

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        latents = _latent_source(config)
        self.prepared = latents == "prepared"
        dit_condition(config)  # a bad dit_train.condition mode fails here, before the text encoder loads
        self.batch_keys = ("video" if latents == "on_the_fly" else "latents", "text_tokens", "text_lengths", "pooled")
        from vidiff.models.text import text_encoder

        self.text = text_encoder(config.text.encoder, max_length=config.text.max_length,
                                 batch_size=config.text.get("batch_size", 1))
        # The VAE as its export records it (a preset edited since changes nothing), computing in this run's dtype.
        planned = vae_from_config(config)
        recorded = recorded_config(export_dir(config), "vae", dtype=planned.config.dtype)
        self.vae = planned if recorded is None else VideoVAE(recorded)
        self.dit = VideoDiT(dit_preset(config.dit.preset, **{
            "text_dim": self.text.dim, "pooled_dim": self.text.pooled_dim,
            "latent_channels": self.vae.config.latent_channels, **config.dit.overrides}))
        self.loss_fn = dit_loss_fn(self.dit, self.vae, config)
        self.latent_shape = self.vae.config.latent_shape(video_shape(config, 1))[1:]
        self.shift = resolve_shift(config.flow.shift, self.latent_shape, self.dit.config.patch)  # the samples' clip
        variables = load_vae_variables(config)
        self.vae_sha256 = file_sha256(export_dir(config) / "vae.safetensors")  # the DiT's export records it
        replicated = parallel.replicated(mesh)
        self.frozen = {"vae": jax.device_put(variables, replicated)}
        self.frozen_shardings = jax.tree.map(lambda _: replicated, self.frozen)
        self.latent_cache = None
        if latents == "cached":  # a miss is this process's own: encoded on one of its devices, not on the mesh's
            encode = functools.partial(encode_latents, self.vae, jax.device_put(variables, jax.local_devices()[0]))
            self.latent_cache = LatentCache(encode, config.dit_train.get("cache_clips", 100_000),
                                            fingerprint=vae_fingerprint(variables, self.vae.config))

    def pipeline(self, config):
        """Prepared latents are read without their frames: the step never reads them, and decoding them was
        8-20x a record's cost (``make_pipeline(latents_only=True)``)."""
        if not self.prepared:
            return super().pipeline(config)
        from vidiff.data import make_pipeline

        return make_pipeline(config.data, latents_only=True)

    def init_params(self, key):
        return dit_init_params(self.dit.config, key)

    def host_arrays(self, raw: dict) -> tuple[dict, int]:
        captions = [str(c) for c in raw["caption"]]
        if self.prepared:
            return _prepared_arrays(raw, captions, self.text), 0
        emb = self.text.encode(captions)
        video = np.asarray(raw["video"])
        pixels = {"video": video} if self.latent_cache is None else {"latents": self.latent_cache(video)}
        return {**pixels, "text_tokens": emb.tokens, "text_lengths": emb.mask.sum(-1).astype(np.int32),
                "pooled": emb.pooled}, int(emb.truncated.sum())

    def tokens_in(self, batch: dict) -> int:
        """Spacetime patches in a device batch (its bucket's clip size; read from shapes, no device sync)."""
        shape = batch["latents"].shape if "latents" in batch else self.vae.config.latent_shape(batch["video"].shape)
        return shape[0] * token_count(shape[1:4], self.dit.config.patch)

    def evaluate(self, state, workdir: Path, step: int) -> dict:
        prompts = list(self.config.sample.prompts)
        clips = sample_preview_clips(self, state.ema_params, prompts, seed=0)
        io.write_video(Path(workdir) / "samples" / f"samples_{step:06d}.gif", _tile(clips), preview_fps(self.config))
        return {}

    def finalize(self, state, config_json: dict, export_dir: Path, made_with: dict | None = None) -> dict:
        """Export the EMA DiT next to the VAE it was trained on (``made_with``: its provenance)."""
        export_dit(export_dir, config_json, jax.device_get(state.ema_params), vae_sha256=self.vae_sha256,
                   dit_config=self.dit.config, vae_config=self.vae.config, made_with=made_with)
        return {} if self.latent_cache is None else {"latent_cache": self.latent_cache.stats()}

    def _cache_path(self, workdir: Path) -> Path:
        """Each process caches the clips it reads, in a file of its own."""
        return Path(workdir) / "latent_cache" / f"process_{jax.process_index()}.npz"

    def save_cache(self, workdir: Path) -> None:
        if self.latent_cache is not None:
            self.latent_cache.save(self._cache_path(workdir))

    def wait_cache(self) -> None:
        if self.latent_cache is not None:
            self.latent_cache.wait()

    def load_cache(self, workdir: Path) -> str | None:
        return None if self.latent_cache is None else self.latent_cache.load(self._cache_path(workdir))


def _prepared_arrays(raw: dict, captions: list[str], text) -> dict:
    """A prepared batch's stored latents and text embeddings. The stored embeddings' cuts were counted by
    `vidiff prepare`; the empty prompt that replaces a dropped caption's is never cut."""
    tokens, mask = np.array(raw["text_embedding"], np.float32), np.array(raw["text_mask"], bool)
    pooled = np.array(raw["text_pooled"], np.float32)
    # Caption dropout blanks the caption after the embedding was stored: use the empty prompt's.
    dropped = np.array([c == "" for c in captions])
    if dropped.any():
        empty = text.encode([""])
        tokens[dropped], mask[dropped], pooled[dropped] = empty.tokens[0], empty.mask[0], empty.pooled[0]
    return {"latents": np.asarray(raw["latents"], np.float32), "text_tokens": tokens,
            "text_lengths": mask.sum(-1).astype(np.int32), "pooled": pooled}


def sample_preview_clips(task: DiTTask, params, prompts, *, seed: int = 0) -> np.ndarray:
    """Training's preview clips (``samples/``): uint8 ``(N, T, H, W, 3)`` for ``prompts``, config.sample settings."""
    sample = {**SAMPLE_DEFAULTS, **task.config.sample}  # the defaults validation checked the section with
    context = text_context(task.text.encode(prompts))
    uncond = text_context(task.text.encode([""] * len(prompts)))
    noise = jax.random.normal(jax.random.key(seed), (len(prompts), *task.latent_shape))
    latents = sample_latents(task.dit, params, context, uncond, noise, steps=int(sample["steps"]),
                             sampler=sample["sampler"], guidance=float(sample["guidance"]), shift=task.shift)
    return io.to_uint8(compiled(task.vae, "decode_normalized")(task.frozen["vae"], latents))


def load_vae_variables(config) -> dict:
    """The trained VAE (EMA params + latent stats) exported into ``<workdir>/export`` by VAE training."""
    if not (export_dir(config) / "vae.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained VAE in {export_dir(config)}; train it first with the same config and --model vae"
        )
    return load_vae(export_dir(config))


def export_dir(config) -> Path:
    """Where a run exports its models (``<workdir>/export``): the DiT's VAE is read from there."""
    return Path(config.workdir) / "export"
