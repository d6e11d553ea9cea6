"""Evidence for the prompting modes on the captioned world, measured against the world's own clips.

For each of ``num_clips`` world clips (training length and size, a seed the
training data does not use) ``evaluate_modes`` runs every mode and measures:

- ``image_to_video``: PSNR of the first generated frame against the input
  frame and against the VAE's own reconstruction of it (the ceiling), and
  whether the world scorer finds the caption in the clip.
- ``extend_forward``: the clip's first ``k`` latents are the clip's start;
  the scorer judges only the *generated* frames (same object, same direction).
- ``extend_backward``: the same with the clip's end given.
- ``connect``: A = the clip's first frame, B = its last ``1 + tf`` frames;
  PSNR of the output's first and last frames against them, and the scorer on
  the whole transition.
- ``edit``: SDEdit at ``strength`` with another colour in the prompt: the
  colour should change, the shape and the direction should stay.
- ``loop``: the seam, mean |last frame - first frame| over the mean
  difference of consecutive frames (1 = the wrap is an ordinary step).

Returns a JSON-able dict of means plus per-clip rows, with the seeds it drew from (``seed``: the
sampler's noise; ``world_seed``: the world clips').
"""
from __future__ import annotations

import numpy as np

from vidiff.data import world, world_score
from vidiff.models.vae import latent_count, pixel_count


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two ``uint8`` arrays, over all of them (100 for identical ones).

    Not ``vidiff.train.metrics.psnr`` (per sample, in [-1, 1], on the device): that one floors the error
    at 1e-10, so identical clips read 106 dB, and in float32.
    """
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def world_clips(pipe, num_clips: int, seed: int = 777) -> list[dict]:
    """Clips of the captioned world at the model's training length and size (all combinations allowed)."""
    height, width = pipe.train_size
    if height != width:
        raise ValueError(f"the captioned world is square; this model trained on {height}x{width}")
    config = world.WorldConfig(num_frames=pipe.train_frames, size=height, held_out="include", seed=seed)
    source = world.CaptionedWorld(config)
    return [source[i] for i in range(num_clips)]


def _verdict(clip, labels) -> dict:
    v = world_score.score(clip, labels)
    return {k: v[k] for k in ("color", "shape", "direction", "all")} | {"predicted_color": v["predicted"]["color"]}


def evaluate_modes(pipe, *, num_clips: int = 4, seed: int = 0, strength: float = 0.7, world_seed: int = 777,
                   **sampling) -> dict:
    """Run every mode on ``num_clips`` world clips; ``sampling`` (steps, guidance, sampler) goes to the pipeline."""
    tf = pipe.time_factor
    L = latent_count(pipe.train_frames, tf)
    k = max(1, L // 2)
    sampling = {"seed": seed, **sampling}
    rows = []
    for record in world_clips(pipe, num_clips, world_seed):
        video, labels, prompt = record["video"], record["labels"], world.prompts_for(
            [(record["labels"]["color"], record["labels"]["shape"], record["labels"]["direction"])])[0]
        row = {"prompt": prompt}

        clip = pipe.image_to_video([prompt], video[0], **sampling)[0]
        recon = pipe.decode(pipe.encode(video[:1]))[0, 0]
        row["image_to_video"] = {"first_frame_psnr": psnr_uint8(clip[0], video[0]),
                                 "vae_ceiling_psnr": psnr_uint8(recon, video[0]), **_verdict(clip, labels)}

        context = pixel_count(k, tf)
        clip = pipe.extend([prompt], video[:context], direction="forward", context_frames=context, **sampling)[0]
        row["extend_forward"] = {"context_psnr": psnr_uint8(clip[:context], video[:context]),
                                 **_verdict(clip[context:], labels)}

        context = tf * k  # the clip's last tf k frames, with the frame before them as causal context
        clip = pipe.extend([prompt], video[len(video) - context - 1:], direction="backward",
                           context_frames=context, **sampling)[0]
        row["extend_backward"] = {"context_psnr": psnr_uint8(clip[-context:], video[-context:]),
                                  **_verdict(clip[:-context], labels)}

        clip = pipe.connect([prompt], video[:1], video[len(video) - 1 - tf:], **sampling)[0]
        row["connect"] = {"first_frame_psnr": psnr_uint8(clip[0], video[0]),
                          "last_frame_psnr": psnr_uint8(clip[-1], video[-1]),
                          **_verdict(clip, labels)}

        new_colour = _other_colour(labels["color"])
        edit_prompt = world.prompts_for([(new_colour, labels["shape"], labels["direction"])])[0]
        clip = pipe.edit([edit_prompt], video, strength=strength, **sampling)[0]
        verdict = _verdict(clip, {**labels, "color": new_colour})
        row["edit"] = {"prompt": edit_prompt, "colour_changed": bool(verdict["color"]),
                       "shape_kept": bool(verdict["shape"]), "direction_kept": bool(verdict["direction"])}

        clip = pipe.loop([prompt], **sampling)[0]
        row["loop"] = {"seam_ratio": seam_ratio(clip)}
        rows.append(row)
    return {"num_clips": len(rows), "strength": strength, "seed": seed, "world_seed": world_seed,
            "means": _means(rows), "clips": rows}


def seam_ratio(clip: np.ndarray) -> float:
    """Mean |first - last| over the mean |frame t+1 - frame t|: about 1 when the loop's wrap looks like any step."""
    frames = np.asarray(clip, np.float64)
    steps = np.mean(np.abs(np.diff(frames, axis=0)))
    return float(np.mean(np.abs(frames[0] - frames[-1])) / max(steps, 1e-6))


def _other_colour(colour: str) -> str:
    names = list(world.COLORS)
    return names[(names.index(colour) + 1) % len(names)]


def _means(rows: list[dict]) -> dict:
    """Mean of every numeric or boolean entry per mode (booleans become rates; None is skipped)."""
    out = {}
    for mode in ("image_to_video", "extend_forward", "extend_backward", "connect", "edit", "loop"):
        keys = [key for key, v in rows[0][mode].items() if isinstance(v, (bool, int, float)) or v is None]
        out[mode] = {}
        for key in keys:
            values = [float(r[mode][key]) for r in rows if r[mode][key] is not None]
            out[mode][key] = float(np.mean(values)) if values else None
    return out
