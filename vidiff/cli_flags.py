"""Flags and checks shared by ``vidiff generate`` and ``vidiff eval``, so that neither command imports the other.

Both load a model and sample, so both take ``--scan-blocks``, ``--dtype``, the
sampling flags and (where a call samples a batch) ``--devices``, check them (and that
``--out`` can be written) before the model loads, and print the library's
warnings as one line each. What both record of how their outputs were made (the
model, the dtypes it computes in, the sampler settings in force) is
``settings_in_force``'s.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

from vidiff import io
from vidiff.checks import COMPUTE_DTYPES, compute_dtype
from vidiff.io.files import replaceable_mode


def add_scan_blocks_flag(parser: argparse.ArgumentParser) -> None:
    """``--scan-blocks / --no-scan-blocks`` (None when absent), for ``TextToVideo.from_checkpoint(scan_blocks=)``."""
    parser.add_argument("--scan-blocks", action=argparse.BooleanOptionalAction,
                        help="run the DiT's blocks scanned (compiles faster: an XL forward 8.5 s against 31 s on an "
                             "H200) or unrolled; default: as the model was trained (the weights convert on load)")


def add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` (None when absent), for ``TextToVideo.from_checkpoint(dtype=)``; checked by
    :func:`check_sampling_flags` (argparse's ``choices`` would print its usage too, not one line)."""
    parser.add_argument("--dtype", metavar="{" + ",".join(COMPUTE_DTYPES) + "}", help="what the DiT and the VAE "
                        "compute in, not the weights (they stay as loaded): bfloat16 is the GPU's and TPU's choice "
                        "(float16: GPUs only); on a CPU it gains nothing (the bundled model, 8 clips: 4.35 s of CPU "
                        "time against float32's 4.24 s); default: as the model was trained (the bundled model: "
                        "float32)")


def add_devices_flag(parser: argparse.ArgumentParser) -> None:
    """``--devices N | all`` (None when absent), read by :func:`sampling_devices`."""
    parser.add_argument("--devices", metavar="N", help="sample data-parallel over this process's first N devices, "
                        "or all: the weights copied to each, every batch split over them (so --batch-size is "
                        "rounded up to a multiple of N); default: all on a GPU or TPU, 1 on a CPU, where devices "
                        "share the same cores (8 clips on 8 virtual CPU devices of 2 cores: 5.3 s, 3.8 s on 1)")


def sampling_devices(value: str | None) -> int:
    """``--devices`` as a count of this process's devices, checked before a model loads (a one-line
    ``ValueError`` naming the counts that work)."""
    import jax

    local = jax.local_devices()
    if value is None:  # virtual CPU devices run on the same cores: splitting a batch over them only adds work
        return 1 if jax.default_backend() == "cpu" else len(local)
    if value.strip().lower() == "all":
        return len(local)
    here = f"{len(local)} {local[0].platform} device(s) here"
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"--devices={value} is not a whole number; give a device count such as 2, or all (the "
                         f"{here})") from None
    if count < 1:
        raise ValueError(f"--devices={count} must be at least 1; give a device count such as 2, or all (the {here})")
    if count > len(local):
        raise ValueError(f"--devices={count} is more than the {here}; give at most {len(local)}, or all")
    return count


@contextlib.contextmanager
def one_line_warnings(command: str):
    """Within the block, warnings print as ``<command>: warning: <message>`` (no file, no source line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"{command}: warning: {message}", file=sys.stderr)
        yield


def add_choice_flag(parser: argparse.ArgumentParser, flag: str, names, **kwargs) -> None:
    """``flag`` taking one of ``names``, checked by :func:`check_choice` (argparse's ``choices`` would print its
    usage too, not one line)."""
    parser.add_argument(flag, metavar="{" + ",".join(names) + "}", **kwargs)


def check_choice(flag: str, value, names) -> None:
    """A one-line ``ValueError`` unless ``value`` (None: the flag was not given) is one of ``names``."""
    if value is not None and value not in names:
        raise ValueError(f"--{flag}={value} is unknown; use {', '.join(names[:-1])} or {names[-1]}")


def check_sampling_flags(args) -> None:
    """The sampling flags ``generate`` and ``eval`` share, checked before a model loads."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be at least 1")
    if args.guidance is not None and not math.isfinite(args.guidance):  # NaN would give black clips
        raise ValueError(f"--guidance={args.guidance} must be a finite number (1 = off)")
    if args.dtype is not None:  # the library's check, in the flag's words
        import jax

        try:
            compute_dtype(args.dtype, jax.default_backend())
        except ValueError as error:
            words = str(error).replace(f"dtype={args.dtype!r}", f"--dtype={args.dtype}", 1)
            raise ValueError(words.replace("or None to", "or no --dtype to")) from None


def settings_in_force(pipe, args) -> dict:
    """How a loaded ``TextToVideo`` samples under ``args``' flags, for a run to record beside what it makes: its
    directory (``checkpoint``), the dtypes its DiT and VAE compute in (``--dtype``'s, or as trained) and the
    ``sampling`` settings, the model's defaults (``pipe.defaults``) filling in those not given, as the pipeline
    fills them; so a record names the steps a run took even when ``--steps`` was left out."""
    given = {"steps": args.steps, "guidance": args.guidance, "sampler": args.sampler}
    steps, guidance, sampler = (pipe.defaults[k] if v is None else v for k, v in given.items())
    return {"checkpoint": str(pipe.directory), "dtype": {"dit": pipe.dit.config.dtype, "vae": pipe.vae.config.dtype},
            "sampling": {"steps": int(steps), "guidance": float(guidance), "sampler": str(sampler)}}


def check_writable(path) -> None:
    """A one-line ``OSError`` now, not after minutes of sampling, when no file can be created at ``path`` (or the
    one there, read-only, cannot be replaced)."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot write {path}: it is a directory; give a file name")
    io.check_folders(path)
    replaceable_mode(path)
    folder = Path(os.path.realpath(path)).parent  # a symlink's target is what is written, in its own folder
    parent = folder.absolute()
    missing = [above for above in (parent, *parent.parents) if not above.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vidiff-write-test-"):
            pass
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}; choose a writable output path") from None
    finally:  # a run that fails later leaves no empty folders behind; the writers create them again
        for empty in missing:
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
