"""The model shipped inside the package: small, documented, the default of `vidiff generate`, and it works."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vidiff import io
from vidiff.data import world
from vidiff.pipeline import BUNDLED

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (BUNDLED / "vidiff.json").is_file(), reason="no bundled model installed")


def test_bundle_is_small_and_records_how_it_was_made():
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir()}
    assert {"vae.safetensors", "dit.safetensors", "vidiff.json", "metrics.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    metrics = json.loads((BUNDLED / "metrics.json").read_text())
    # The shipped bundle was made when the config lived in experiments/configs/; a new one names it world_tiny.
    assert all(c.split()[:4] in (["vidiff", "train", "--config", "world_tiny"],
                                 ["vidiff", "train", "--config", "experiments/configs/world_tiny.py"])
               for c in metrics["commands"])
    assert metrics["vae"]["val_psnr"] >= 30.0
    for prompts in ("heldout", "paraphrase"):
        accuracy = metrics["adherence"][prompts]["accuracy"]
        assert set(accuracy) == {"color", "shape", "direction", "all"}
        assert metrics["adherence"][prompts]["num_clips"] >= 24
        assert accuracy["all"] >= 0.9  # recorded: heldout 1.0, paraphrase 23/24


def test_generate_uses_the_bundled_model_by_default(tmp_path):
    out = tmp_path / "demo.mp4"
    done = subprocess.run([sys.executable, "-m", "vidiff.cli", "generate", "a red circle moving left", "--out",
                           str(out), "--quiet", "--steps", "8"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    frames, _ = io.read_video(out)
    assert frames.shape == (17, 32, 32, 3)


def test_bundled_model_draws_the_prompted_colours():
    from vidiff.pipeline import TextToVideo

    pipe = TextToVideo.from_checkpoint()
    combos = [("red", "circle", "right"), ("blue", "square", "left"), ("yellow", "triangle", "up")]
    clips = pipe(world.prompts_for(combos), seed=0, steps=12)
    assert clips.shape == (3, 17, 32, 32, 3) and clips.dtype == np.uint8
    colours = [world.score(clip, dict(zip(("color", "shape", "direction"), combo)))["predicted"]["color"]
               for clip, combo in zip(clips, combos)]
    assert colours == ["red", "blue", "yellow"]


def test_bundled_model_moves_objects_the_way_the_prompt_says():
    # Opposite direction words must give opposite motion: the (1, 4, 4)-patch model this replaced drew
    # the same clip for "moving left" and "moving right".
    from vidiff.pipeline import TextToVideo

    pipe = TextToVideo.from_checkpoint()
    combos = [("red", "circle", "right"), ("red", "circle", "left"), ("blue", "triangle", "up"),
              ("blue", "triangle", "down")]
    clips = pipe(world.prompts_for(combos), seed=0, steps=12)
    directions = [world.score(clip, dict(zip(("color", "shape", "direction"), combo)))["predicted"]["direction"]
                  for clip, combo in zip(clips, combos)]
    assert directions == ["right", "left", "up", "down"]


def test_bundled_model_passes_the_dit_vae_check():
    """Exported before vidiff recorded the DiT's VAE: its manifest has no hash and it loads unchecked; the same
    bundle with its VAE's hash recorded passes, and with any other hash is refused in one line."""
    from vidiff.models.export import DIT_VAE, check_dit_vae, file_sha256, read_manifest

    manifest = read_manifest(BUNDLED)
    assert DIT_VAE not in manifest  # the legacy path: nothing recorded, nothing to check
    check_dit_vae(BUNDLED, manifest)
    vae_hash = file_sha256(BUNDLED / "vae.safetensors")
    assert re.fullmatch(r"[0-9a-f]{64}", vae_hash) and vae_hash != file_sha256(BUNDLED / "dit.safetensors")
    check_dit_vae(BUNDLED, {**manifest, DIT_VAE: vae_hash})
    wrong = f"{int(vae_hash[0], 16) ^ 1:x}" + vae_hash[1:]
    with pytest.raises(ValueError) as refused:
        check_dit_vae(BUNDLED, {**manifest, DIT_VAE: wrong})
    assert str(refused.value) == (
        f"{BUNDLED}: its DiT (dit.safetensors) was trained with another VAE than its vae.safetensors; train the DiT "
        "again: delete its run (<workdir>/dit), then `vidiff train --config ... --model dit`, or restore the VAE it "
        "was trained with")


def test_bundled_model_is_built_from_its_recorded_fields(monkeypatch):
    """Its vidiff.json records every field of its VAE's and DiT's configs, the same ones its presets and overrides
    gave when it was exported (so it computes bit for bit as before), and a preset edited since changes nothing."""
    from vidiff.models import dit as dit_module
    from vidiff.models.export import MODELS, model_config, read_manifest
    from vidiff.pipeline_load import load_export

    manifest = read_manifest(BUNDLED)
    legacy = {k: v for k, v in manifest.items() if k != MODELS}
    vae = model_config(BUNDLED, legacy, "vae")
    given = dict(text_dim=384, pooled_dim=384, latent_channels=vae.latent_channels)  # MiniLM's widths
    assert model_config(BUNDLED, manifest, "vae") == vae
    assert model_config(BUNDLED, manifest, "dit") == model_config(BUNDLED, legacy, "dit", given=given)
    monkeypatch.setitem(dit_module.DIT_PRESETS, "tiny", dict(dit_module.DIT_PRESETS["tiny"], rope_theta=100.0))
    assert model_config(BUNDLED, legacy, "dit", given=given).rope_theta == 100.0  # what the preset alone now gives
    assert load_export(BUNDLED)["dit"].config.rope_theta == 10000.0
