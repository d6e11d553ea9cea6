"""An exported model directory read into the parts ``vidiff.pipeline.TextToVideo`` holds.

``vidiff train`` writes ``<workdir>/export`` (``vidiff.models.export``: safetensors + ``vidiff.json``); this
builds the VAE, the DiT and the text encoder its config names and loads their weights. What does not fit
(no DiT, config fields missing, weights of another shape, a DiT trained on another VAE) is one line naming
the directory and the fix, before anything samples.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from vidiff.models.block_layout import with_block_layout
from vidiff.models.dit import VideoDiT, dit_preset
from vidiff.models.export import MANIFEST, check_dit_vae, load_dit, load_vae, read_manifest, variable_shapes
from vidiff.models.vae import VideoVAE, vae_preset

REQUIRED_FIELDS = (("text", "encoder"), ("text", "max_length"), ("vae", "preset"), ("dit", "preset"), ("data", "size"),
                   ("data", "num_frames"))


def load_export(directory: Path, scan_blocks: bool | None = None) -> dict:
    """``TextToVideo``'s arguments but the mesh: the models, their weights, the text encoder, the config, ``directory``.

    ``scan_blocks`` as :meth:`vidiff.pipeline.TextToVideo.from_checkpoint`.
    """
    _check_not_workdir(directory)
    manifest = read_manifest(directory)
    if not manifest.get("dit") or not (directory / "dit.safetensors").is_file():
        raise ValueError(f"{directory} holds no trained DiT (dit.safetensors); train one with "
                         "`vidiff train --config ... --model dit`")
    config = manifest.get("config") or {}
    if missing := [f for f in REQUIRED_FIELDS if f[1] not in (config.get(f[0]) or {})]:
        raise ValueError(f"{directory}/vidiff.json lacks config field(s) {', '.join('.'.join(f) for f in missing)}; "
                         "re-export the model with vidiff train")
    # The batch training encoded captions in: a caption's embedding never depends on what was encoded with it,
    # up to the rounding of another batch shape (1e-6), which this avoids.
    text = _text_encoder(config["text"]["encoder"], config["text"]["max_length"],
                         int(config["text"].get("batch_size") or 1))
    vae = VideoVAE(vae_preset(config["vae"]["preset"], **config["vae"].get("overrides", {})))
    overrides = dict(config["dit"].get("overrides", {}))
    if overrides.get("attention_impl") == "cudnn" and jax.default_backend() != "gpu":
        overrides["attention_impl"] = None  # how the DiT computes, not what it holds: auto where no cuDNN is
    dit = VideoDiT(dit_preset(config["dit"]["preset"], **{
        "text_dim": text.dim, "pooled_dim": text.pooled_dim, "latent_channels": vae.config.latent_channels,
        **overrides, **({} if scan_blocks is None else {"scan_blocks": scan_blocks})}))
    vae_variables = _fitting(load_vae(directory), vae, directory / "vae.safetensors")
    check_dit_vae(directory, manifest)  # a DiT trained on another VAE's latents makes noise
    dit_params = with_block_layout(load_dit(directory), dit.config)
    dit_params = _fitting({"params": dit_params}, dit, directory / "dit.safetensors")["params"]
    return dict(vae=vae, vae_variables=vae_variables, dit=dit, dit_params=dit_params, text=text, config=config,
                directory=directory)


def _check_not_workdir(directory: Path) -> None:
    """A ``vidiff train`` workdir holds its export in ``export/``: point there, rather than say no model is here."""
    if not (directory / MANIFEST).is_file() and (directory / "export" / MANIFEST).is_file():
        raise ValueError(f"{directory} is a training workdir, not a model directory; pass its export: "
                         f"--checkpoint {directory / 'export'}")


@functools.lru_cache(maxsize=4)
def _text_encoder(name: str, max_length: int, batch_size: int):
    """Frozen encoders are shared between pipelines (reloading a checkpoint does not reload MiniLM)."""
    from vidiff.models.text import text_encoder

    return text_encoder(name, max_length=max_length, batch_size=batch_size)


def _fitting(loaded: dict, module, path: Path) -> dict:
    """``loaded`` if it has the shapes ``module`` initialises, else a one-line error (e.g. an older export)."""
    if jax.tree.map(np.shape, loaded) != variable_shapes(module):
        raise ValueError(f"{path} does not fit the model its vidiff.json describes (exported by another vidiff "
                         "version?); re-export it with `vidiff train`")
    return loaded
