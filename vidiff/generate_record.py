"""What ``vidiff generate`` stores in each file it writes, so that the file says how it was made: a JSON object
in the file's own metadata (``vidiff.io.write_video`` / ``write_image``), read back by ``vidiff.io.read_record``.

- ``run_settings``: what every file of a run shares: the vidiff version, the model (its directory, the sha256
  of its weight files, ``weight_digests``, and of its ``vidiff.json``), the dtypes it computed in, the sampler
  settings in force (``vidiff.cli_flags.settings_in_force``: the model's defaults filled in), the negative
  prompt, the mode and its inputs' names (as given), the frame rate, the batch size, the devices and the clips
  per sampling call.
- ``clip_record``: one clip's file: the run's settings, its prompt, seed and size.
- ``grid_record``: the ``--grid`` image: the run's settings, the prompts and seeds of its rows;
  ``check_grid_record``: before the model loads, a jpg grid whose comment could not hold that.
- ``weight_digests``: the sha256 of each weight file, remembered beside them by the text encoder's memo
  (``weight-digests.json``, keyed by path, size and modification time), so a multi-GB DiT is hashed once,
  not on every run (``MEMO_BYTES``: an export smaller than that is hashed each run).

docs/cli.md says how the fields map back to flags to make the clip again.
"""
from __future__ import annotations

import os
from pathlib import Path

import vidiff
from vidiff.cli_flags import settings_in_force
from vidiff.io.record import record_text
from vidiff.models.export import BUNDLED, MANIFEST, file_sha256
from vidiff.models.text.loading import file_digests
from vidiff.pipeline_inputs import sampled_batch

MEMO_BYTES = 256 << 20  # weights hashed in under a second (0.45 s on a shared 2-core CPU): no memo below


def run_settings(pipe, args, mode: dict, fps: float, devices: int) -> dict:
    """The fields every file of a run records; ``mode`` is ``{"name": ...}`` and the mode's flags in force
    (``vidiff.generate``'s ``_read_inputs`` works them out), ``fps`` the rate the clips are written at."""
    settings = settings_in_force(pipe, args)
    total = len(args.prompts) * args.num
    return {"vidiff": vidiff.__version__, "checkpoint": settings["checkpoint"],
            # vidiff.json too: its config (the text encoder, how the DiT computes) shapes the clip as well.
            "sha256": {**weight_digests(pipe.directory), MANIFEST: file_sha256(Path(pipe.directory) / MANIFEST)},
            "dtype": settings["dtype"], "sampling": settings["sampling"],
            "negative": args.negative, "mode": mode, "fps": fps, "batch_size": args.batch_size, "devices": devices,
            # A clip is the same value for value only when sampled in a batch of this many again.
            "batch": sampled_batch(args.batch_size, total, devices)}


def clip_record(settings: dict, prompt: str, seed: int, clip) -> dict:
    """One clip's record: its prompt and seed, ``settings`` (:func:`run_settings`), its frames and size."""
    return {"prompt": prompt, "seed": seed, **settings, "frames": len(clip), "height": clip.shape[1],
            "width": clip.shape[2]}


def grid_record(settings: dict, prompts: list[str], seeds: list[int], clips) -> dict:
    """The grid's record: row k is the clip of ``prompts[k // len(seeds)]`` and ``seeds[k % len(seeds)]``."""
    return {"prompts": list(prompts), "seeds": list(seeds), **settings, "frames": clips.shape[1],
            "height": clips.shape[2], "width": clips.shape[3]}


def check_grid_record(grid, args, inputs: list[str]) -> None:
    """``record_text``'s one line for a jpg ``--grid`` too small for its record, before the model loads rather
    than once every clip is written: the fields the user sizes (prompts, seeds, negative prompt, paths) with
    1 KB for those the model fills in (digests, dtypes, sampling, sizes: under 600 bytes)."""
    if Path(grid).suffix.lower() in (".jpg", ".jpeg"):
        record_text(grid, {"prompts": args.prompts, "seeds": list(range(args.seed, args.seed + args.num)),
                           "negative": args.negative, "checkpoint": args.checkpoint, "inputs": inputs,
                           "model's fields": " " * 1024})


def weight_digests(directory) -> dict[str, str]:
    """``{file name: sha256}`` of the export's weight files (``*.safetensors``), from the text encoder's memo
    (``models.text.loading.file_digests``) beside them. Only an export of ``MEMO_BYTES`` or more keeps one,
    where the directory can be written, and never the bundled model: a small one is hashed again in less time
    than a memo saves, and the folder stays as ``vidiff train`` wrote it."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    keep = sum(f.stat().st_size for f in files) >= MEMO_BYTES and directory.resolve() != BUNDLED.resolve() \
        and os.access(directory, os.W_OK)
    digests = file_digests(files, directory if keep else None, best_effort=True)  # a memo is only a shortcut
    return {f.name: digest for f, digest in zip(files, digests)}
