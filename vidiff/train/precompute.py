"""``vidiff prepare``, plus ``--latents MODEL_DIR``: shards that carry VAE latents and text embeddings.

Without ``--latents`` this is ``vidiff.data.prepare`` unchanged. With it, the
clips are prepared as usual, then every record gains
``latents`` (the exported VAE's normalised posterior mean, ``(t, h, w, c)``),
``text_embedding`` ``(L, D)``, ``text_mask`` ``(L,)`` and ``text_pooled``
``(D',)`` from the text encoder named in the model's config, so DiT training
(``dit_train.latents = "prepared"``) runs neither network. It lives in
``vidiff.train`` because it needs the models, which ``vidiff.data`` may not import.

Every flag, ``--out`` (and its ``--overwrite`` guard), the model directory and
whether its VAE can encode ``--frames`` x ``--size`` are checked before any
clip is decoded. Shards are staged in a hidden folder inside ``--out`` and
moved in only when every record has its latents; a failed run leaves ``--out``
as it was. The summary (printed, and saved as ``{split}-summary.json``) adds
``latents_from`` (the model directory) and ``vae_fingerprint``
(``vidiff.train.latent_cache.vae_fingerprint`` of its VAE), so the latents'
origin can be checked later.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vidiff.data import prepare as data_prepare
from vidiff.data import sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data_prepare.add_arguments(parser)
    parser.add_argument("--latents", metavar="MODEL_DIR", default=None,
                        help="also store VAE latents and text embeddings, from this exported model directory")


def load_vae_model(model_dir):
    """``(vae, variables, config)`` of the exported VAE in ``model_dir``, with one-line errors naming ``--latents``."""
    from vidiff.models.export import MANIFEST, load_vae, model_config, read_manifest
    from vidiff.models.vae import VideoVAE

    directory = Path(model_dir)
    fix = "give the export directory of a trained VAE (`vidiff train --model vae` writes <workdir>/export)"
    if not directory.is_dir():
        raise ValueError(f"--latents {directory} does not exist; {fix}")
    for name in (MANIFEST, "vae.safetensors"):
        if not (directory / name).is_file():
            raise ValueError(f"--latents {directory} has no {name}; {fix}")
    manifest = read_manifest(directory)
    # The VAE as the export records it, as DiT training builds it (its fields win over a preset edited since).
    return VideoVAE(model_config(directory, manifest, "vae")), load_vae(directory), _Attr(manifest["config"])


def check_clip_fits(vae, model_dir, frames: int, height: int, width: int) -> None:
    """A one-line error unless the VAE encodes ``frames`` x ``height`` x ``width`` clips (1 + k*tf frames, sides / sf)."""
    tf, sf = vae.config.time_factor, vae.config.spatial_factor
    if (frames - 1) % tf:
        good = 1 + max(round((frames - 1) / tf), 1) * tf
        raise ValueError(f"--frames {frames} does not fit the VAE in --latents {model_dir}: it encodes 1 + k*{tf} "
                         f"frames; use e.g. --frames {good}")
    if height % sf or width % sf:
        good = "x".join(str(max(round(side / sf), 1) * sf) for side in (height, width))
        raise ValueError(f"--size {height}x{width} does not fit the VAE in --latents {model_dir}: height and width "
                         f"must be divisible by {sf}; use e.g. --size {good}")


def latent_fields(model_dir, model=None):
    """``record -> {latents, text_embedding, text_mask, text_pooled}`` using the model in ``model_dir``.

    ``model``: ``load_vae_model(model_dir)`` when already loaded.
    """
    from vidiff.models.text import text_encoder
    from vidiff.train.dit_loss import encode_latents

    vae, variables, config = load_vae_model(model_dir) if model is None else model
    text = text_encoder(config["text"]["encoder"], max_length=config["text"]["max_length"],
                        batch_size=config["text"].get("batch_size", 1))

    def add(record: dict) -> dict:
        emb = text.encode([record["caption"]])
        latents = encode_latents(vae, variables, np.asarray(record["video"])[None])[0]
        return {"latents": np.asarray(latents, np.float32), "text_embedding": emb.tokens[0],
                "text_mask": emb.mask[0], "text_pooled": emb.pooled[0]}

    add.text = text  # its count of captions cut to max_length goes into the summary
    return add


class _Attr(dict):
    """Attribute access over the JSON config saved in a model directory."""

    def __getattr__(self, name):
        value = self[name]
        return _Attr(value) if isinstance(value, dict) else value


def run(args: argparse.Namespace) -> int:
    if args.latents is None:
        return data_prepare.run(args)
    from vidiff.train.latent_cache import vae_fingerprint

    started = time.perf_counter()
    out, split = Path(args.out), args.split
    # Everything a user can get wrong is checked before the first clip is decoded.
    height, width = data_prepare.check_options(
        size=args.size, frames=args.frames, fps=args.fps or None, stride=args.stride, window=args.window,
        shard_size=args.shard_size, frame_format=args.frame_format, quality=args.quality,
        max_pixels=args.max_pixels, max_bad_fraction=args.max_bad_fraction, threads=args.threads, split=split)
    data_prepare.check_out(out, split, args.overwrite)
    sources.read_manifest(args.manifest, args.videos, None, field="--manifest", video_dir_field="--videos")  # exists, has rows
    model = load_vae_model(args.latents)
    check_clip_fits(model[0], args.latents, args.frames, height, width)
    fingerprint = vae_fingerprint(model[1], model[0].config)
    add = latent_fields(args.latents, model)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        # Staged next to the final shards (same file system: moving them in is a rename).
        with tempfile.TemporaryDirectory(prefix=f".{split}-latents-", dir=out) as staging:
            summary = data_prepare.prepare_shards(
                args.videos, args.manifest, staging, size=args.size, frames=args.frames, fps=args.fps or None,
                stride=args.stride, window=args.window, shard_size=args.shard_size, frame_format=args.frame_format,
                quality=args.quality, max_pixels=args.max_pixels, max_bad_fraction=args.max_bad_fraction,
                split=split, threads=args.threads, add_fields=add,
            )
            summary.update(out=str(out), latents_from=str(args.latents), vae_fingerprint=fingerprint,
                           captions_truncated=add.text.captions_truncated,
                           seconds=round(time.perf_counter() - started, 3))
            # Every record has its latents: only now do the old shards (--overwrite) make way. The summary,
            # whose VAE fingerprint training checks, moves in last: never beside shards it does not describe.
            data_prepare.move_in(Path(staging), out, split, summary["shards"], summary)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    print(json.dumps(summary))
    return 0
