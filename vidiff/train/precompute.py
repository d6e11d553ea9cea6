"""``vidiff prepare``, plus ``--latents MODEL_DIR``: shards that carry VAE latents and text embeddings.

Without ``--latents`` this is ``vidiff.data.prepare`` unchanged. With it, the
clips are prepared as usual, then every record gains
``latents`` (the exported VAE's normalised posterior mean, ``(t, h, w, c)``),
``text_embedding`` ``(L, D)``, ``text_mask`` ``(L,)`` and ``text_pooled``
``(D',)`` from the text encoder named in the model's config, so DiT training
(``dit_train.latents = "prepared"``) runs neither network. It lives in
``vidiff.train`` because it needs the models, which ``vidiff.data`` may not import.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from vidiff.data import prepare as data_prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data_prepare.add_arguments(parser)
    parser.add_argument("--latents", metavar="MODEL_DIR", default=None,
                        help="also store VAE latents and text embeddings, from this exported model directory")


def latent_fields(model_dir):
    """``record -> {latents, text_embedding, text_mask, text_pooled}`` using the model in ``model_dir``."""
    from vidiff.models.text import text_encoder
    from vidiff.train.export import load_vae, read_manifest
    from vidiff.train.tasks import encode_latents, vae_from_config

    config = read_manifest(model_dir)["config"]
    vae = vae_from_config(_Attr(config))
    variables = load_vae(model_dir)
    text = text_encoder(config["text"]["encoder"], max_length=config["text"]["max_length"])

    def add(record: dict) -> dict:
        emb = text.encode([record["caption"]])
        latents = encode_latents(vae, variables, np.asarray(record["video"])[None])[0]
        return {"latents": np.asarray(latents, np.float32), "text_embedding": emb.tokens[0],
                "text_mask": emb.mask[0], "text_pooled": emb.pooled[0]}

    return add


class _Attr(dict):
    """Attribute access over the JSON config saved in a model directory."""

    def __getattr__(self, name):
        value = self[name]
        return _Attr(value) if isinstance(value, dict) else value


def run(args: argparse.Namespace) -> int:
    if args.latents is None:
        return data_prepare.run(args)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="vidiff-prepare-") as raw:
        summary = data_prepare.prepare_shards(
            args.videos, args.manifest, raw, size=args.size, frames=args.frames, fps=args.fps or None,
            stride=args.stride, window=args.window, shard_size=args.shard_size, frame_format="png",
            max_pixels=args.max_pixels, max_bad_fraction=args.max_bad_fraction, split=args.split,
            overwrite=True, threads=args.threads,
        )
        if out.exists() and args.overwrite:
            for old in out.glob(f"{args.split}-*.array_record"):
                old.unlink()
        written = data_prepare.augment_shards(raw, out, latent_fields(args.latents), split=args.split,
                                              frame_format=args.frame_format, quality=args.quality)
        for extra in Path(raw).glob("*.json"):
            shutil.copy(extra, out / extra.name)
    summary.update(latents_from=str(args.latents), shards=written)
    print(json.dumps(summary))
    return 0
