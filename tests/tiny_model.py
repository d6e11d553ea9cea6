"""A throwaway exported model for pipeline / CLI / evaluation tests: random weights, no training, no compile.

Parameters come from ``jax.eval_shape`` of the real modules filled with
fan-in-scaled Gaussians (the DiT's zero-initialised output layers included, so
its velocity depends on text and known frames), then exported exactly as
``vidiff train`` exports: ``vae.safetensors``, ``dit.safetensors``, ``vidiff.json``.
"""
import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

REPO = Path(__file__).resolve().parents[1]
# 9-frame 16x16 clips: 3 x 4 x 4 latents, 12 DiT tokens (room for every mode); 8-token captions.
# The VAE is pinned to 4x time compression and the DiT to the tiny preset's size, whatever
# world_tiny's current recipe is, so the frame arithmetic under test stays the causal 1 + 4k.
OVERRIDES = ["--config.data.num_frames=9", "--config.data.size=16", "--config.text.max_length=8",
             "--config.sample.steps=2", "--config.vae.overrides.base_channels=16",
             "--config.vae.overrides.temporal_down=(True,True)", "--config.vae.overrides.time_kernels=(3,3,3)",
             "--config.dit.overrides.depth=2", "--config.dit.overrides.width=64",
             "--config.dit.overrides.patch=(1,2,2)"]


def _fill(tree, seed: int):
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if len(s.shape) <= 1:  # norm scales and latent_stats scale 1; biases and latent shift 0
            return np.full(s.shape, 1.0 if name.endswith("['scale']") else 0.0, np.float32)
        return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def make_tiny_model(directory, seed: int = 0) -> Path:
    """Write a tiny random world_tiny-shaped model to ``directory`` and return it."""
    from vidiff.models.dit import VideoDiT, dit_preset, dummy_inputs
    from vidiff.train import config as config_lib
    from vidiff.models.export import export_dit, export_vae
    from vidiff.train.tasks import vae_from_config

    config = config_lib.load_config(REPO / "vidiff" / "configs" / "world_tiny.py", OVERRIDES)
    config_json = json.loads(config.to_json())
    vae = vae_from_config(config)
    vae_shapes = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3))))
    export_vae(directory, config_json, _fill(vae_shapes, seed), vae_config=vae.config)
    # MiniLM's token and pooled widths: the pipeline builds its DiT from the loaded encoder's.
    dit = VideoDiT(dit_preset(config.dit.preset, text_dim=384, pooled_dim=384,
                              latent_channels=vae.config.latent_channels, **config.dit.overrides))
    dit_shapes = nn.unbox(jax.eval_shape(dit.init, jax.random.key(0), *dummy_inputs(dit.config)))["params"]
    export_dit(directory, config_json, _fill(dit_shapes, seed + 1), dit_config=dit.config, vae_config=vae.config)
    return Path(directory)


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """One tiny model per test process (shared by every test module that asks)."""
    root = Path(tempfile.mkdtemp(prefix="vidiff-tiny-model-"))
    atexit.register(shutil.rmtree, root, True)
    return make_tiny_model(root / "model")


@functools.lru_cache(maxsize=None)
def tiny_pipeline():
    """The ``TextToVideo`` of :func:`tiny_model_dir`, loaded once per process."""
    from vidiff.pipeline import TextToVideo

    return TextToVideo.from_checkpoint(tiny_model_dir())
