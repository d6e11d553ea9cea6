"""``vidiff eval adherence | modes``: score a model on the captioned world; print a table and JSON, write JSON.

    vidiff eval adherence                              # bundled model, held-out combinations x 4 seeds
    vidiff eval adherence --prompts paraphrase --seeds 8 --out adherence.json
    vidiff eval adherence --devices all --batch-size 64   # each seed's prompts split over this machine's devices
    vidiff eval modes --clips 8 --out modes.json       # image-to-video, extend, connect, edit, loop
"""
from __future__ import annotations

import argparse
import json
import sys

from vidiff.diffusion.samplers import SAMPLERS
from vidiff.eval import adherence
from vidiff.cli_flags import (add_choice_flag, add_devices_flag, add_dtype_flag, add_scan_blocks_flag, check_choice,
                              check_sampling_flags, check_writable, one_line_warnings, sampling_devices,
                              settings_in_force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vidiff eval`` and its evaluations."""
    sub = parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    adh = sub.add_parser("adherence", help="colour / shape / direction accuracy of generated clips",
                         description="Generate clips for (colour, shape, direction) prompts and score them.")
    add_choice_flag(adh, "--prompts", adherence.PROMPT_SETS, default="heldout",
                    help="held-out combinations in training wording, or in unseen paraphrases")
    adh.add_argument("--seeds", type=int, default=4, help="clips per combination (seeds 0 .. n-1)")
    adh.add_argument("--batch-size", type=int, help="clips per compiled sampling call (default: 8, TextToVideo's; "
                     "with --devices N, rounded up to a multiple of N)")
    add_devices_flag(adh)
    # No --devices: each call samples one clip from its own input, which more devices would only repeat.
    modes = sub.add_parser("modes", help="image-to-video, extend, connect, edit and loop on world clips",
                           description="Measure every prompting mode against clips of the captioned world "
                                       "(one clip per sampling call, so on one device).")
    modes.add_argument("--clips", type=int, default=4, help="world clips to run every mode on")
    modes.add_argument("--strength", type=float, default=0.7, help="SDEdit strength in (0, 1]")
    for p in (adh, modes):
        p.add_argument("--checkpoint", help="model directory (default: the bundled model)")
        p.add_argument("--steps", type=int, help="sampler steps (default: the model's sample.steps)")
        p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
        add_choice_flag(p, "--sampler", SAMPLERS, help="ODE solver")
        p.add_argument("--out", help="write the JSON summary here")
        add_scan_blocks_flag(p)
        add_dtype_flag(p)


def check_flags(args: argparse.Namespace) -> None:
    """Every flag's one-line ``ValueError``, naming that flag alone, before the model loads."""
    check_sampling_flags(args)
    check_choice("sampler", args.sampler, SAMPLERS)
    if args.evaluation == "adherence":
        check_choice("prompts", args.prompts, adherence.PROMPT_SETS)
        if args.seeds < 1:
            raise ValueError(f"--seeds={args.seeds} must be at least 1")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be at least 1 (omit it for 8 at a time)")
    else:
        if args.clips < 1:
            raise ValueError(f"--clips={args.clips} must be at least 1")
        if not 0.0 < args.strength <= 1.0:  # NaN fails this too
            raise ValueError(f"--strength={args.strength} must be in (0, 1]")


def run(args: argparse.Namespace) -> int:
    """Run the chosen evaluation, print its table (adherence) and JSON summary, write ``--out``."""
    check_flags(args)
    if args.out:
        check_writable(args.out)
    devices = sampling_devices(args.devices) if args.evaluation == "adherence" else 1
    from vidiff import parallel
    from vidiff.pipeline import TextToVideo

    pipe = TextToVideo.from_checkpoint(args.checkpoint, scan_blocks=args.scan_blocks, dtype=args.dtype,
                                       mesh=parallel.sampling_mesh(devices))
    # Both summaries open with the same settings, the sampler's defaults filled in: a run is known by its file.
    settings = settings_in_force(pipe, args)
    sampling = settings["sampling"]
    if args.evaluation == "adherence":
        cases = adherence.cases(args.prompts, args.seeds)
        generate = lambda prompts, seed: pipe(prompts, seed=[seed], batch_size=args.batch_size, **sampling)
        with one_line_warnings("vidiff eval"):
            summary = adherence.evaluate(generate, cases)
        summary = {**settings, "prompts": args.prompts, "seeds": args.seeds, **summary}
        print(adherence.format_table(summary), file=sys.stderr)  # for the eye; stdout is the JSON alone
        shown = ("prompts", "seeds", "num_clips", "accuracy")
    else:
        from vidiff.eval.modes import evaluate_modes

        with one_line_warnings("vidiff eval"):
            summary = {**settings, **evaluate_modes(pipe, num_clips=args.clips, strength=args.strength, **sampling)}
        shown = ("num_clips", "strength", "seed", "world_seed", "means")
    brief = {k: summary[k] for k in (*settings, *shown)}
    print(json.dumps(brief, indent=2))
    if args.out:
        path = adherence.write_json(summary, args.out)
        print(f"wrote {path}", file=sys.stderr)
    return 0
