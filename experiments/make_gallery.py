"""Render the README gallery: one gif and one png frame strip per prompt, and the markdown that shows them.

    python experiments/make_gallery.py                                  # bundled model -> docs/gallery/
    python experiments/make_gallery.py --checkpoint workdir/world_tiny/export --out /tmp/gallery

The prompts are fixed (:data:`PROMPTS`): two combinations seen in training,
every held-out combination of ``vidiff.data.world.HELD_OUT`` in training
wording, and two of them in paraphrases no training caption uses
(``vidiff.eval.adherence.paraphrase``). Each clip is scored from its pixels
(``vidiff.data.world.score``) and the markdown table printed at the end, ready
to paste into the README, says what the scorer read. Files are
``<out>/<nn>_<slug>.gif`` and ``<out>/<nn>_<slug>.png``, frames upscaled
``--scale`` times (nearest neighbour) so 32-pixel clips are visible on a page.
Same model, seed and flags, the same clips up to floating-point rounding, not
always the same bytes: a later rerun on the project's CPU wrote 15 of the 20
files of the committed docs/gallery differently (the png strips by at most one
level of 255, in about 0.01% of their pixels), with every verdict the same.

Runtime: 24 s on the project's 2-core CPU for the bundled world_tiny model
(10 clips of 17 x 32 x 32, 20 Euler steps; 25 s of CPU time, most of it
compiling).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from measure import one_line_errors  # (experiments/ is the script's own folder)
from vidiff import io
from vidiff.data import world
from vidiff.diffusion.samplers import SAMPLERS
from vidiff.eval import adherence

SEEN = (("red", "circle", "right"), ("green", "triangle", "up"))
ATTRIBUTES = ("color", "shape", "direction")


def gallery_prompts() -> list[tuple[str, str, tuple[str, str, str]]]:
    """(prompt, kind, (colour, shape, direction)) for every gallery clip, in order."""
    rows = [(p, "seen in training", c) for p, c in zip(world.prompts_for(SEEN), SEEN)]
    rows += [(p, "held out", c) for p, c in zip(world.prompts_for(world.HELD_OUT), world.HELD_OUT)]
    rows += [(adherence.paraphrase(c, k), "held out, paraphrased", c) for k, c in enumerate(world.HELD_OUT[:2])]
    return rows


PROMPTS = gallery_prompts()


def slug(text: str) -> str:
    """A file-name-safe version of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """``(T, H, W, 3)`` -> ``(T, H*scale, W*scale, 3)``, nearest neighbour (keeps pixels crisp)."""
    return frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames


def verdict(clip: np.ndarray, combo) -> str:
    """What the pixel scorer read, e.g. ``colour ✓ shape ✓ direction ✗``."""
    result = world.score(clip, dict(zip(ATTRIBUTES, combo)))
    return " ".join(f"{'colour' if k == 'color' else k} {'✓' if result[k] else '✗'}" for k in ATTRIBUTES)


def markdown(rows: list[dict], link_prefix: str) -> str:
    """A README table: prompt, kind, the gif, the frame strip and the scorer's verdict."""
    prefix = link_prefix.rstrip("/") + "/" if link_prefix else ""
    lines = ["| prompt | | clip | frames | scored from the pixels |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['kind']} | ![{r['prompt']}]({prefix}{r['gif'].name}) "
                     f"| ![{r['prompt']}, frame by frame]({prefix}{r['png'].name}) | {r['verdict']} |")
    return "\n".join(lines)


def render(pipe, out: Path, *, seed: int = 0, scale: int = 4, fps: float = 8.0, **sampling) -> list[dict]:
    """Generate every gallery clip with ``pipe`` and write its gif and png strip into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p for p, _, _ in PROMPTS]
    clips = pipe(prompts, seed=seed, **sampling)
    rows = []
    for i, ((prompt, kind, combo), clip) in enumerate(zip(PROMPTS, clips)):
        name = f"{i:02d}_{slug(prompt)}"
        big = upscale(clip, scale)
        gif = io.write_video(out / f"{name}.gif", big, fps)
        png = io.write_image(out / f"{name}.png", io.frame_grid(big, columns=len(big)))
        rows.append({"prompt": prompt, "kind": kind, "gif": gif, "png": png, "verdict": verdict(clip, combo)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="model directory exported by `vidiff train` (default: the bundled model)")
    parser.add_argument("--out", default="docs/gallery", help="output folder (default docs/gallery)")
    parser.add_argument("--link-prefix", help="path of --out as the README links it (default: --out as given)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every clip")
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the frames")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate of the gifs")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's sample.steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="ODE solver (default: the model's)")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error(f"--scale={args.scale} must be at least 1")

    from vidiff.pipeline import TextToVideo

    sampling = {k: v for k, v in dict(steps=args.steps, guidance=args.guidance, sampler=args.sampler).items()
                if v is not None}
    with one_line_errors("make_gallery.py"):  # a checkpoint that is none, an --out that cannot be written
        pipe = TextToVideo.from_checkpoint(args.checkpoint)
        rows = render(pipe, Path(args.out), seed=args.seed, scale=args.scale, fps=args.fps, **sampling)
    for r in rows:
        print(f"wrote {r['gif']} and {r['png']}", file=sys.stderr)
    settings = {**{k: pipe.defaults[k] for k in ("steps", "guidance", "sampler")}, **sampling}
    print(f"<!-- experiments/make_gallery.py: {args.checkpoint or 'the bundled model'}, seed {args.seed}, "
          + ", ".join(f"{k} {v}" for k, v in settings.items()) + " -->")
    print(markdown(rows, args.out if args.link_prefix is None else args.link_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
