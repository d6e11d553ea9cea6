"""``vidiff generate``: prompts in, video (or image) files out, in every prompting mode of ``TextToVideo``.

    vidiff generate "a red circle moving left" --out demo.mp4       # the bundled model
    vidiff generate "a red circle moving left" --frames 1           # an image: vidiff.png
    vidiff generate "a red circle moving left" --negative "a blue square"   # guidance steers away from it
    vidiff generate "..." --image first.png | --extend clip.mp4 --direction backward
                          | --connect a.mp4 b.mp4 | --edit clip.mp4 --strength 0.6 | --loop
    vidiff generate "..." --num 64 --devices all --batch-size 64     # 8 clips on each of 8 GPUs at once
    vidiff generate "..." --dtype bfloat16                          # on a GPU: compute in bf16, weights as loaded

Everything a user can get wrong (empty prompt, bad strength, unwritable
output, unreadable input, a directory that is not a model, sizes the model
cannot make, an input too short for its mode) is checked before the model
loads and reported in one line: the sizes and the inputs' frame counts by the
rules ``TextToVideo`` applies (``vidiff.clip_rules.ClipRules``), read from the
export's ``vidiff.json``, in the words it uses. The inputs' frames are decoded
then, once, and handed to the pipeline: the counts checked are those it gets.
Each file written holds a record of how it was made (``vidiff.generate_record``).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from vidiff import io
from vidiff.cli_flags import (add_choice_flag, add_devices_flag, add_dtype_flag, add_scan_blocks_flag, check_choice,
                              check_sampling_flags, check_writable, one_line_warnings, sampling_devices)
from vidiff.diffusion.samplers import SAMPLERS
from vidiff.generate_record import check_grid_record, clip_record, grid_record, run_settings
from vidiff.models.vae import pixel_count
from vidiff.pipeline_inputs import DEFAULT_BATCH_SIZE, check_prompts, check_utf8, input_frames, sampled_batch
from vidiff.clip_rules import DIRECTIONS, ClipRules
from vidiff.pipeline_load import read_clip_rules

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")
DEFAULT_STRENGTH = 0.6  # --edit's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``vidiff generate``."""
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="what the clip shows (several: one clip each)")
    parser.add_argument("--out", help="output file: .mp4, .webm, .gif or .png (default vidiff.mp4, vidiff.png "
                        "for --frames 1); several clips get _0, _1, ... before the suffix")
    parser.add_argument("--checkpoint", help="model directory exported by `vidiff train` (default: the bundled model)")
    parser.add_argument("--frames", type=int, help="frames per clip, 1 + k x the VAE's time factor tf (tf = 1 for "
                        "the bundled model, 4 for the tiny/small/base VAE presets' defaults; a count it cannot make "
                        "is an error that lists the ones it can); default: the training length; 1 = image")
    parser.add_argument("--height", type=int, help="frame height (default: the training size)")
    parser.add_argument("--width", type=int, help="frame width (default: the training size)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's sample.steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--negative", metavar="TEXT", help="negative prompt, for every prompt: guidance steers away "
                        "from it rather than from the empty prompt (needs --guidance other than 1)")
    add_choice_flag(parser, "--sampler", SAMPLERS, help="ODE solver")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first clip; clip j of a prompt uses seed + j")
    parser.add_argument("--num", type=int, default=1, help="clips per prompt")
    parser.add_argument("--fps", type=float, help="frame rate of the written video (.gif: 0.00153 to 50, .mp4: "
                        "0.0001 to 10^6, .webm: 0.0001 to 1000); default: the input video's rate with --extend, "
                        "--edit or --connect (A's), else 8")
    parser.add_argument("--grid", help="also write one image with every frame (a row per clip)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="clips sampled at once (with "
                        "--devices N, rounded up to a multiple of N: each device samples its share), each written "
                        "as its batch finishes; lower it if the device runs out of memory")
    add_devices_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scan_blocks_flag(parser)
    add_dtype_flag(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--image", metavar="IMG", help="animate this image (it becomes the first frame)")
    mode.add_argument("--extend", metavar="VIDEO", help="continue this video (see --direction)")
    mode.add_argument("--connect", nargs=2, metavar=("A", "B"), help="a transition from the end of A to the start of B")
    mode.add_argument("--edit", metavar="VIDEO", help="re-imagine this video under the prompt (SDEdit, see --strength)")
    mode.add_argument("--loop", action="store_true", help="a clip whose last frame leads back into the first "
                      "(--frames a multiple of the VAE's time factor: any count from 2 for the bundled model, 4, "
                      "8, ... for a 4x VAE)")
    # Default "forward", set in _read_inputs: None means "not given", which _check_mode_flags refuses without --extend.
    add_choice_flag(parser, "--direction", DIRECTIONS, help="with --extend: add frames after "
                        "(forward, default) or before (backward) the video")
    parser.add_argument("--context-frames", type=int, help="with --extend: input frames kept (forward 1 + tf k, "
                        "backward tf k, for the VAE's time factor tf as in --frames; default about half the clip)")
    # Default DEFAULT_STRENGTH, set in _read_inputs: None means "not given", refused without --edit.
    parser.add_argument("--strength", type=float, help="with --edit: in (0, 1]; 0 keeps the video, 1 ignores it "
                        "(default 0.6)")


def run(args: argparse.Namespace) -> int:
    """Check the request, load the model, generate a batch at a time, write each file as its batch is done and say
    where (then the grid)."""
    outputs, fps, devices, inputs, mode = _check_request(args)

    from vidiff import parallel
    from vidiff.pipeline import TextToVideo

    pipe = TextToVideo.from_checkpoint(args.checkpoint, scan_blocks=args.scan_blocks, dtype=args.dtype,
                                       mesh=parallel.sampling_mesh(devices))
    writer = _Writer(args, outputs, fps, run_settings(pipe, args, mode, fps, devices))
    with one_line_warnings("vidiff generate"):
        try:
            _generate(pipe, args, inputs, mode, on_batch=writer)
        except RuntimeError as e:  # jax's JaxRuntimeError; the files already written stay
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            batch = sampled_batch(args.batch_size, len(outputs), devices)
            raise ValueError(_out_of_memory(batch, writer.written, len(outputs), devices)) from None
    writer.write_grid()
    return 0


def _out_of_memory(batch: int, written: int, total: int, devices: int = 1) -> str:
    """What to lower, and what was kept: a long run's files are written as it goes. Each device holds only its
    share of the batch, so --batch-size is named only when that share is more than one clip."""
    share = batch // devices
    lower = "--batch-size (or --frames, --height, --width)" if share > 1 else "--frames, --height or --width"
    split = f" ({share} on each of {devices} devices)" if devices > 1 else ""
    return (f"the device ran out of memory sampling {batch} clip(s) at once{split}; lower {lower}; the first "
            f"{written} of {total} clip(s) were written")


def _check_request(args) -> tuple[list[Path], float, int, dict, dict]:
    """Everything the user can get wrong, before the model loads (in this order: the first mistake is the one
    reported); returns the output files, one per clip, the frame rate to write them at, the devices to
    sample on, the mode's input frames and the mode as the files record it (:func:`_read_inputs`)."""
    check_prompts(args.prompts)  # the library's own check, run here so that it comes before the model loads
    _warn_if_unquoted(args.prompts)
    _check_mode_flags(args)
    check_sampling_flags(args)
    _check_negative(args)
    if args.num < 1:
        raise ValueError(f"--num={args.num} must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be at least 1")
    if not 0 <= args.seed <= 2**32 - args.num:  # the noise is keyed by a uint32 per clip
        raise ValueError(f"--seed={args.seed} must be in [0, 2**32 - --num]")
    if args.fps is not None and not 0.0 < args.fps < math.inf:
        raise ValueError(f"--fps={args.fps} must be a positive frame rate")
    outputs = _output_paths(_out(args), len(args.prompts) * args.num)
    for path in outputs:
        _check_output_file(path, frames=args.frames, fps=args.fps)
    if args.grid is not None:
        _check_grid(args.grid, outputs)
        check_grid_record(args.grid, args, [path for path, _ in _inputs(args)])
    for source, kind in _inputs(args):
        _check_readable(source, kind)
    from vidiff.pipeline import model_directory

    inputs, mode = _read_inputs(args, read_clip_rules(model_directory(args.checkpoint)))
    return outputs, _output_fps(args, outputs), sampling_devices(args.devices), inputs, mode


def _read_inputs(args, rules: ClipRules) -> tuple[dict, dict]:
    """The mode's sizes, checked, and its inputs' frames, decoded as ``TextToVideo`` reads them
    (``input_frames``, the same ``first`` / ``last``) and checked by its rules (its words): a clip the model cannot
    make, or a video that decodes fewer frames than its container counts, fails before the model loads, not
    after. The frames go to the pipeline in place of the paths (its methods' keyword names), so each input is
    decoded once. Also the mode as the files record it: its name and its flags with the values in force."""
    size = (args.frames, args.height, args.width)
    if args.loop:
        rules.loop_sizes(*size)
        return {}, {"name": "loop"}
    frames, _, _ = rules.sizes(*size)
    if args.image:
        rules.animated_latents(frames)
        return {"image": input_frames(args.image, "image", first=1)}, {"name": "image", "image": args.image}
    if args.extend:
        direction = args.direction or "forward"
        video = input_frames(args.extend, "video", **rules.extend_reads(direction, frames))
        k = rules.extend_context(direction, frames, len(video), args.context_frames)
        context = pixel_count(k, rules.time_factor) if direction == "forward" else rules.time_factor * k
        return {"video": video}, {"name": "extend", "extend": args.extend, "direction": direction,
                                  "context_frames": context}
    if args.connect:
        rules.connect_latents(frames)
        video_b = input_frames(args.connect[1], "video", first=1 + rules.time_factor)
        rules.check_second_video(len(video_b))
        return ({"video_a": input_frames(args.connect[0], "video", last=1), "video_b": video_b},
                {"name": "connect", "connect": list(args.connect)})
    if args.edit:
        video = input_frames(args.edit, "video", first=frames)
        rules.edit_frames(len(video), frames, asked=args.frames is not None)
        strength = DEFAULT_STRENGTH if args.strength is None else args.strength
        return {"video": video}, {"name": "edit", "edit": args.edit, "strength": strength}
    return {}, {"name": "text"}


def _output_fps(args, outputs: list[Path]) -> float:
    """``--fps``, else the input video's own rate (its kept frames play at the speed they were filmed;
    ``--connect``: A's, whose end opens the clip), checked against the outputs' formats; else 8."""
    video = args.extend or args.edit or (args.connect or [None])[0]
    if args.fps is not None or video is None or not io.reads_as_video(video, video_expected=True):  # an image
        return 8.0 if args.fps is None else args.fps  # --fps was checked with the output files
    fps = io.probe(video).fps
    for path in outputs:
        io.check_fps(path, fps, f"--fps (default: {video}'s rate)")
    return fps


def _generate(pipe, args, inputs: dict, mode: dict, on_batch) -> None:
    """The clips of ``mode`` (its name and flags in force, as :func:`_read_inputs` worked them out),
    ``len(prompts) * num`` of them, from its ``inputs`` (frames read by :func:`_read_inputs`), to
    ``on_batch(first, clips)`` a ``--batch-size`` batch at a time (``uint8 (batch, frames, height, width, 3)``)."""
    prompts, name = args.prompts, mode["name"]
    size = dict(num_frames=args.frames, height=args.height, width=args.width)
    sampling = dict(steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=args.seed,
                    num_per_prompt=args.num, negative_prompt=args.negative, progress=not args.quiet,
                    batch_size=args.batch_size, on_batch=on_batch)
    if name == "image":
        return pipe.image_to_video(prompts, **inputs, **size, **sampling)
    if name == "extend":  # the pipeline works the context out as _read_inputs did: given as the user gave it
        return pipe.extend(prompts, **inputs, direction=mode["direction"], context_frames=args.context_frames,
                           **size, **sampling)
    if name == "connect":
        return pipe.connect(prompts, **inputs, **size, **sampling)
    if name == "edit":
        return pipe.edit(prompts, **inputs, strength=mode["strength"], **size, **sampling)
    if name == "loop":
        return pipe.loop(prompts, **size, **sampling)
    return pipe(prompts, **size, **sampling)


class _Writer:
    """``on_batch`` for :func:`_generate`: each clip to its file as its batch is done (a one-frame clip to a .png as
    an image), with its record (the run's ``settings`` and its own prompt, seed and size), one line per file;
    the clips are kept only for ``--grid``, written last."""

    def __init__(self, args, outputs: list[Path], fps: float, settings: dict):
        self.args, self.outputs, self.fps, self.settings = args, outputs, fps, settings
        self.written, self.kept = 0, []

    def __call__(self, first: int, clips: np.ndarray) -> None:
        args = self.args
        for k, clip in enumerate(clips, start=first):
            path, prompt, seed = self.outputs[k], args.prompts[k // args.num], args.seed + k % args.num
            record = clip_record(self.settings, prompt, seed, clip)
            if len(clip) == 1 and path.suffix.lower() == ".png":
                io.write_image(path, clip[0], record=record)
            else:
                io.write_video(path, clip, self.fps, record=record)
            print(f"wrote {path}  ({len(clip)} frames, {clip.shape[1]}x{clip.shape[2]}, seed {seed}, {prompt!r})",
                  flush=True)
            self.written += 1
        if args.grid is not None:
            self.kept.append(clips)

    def write_grid(self) -> None:
        if self.args.grid is None:
            return
        args, clips = self.args, np.concatenate(self.kept)
        grid = io.frame_grid(np.concatenate(list(clips)), columns=clips.shape[1])
        record = grid_record(self.settings, args.prompts, [args.seed + j for j in range(args.num)], clips)
        print(f"wrote {io.write_image(args.grid, grid, record=record)}  (grid: {len(clips)} clip(s) x "
              f"{clips.shape[1]} frames)")


def _warn_if_unquoted(prompts: list[str]) -> None:
    if len(prompts) > 2 and all(len(p.split()) == 1 for p in prompts):  # the shell split an unquoted prompt
        print(f"vidiff generate: warning: {len(prompts)} one-word prompts, one clip each; for one prompt, quote "
              f"it: vidiff generate \"{' '.join(prompts)}\"", file=sys.stderr)


def _check_mode_flags(args) -> None:
    check_choice("sampler", args.sampler, SAMPLERS)
    check_choice("direction", args.direction, DIRECTIONS)
    if args.strength is not None:
        if not args.edit:
            raise ValueError("--strength applies only to --edit VIDEO")
        if not 0.0 < args.strength <= 1.0:
            raise ValueError(f"--strength={args.strength} must be in (0, 1]: 0 keeps the video, 1 ignores it")
    if (args.direction or args.context_frames is not None) and not args.extend:
        raise ValueError("--direction and --context-frames apply only to --extend VIDEO")
    if args.image and args.frames == 1:  # whatever the time factor, one frame is the image's own latent
        raise ValueError("--image with --frames 1 leaves nothing to animate (the image is the first frame); "
                         "ask for more frames")


def _check_negative(args) -> None:
    """An empty --negative is a slip (without it the empty prompt is the negative); with --guidance 1 the
    unconditional branch it replaces is not run. (A model whose default guidance is 1: the pipeline says so.)"""
    if args.negative is None:
        return
    if not args.negative.strip():
        raise ValueError("--negative is empty; give what the clips should not show, e.g. 'blurry', or drop --negative")
    check_utf8(args.negative, "--negative")
    if args.guidance == 1.0:
        raise ValueError("--negative has no effect with --guidance 1 (no classifier-free guidance); raise "
                         "--guidance, e.g. to 4, or drop --negative")


def _inputs(args) -> list[tuple[str, str]]:
    """``(path, "image" | "video")`` of every input file the mode reads."""
    given = [(args.image, "image"), (args.extend, "video"), (args.edit, "video"),
             *((path, "video") for path in args.connect or ())]
    return [(path, kind) for path, kind in given if path]


def _out(args) -> str:
    """``--out``, or the default when it is not given (an empty ``--out ""`` is a mistake, not the default)."""
    if args.out is None:
        return "vidiff.png" if args.frames == 1 else "vidiff.mp4"
    if not args.out.strip():
        raise ValueError("--out is empty; give a file name such as demo.mp4 (without --out: vidiff.mp4)")
    return args.out


def _check_grid(grid: str, outputs: list[Path]) -> None:
    if not grid.strip():
        raise ValueError("--grid is empty; give an image file name such as grid.png, or drop --grid")
    if Path(grid).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"--grid {grid}: the grid is one image; use .png or .jpg")
    if any(Path(grid).resolve() == path.resolve() for path in outputs):  # the grid, written last, would replace it
        raise ValueError(f"--grid {grid} is also the --out file; give the grid its own name, e.g. "
                         f"{Path(grid).with_name(Path(grid).stem + '_grid' + Path(grid).suffix)}")
    check_writable(grid)


def _output_paths(out: str, total: int) -> list[Path]:
    out = Path(out)
    if total == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(total)]


def _check_output_file(path: Path, frames: int | None, fps: float | None = None) -> None:
    """Fail now, not after sampling, when ``path`` has no suffix vidiff writes, one that cannot hold ``frames``
    (png: one frame) or store ``fps``, or cannot be written (``check_writable``)."""
    if path.is_dir():
        raise OSError(f"cannot write {path}: it is a directory; give a file name such as {path / 'demo.mp4'}")
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES + (".png",):
        raise ValueError(f"--out {path}: unknown suffix {suffix!r}; use .mp4, .webm, .gif or .png")
    if suffix == ".png" and frames != 1:
        raise ValueError(f"--out {path}: a png holds one frame; use .mp4 or .gif, or --frames 1 for an image")
    if fps is not None:
        io.check_fps(path, fps, "--fps")
    check_writable(path)


def _check_readable(source: str, kind: str) -> None:
    """A missing or undecodable input is one line now (``VideoReadError`` names the file and the reason); read
    as ``TextToVideo.load_frames`` will: videos by PyAV whatever their suffix, images by theirs."""
    if Path(source).is_dir():
        raise ValueError(f"{source} is a directory; give a video or image file")
    if io.reads_as_video(source, video_expected=kind == "video"):
        io.probe(source)
    else:
        io.read_image(source)
