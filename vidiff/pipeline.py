"""TextToVideo: prompts in, ``uint8`` clips out, from one exported model directory, in every prompting mode.

    from vidiff.pipeline import TextToVideo
    pipe = TextToVideo.from_checkpoint()          # the bundled world_tiny model, or a `vidiff train` export dir
    clips = pipe(["a red circle moving left"], num_frames=17, height=32, width=32, steps=20, guidance=4.0, seed=0)
    clips.shape, clips.dtype                      # (1, 17, 32, 32, 3) uint8

Every other mode is the same sampler with some latent frames known: held at
clean latents of an input and flagged in the DiT's conditioning mask, the way
training's conditioning masks present them (``vidiff.diffusion.conditioning``):

    pipe.image_to_video(prompts, image)                  # latent 0 <- the image
    pipe.extend(prompts, video, direction="forward")     # first k latents <- the end of the video
    pipe.extend(prompts, video, direction="backward")    # last k latents <- the start of the video
    pipe.connect(prompts, video_a, video_b)              # first latent <- end of A, last <- start of B
    pipe.edit(prompts, video, strength=0.6)              # SDEdit: the video's latents noised to t = 0.6
    pipe.loop(prompts, num_frames=16)                    # the frame after the last is the first
    pipe(prompts, num_frames=1)                          # a single image

Pixel frames map to latent frames through the causal VAE (latent 0 is frame
0 alone, latent ``j > 0`` is frames ``1 + tf (j - 1) .. tf j``; see
``vidiff.models.vae``), so known frames at the *end* of a clip are
group latents: the input's first ``1 + tf k`` frames are encoded and latents
``1 .. k`` become the clip's last ``k``; the input's frame 0 is only their
causal context, a role the generated frame before them takes over.

Inputs (images, videos) are paths read by ``vidiff.io`` or ``uint8`` arrays,
resized to the requested ``height`` x ``width`` by ``io.resize_frames`` either
way (a path gives what its decoded frames give); one input serves every prompt
and seed of a call. With a ``mesh``, weights are replicated and each batch is
split over its data axes (``vidiff.parallel``), as in training; a batch that
does not divide evenly is padded with repeats of its last clip, then cropped.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vidiff import io, parallel
from vidiff.checks import height_width
from vidiff.diffusion.flow import noise_latents, resolve_shift
from vidiff.diffusion.samplers import SAMPLE_DEFAULTS, check_guidance
from vidiff.diffusion.sampling import on_sampler_step, sample_latents, seeded_noise, text_context
from vidiff.models.dit import VideoDiT
from vidiff.models.export import BUNDLED
from vidiff.models.vae import VideoVAE, compiled, decode_chunked, encode_chunked, latent_count, pixel_count
from vidiff.models.vae import pixel_frames_of  # noqa: F401  (re-exported with the other frame arithmetic)
from vidiff.pipeline_inputs import (DEFAULT_BATCH_SIZE, Plan, ProgressBar, check_prompts, input_frames, known_plan,
                                    negative_prompts, positive_whole_number, sample_seeds, sampled_batch,
                                    warn_truncated, whole_number)
from vidiff.clip_rules import DIRECTIONS, ClipRules
from vidiff.pipeline_load import load_export


class TextToVideo:
    """A trained VAE + DiT + text encoder; call it with prompts to get ``uint8 (N, T, H, W, 3)`` clips."""

    def __init__(self, vae: VideoVAE, vae_variables, dit: VideoDiT, dit_params, text, config: dict,
                 directory: Path | None = None, mesh=None):
        self.vae, self.vae_variables, self.dit, self.dit_params = vae, vae_variables, dit, dit_params
        self.text, self.config, self.directory, self.mesh = text, config, directory, mesh
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):  # e.g. the CLI's "dp"
            raise ValueError(f"mesh={mesh!r} is not a jax.sharding.Mesh; build one with vidiff.parallel.make_mesh "
                             "(e.g. make_mesh(data=jax.device_count()))")
        if mesh is not None:
            self.vae_variables, self.dit_params = jax.device_put((vae_variables, dit_params), parallel.replicated(mesh))
        size = config["data"]["size"]
        self.train_size = height_width(size)
        self.train_frames = int(config["data"]["num_frames"])
        self.defaults = {**SAMPLE_DEFAULTS, **dict(config.get("sample", {}))}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, directory: str | Path | None = None, mesh=None, scan_blocks: bool | None = None,
                        dtype=None) -> "TextToVideo":
        """Load an exported model directory (``vidiff train`` writes ``<workdir>/export``); None = the bundled one.

        ``mesh`` (``vidiff.parallel.make_mesh``): sample data-parallel over its devices. ``scan_blocks``: the
        DiT's blocks scanned (True, compiles faster) or unrolled (False) however trained, the weights converted on
        load (``with_block_layout``). ``dtype``: the DiT's and VAE's compute dtype, "float32", "bfloat16" (a GPU's
        choice) or "float16" (or jnp's); the weights stay as loaded, the text encoder float32. None: as trained.
        """
        return cls(**load_export(model_directory(directory), scan_blocks, dtype), mesh=mesh)

    # ------------------------------------------------------------------ sizes
    @property
    def rules(self) -> ClipRules:
        """The clips this model makes and what each mode asks of its inputs (``vidiff generate`` checks a request
        with the same rules, read from ``vidiff.json``, before the model loads)."""
        return ClipRules.of(self.vae.config, self.dit.config, self.train_frames, self.train_size)

    @property
    def time_factor(self) -> int:
        return self.vae.config.time_factor

    @property
    def size_step(self) -> int:
        """Height and width must be multiples of this (VAE spatial factor x DiT patch)."""
        return self.rules.size_step

    def supported_sizes(self) -> str:
        """One line saying which clip sizes this model can make."""
        return self.rules.supported_sizes()

    def check_size(self, num_frames: int, height: int, width: int) -> None:
        """A one-line ``ValueError`` naming the sizes that work, unless the model can make this clip."""
        self.rules.check_size(num_frames, height, width)

    def _sizes(self, num_frames, height, width) -> tuple[int, int, int]:
        """The clip size asked for (None = the training size), each a whole number the model can make."""
        return self.rules.sizes(*_whole_numbers(num_frames=num_frames, height=height, width=width))

    # ------------------------------------------------------------------ modes
    def __call__(self, prompts: str | Sequence[str], *, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, **sampling) -> np.ndarray:
        """Text-to-video (``num_frames=1``: images). ``sampling`` as :meth:`generate`."""
        num_frames, height, width = self._sizes(num_frames, height, width)
        return self.generate(prompts, Plan(latent_count(num_frames, self.time_factor)), height, width, **sampling)

    def image_to_video(self, prompts, image, *, num_frames=None, height=None, width=None, **sampling) -> np.ndarray:
        """Animate ``image`` (path or ``uint8 (H, W, 3)``): it is latent frame 0, encoded alone as the VAE does."""
        num_frames, height, width = self._sizes(num_frames, height, width)
        L = self.rules.animated_latents(num_frames)
        latents = self.encode(self.load_frames(image, height, width, "image", first=1))
        return self.generate(prompts, known_plan(L, {0: latents[:, 0]}), height, width, **sampling)

    def extend(self, prompts, video, *, direction: str = "forward", context_frames: int | None = None,
               num_frames=None, height=None, width=None, **sampling) -> np.ndarray:
        """A ``num_frames`` clip continuing ``video`` (forward) or leading into it (backward).

        forward: the video's last ``context_frames = 1 + tf (k - 1)`` frames
        open the clip (its first k latents). backward: its frames
        ``1 .. context_frames = tf k`` close the clip (the last k latents; frame
        0 is their causal context). Default k: half the clip's latents, at
        least one, as many as the video has. The output includes the context,
        so it splices as ``video + clip[n:]`` (forward) or ``clip + video[n + 1:]``
        (backward: not ``clip + video``), ``n = context_frames``.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction={direction!r}; use one of {', '.join(DIRECTIONS)}")
        num_frames, height, width = self._sizes(num_frames, height, width)
        (context_frames,) = _whole_numbers(context_frames=context_frames)
        tf, L = self.time_factor, latent_count(num_frames, self.time_factor)
        frames = self.load_frames(video, height, width, "video", **self.rules.extend_reads(direction, num_frames))
        k = self.rules.extend_context(direction, num_frames, len(frames), context_frames)
        if direction == "forward":
            latents = self.encode(frames[len(frames) - pixel_count(k, tf):])
            known = {j: latents[:, j] for j in range(k)}
        else:
            latents = self.encode(frames[:pixel_count(k + 1, tf)])
            known = {L - k + j: latents[:, 1 + j] for j in range(k)}
        return self.generate(prompts, known_plan(L, known), height, width, **sampling)

    def connect(self, prompts, video_a, video_b, *, num_frames=None, height=None, width=None,
                **sampling) -> np.ndarray:
        """A ``num_frames`` transition: A's last frame opens it, B's frames ``1 .. tf`` close it.

        The frame before B's part takes the place of B's frame 0, so the clip
        runs from the end of A to the start of B (known first and last latents,
        as in training's first-and-last masks): ``A[:-1] + clip + B[1 + tf:]``.
        """
        num_frames, height, width = self._sizes(num_frames, height, width)
        tf, L = self.time_factor, self.rules.connect_latents(num_frames)
        a = self.load_frames(video_a, height, width, "video", last=1)
        b = self.load_frames(video_b, height, width, "video", first=1 + tf)
        self.rules.check_second_video(len(b))
        end_of_a, start_of_b = self.encode(a[-1:]), self.encode(b[:1 + tf])
        return self.generate(prompts, known_plan(L, {0: end_of_a[:, 0], L - 1: start_of_b[:, 1]}), height, width,
                             **sampling)

    def edit(self, prompts, video, *, strength: float = 0.6, num_frames=None, height=None, width=None,
             **sampling) -> np.ndarray:
        """SDEdit: noise the video's latents to time ``strength`` in (0, 1] and denoise under ``prompts``.

        ``strength`` near 0 keeps the video, 1 ignores it. The clip is the
        video's longest prefix the model can make (``1 + tf k`` frames, ``k + 1``
        divisible by the DiT's time patch), at most the training length, unless
        ``num_frames`` says otherwise.
        """
        strength = float(strength)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength} must be in (0, 1]: 0 keeps the video, 1 ignores it")
        # Every size given is checked before the video is read (None frames: the training length, a valid one).
        given, height, width = self._sizes(num_frames, height, width)
        frames = self.load_frames(video, height, width, "video", first=given)  # no clip is longer
        num_frames = self.rules.edit_frames(len(frames), given, asked=num_frames is not None)
        self.check_size(num_frames, height, width)
        clean = self.encode(frames[:num_frames])
        plan = Plan(clean.shape[1], clean=clean, t_start=strength)
        return self.generate(prompts, plan, height, width, **sampling)

    def loop(self, prompts, *, num_frames: int | None = None, height=None, width=None, **sampling) -> np.ndarray:
        """A clip of ``num_frames = tf m`` frames that plays seamlessly on repeat (frame ``tf m`` would be frame 0).

        Sampled as ``m + 2`` latents covering frames ``0 .. tf (m + 1)``: latent
        ``m + 1`` holds frames ``tf m + 1 .. tf m + tf``, which on a loop are
        frames ``1 .. tf``, i.e. latent 1. So latent ``m + 1`` is tied to the
        current clean estimate of latent 1 at every step and flagged as known:
        the model, trained to continue into known last frames, must make the
        clip's end lead into its own beginning. Both are group latents of the
        same frames (their causal context differs only before the loop's
        start), so the tie is within what the VAE can express. The last
        ``tf + 1`` decoded frames, the wrap-around, are dropped. A DiT with a
        time patch ``pt > 1`` needs ``m + 2`` divisible by ``pt``. Default: the
        longest such loop shorter than the training clip.
        """
        sizes = _whole_numbers(num_frames=num_frames, height=height, width=width)
        num_frames, height, width = self.rules.loop_sizes(*sizes)
        L = num_frames // self.time_factor + 2
        mask = (np.arange(L) == L - 1).astype(np.float32)
        plan = Plan(L, mask=mask, tie=((L - 1,), (1,)), keep_frames=num_frames)
        return self.generate(prompts, plan, height, width, **sampling)

    # ------------------------------------------------------------------ shared machinery
    def load_frames(self, source, height: int, width: int, what: str, *, first: int | None = None,
                    last: int | None = None) -> np.ndarray:
        """``uint8 (T, height, width, 3)`` from a path or an array (``first`` / ``last``: only that many frames
        from the start / the end, as :func:`~vidiff.pipeline_inputs.input_frames` reads them), resized by
        ``io.resize_frames`` whatever the source: a path gives the frames its decoded array gives."""
        frames = input_frames(source, what, first, last)
        source_size = frames.shape[1:3]
        if abs(math.log(source_size[1] / source_size[0] * height / width)) > 0.01:
            warnings.warn(f"the {what} is {source_size[0]}x{source_size[1]} (height x width) and is stretched to "
                          f"{height}x{width}; crop it to that aspect ratio first for undistorted frames", stacklevel=3)
        if source_size != (height, width):
            frames = io.resize_frames(frames, height, width)
        return frames

    def encode(self, frames: np.ndarray) -> jax.Array:
        """``uint8 (T, H, W, 3)`` with ``T = 1 + tf k`` -> normalised posterior-mean latents ``(1, 1 + k, h, w, c)``."""
        frames = io.check_frames(frames, "TextToVideo.encode")
        video = io.to_float(frames)[None]  # stays on the host: a long input goes to the device chunk by chunk
        if len(frames) > 4 * self.time_factor + 1:  # long inputs: chunks keep memory flat in time
            z = encode_chunked(self.vae, self.vae_variables, video, 4 * self.time_factor).mode()
            return compiled(self.vae, "normalize")(self.vae_variables, z)
        return compiled(self.vae, "encode_normalized")(self.vae_variables, video)

    def decode(self, latents, chunk_latent_frames: int = 8) -> np.ndarray:
        """Normalised latents ``(B, L, h, w, c)`` -> ``uint8 (B, 1 + tf (L - 1), H, W, 3)``; chunked for long clips."""
        if latents.shape[1] > chunk_latent_frames:
            z = compiled(self.vae, "denormalize")(self.vae_variables, latents)
            return io.to_uint8(decode_chunked(self.vae, self.vae_variables, z, chunk_latent_frames))
        return io.to_uint8(compiled(self.vae, "decode_normalized")(self.vae_variables, latents))

    def generate(self, prompts, plan: Plan, height: int, width: int, *, steps: int | None = None,
                 guidance: float | None = None, sampler: str | None = None, seed: int | Sequence[int] = 0,
                 num_per_prompt: int = 1, guidance_interval: tuple[float, float] = (0.0, 1.0),
                 negative_prompt: str | Sequence[str] | None = None, batch_size: int | None = None,
                 progress: bool = False, return_latents: bool = False,
                 on_batch: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray | None:
        """Sample ``plan`` for every prompt and seed: ``uint8 (len(prompts) * seeds, T, height, width, 3)``.

        ``seed``: an int (sample ``j`` of each prompt uses ``seed + j``, ``j < num_per_prompt``)
        or a list of seeds used for every prompt. Outputs are prompt-major; a
        (prompt, seed) pair gives the same clip whatever else is in the batch, up
        to rounding (other batch shapes run other kernels: at most 1/255 in a few values).
        ``negative_prompt`` (one string, or one per prompt): what guidance steers away from, read by its
        unconditional branch in place of the empty prompt (None, or ""); it needs ``guidance != 1``.
        ``batch_size`` caps clips per compiled call (None: ``DEFAULT_BATCH_SIZE``, 8, so a long list is
        sampled a batch at a time, never all at once; with a mesh, rounded up to a multiple of its
        data-parallel devices); prompts are encoded a batch at a time too. ``progress`` shows a tqdm bar;
        ``return_latents`` returns the normalised latents ``(N, L, h, w, c)`` undecoded.
        ``on_batch(first, clips)`` is called as each batch is done, with the index of its first clip and
        its clips (or latents); they are then not kept and None is returned, so a caller can write a long
        list as it goes (an error loses at most the batch it stopped in) without holding it in memory.
        """
        if isinstance(prompts, (bytes, bytearray)):  # a sequence of ints to Python: "prompt 1 is a int (97)"
            raise ValueError("prompts are bytes; decode them to a string first (prompts.decode())")
        if not isinstance(prompts, (str, Sequence, np.ndarray)):
            raise ValueError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = sample_seeds(seed, num_per_prompt)
        steps = whole_number(self.defaults["steps"] if steps is None else steps, "steps")
        guidance = float(self.defaults["guidance"] if guidance is None else guidance)
        sampler = self.defaults["sampler"] if sampler is None else sampler  # sample() checks the name
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else positive_whole_number(
            batch_size, "batch_size", f", or None for {DEFAULT_BATCH_SIZE} at a time")
        check_guidance(guidance, guidance_interval)
        negatives = negative_prompts(negative_prompt, prompts, guidance)
        check_prompts(prompts)
        warn_truncated(self.text, prompts)
        if negatives is not None:
            warn_truncated(self.text, negatives, "negative prompt")
        sf = self.vae.config.spatial_factor
        shape = (plan.latent_frames, height // sf, width // sf, self.vae.config.latent_channels)
        cases = [(p, s) for p in range(len(prompts)) for s in seeds]
        ways = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        batch = sampled_batch(batch_size, len(cases), ways)
        sample = dict(steps=steps, sampler=sampler, guidance=guidance, interval=tuple(guidance_interval),
                      shift=self._shift(shape), t_start=plan.t_start, tie=plan.tie, progress=progress)
        out = []
        with ProgressBar(progress, steps * math.ceil(len(cases) / batch)) as bar, on_sampler_step(bar):
            for start in range(0, len(cases), batch):
                chunk = cases[start:start + batch]
                chunk = chunk + [chunk[-1]] * (batch - len(chunk))  # pad: one compiled shape, dropped below
                # Each row's unconditional branch reads the empty prompt unless a negative prompt replaces it.
                uncond = [""] * batch if negatives is None else [negatives[p % len(negatives)] for p, _ in chunk]
                inputs = self._batch_inputs(plan, shape, [prompts[p] for p, _ in chunk], uncond, [s for _, s in chunk])
                z = sample_latents(self.dit, self.dit_params, *inputs, **sample)
                clips = (np.asarray(z) if return_latents else self.decode(z))[:len(cases) - start]
                clips = clips[:, :plan.keep_frames] if plan.keep_frames and not return_latents else clips
                if on_batch is None:
                    out.append(clips)
                else:
                    on_batch(start, clips)
        return None if on_batch is not None else np.concatenate(out)

    def _batch_inputs(self, plan: Plan, shape, prompts: list[str], uncond: list[str], seeds: list[int]):
        """One batch's contexts (its prompts, and what each row's unconditional branch reads) and starting latents,
        on the mesh if there is one. The encoder gives a prompt the same embedding in any batch."""
        context, uncond = text_context(self.text.encode(prompts)), text_context(self.text.encode(uncond))
        x_start = seeded_noise(jnp.asarray(seeds, jnp.uint32), shape)
        if plan.clean is not None:
            x_start = noise_latents(jnp.broadcast_to(plan.clean, x_start.shape), x_start, plan.t_start)
        if plan.mask is not None:
            known = plan.known if plan.known is not None else np.zeros((1, *shape), np.float32)
            context["cond_latents"] = jnp.broadcast_to(jnp.asarray(known), x_start.shape)
            context["cond_mask"] = jnp.broadcast_to(jnp.asarray(plan.mask), x_start.shape[:2])
        if self.mesh is not None:
            return self._shard((context, uncond, x_start))
        return context, uncond, x_start

    def _shard(self, tree):
        """Batch split over the mesh's data axes (``generate`` pads it to a multiple of them)."""
        return jax.tree.map(lambda a: jax.device_put(a, parallel.batch_sharding(self.mesh, a.ndim)), tree)

    def _shift(self, latent_shape) -> float:
        """The timestep shift training used, for this clip's token count when it is ``"auto"``."""
        return resolve_shift(self.config.get("flow", {}).get("shift", "auto"), latent_shape, self.dit.config.patch)


def model_directory(directory: str | Path | None) -> Path:
    """``directory`` as a path; None: the bundled model's, or a one-line error where it is not installed."""
    if directory is None:
        if not (BUNDLED / "vidiff.json").is_file():
            raise FileNotFoundError(f"the bundled model is not installed at {BUNDLED}; pass a model directory "
                                    "exported by `vidiff train` (--checkpoint DIR)")
        return BUNDLED
    return Path(directory)


def _whole_numbers(**values) -> list:
    """Each of ``values`` as an int (``whole_number``'s one line otherwise), None kept: the rules take plain ints."""
    return [None if value is None else whole_number(value, name) for name, value in values.items()]
