"""Flags and checks shared by ``vidiff generate`` and ``vidiff eval``, so that neither command imports the other.

Both load a model and sample, so both take ``--scan-blocks`` and the sampling
flags, check them (and that ``--out`` can be written) before the model loads,
and print the library's warnings as one line each.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import warnings
from pathlib import Path

from vidiff import io


def add_scan_blocks_flag(parser: argparse.ArgumentParser) -> None:
    """``--scan-blocks / --no-scan-blocks`` (None when absent), for ``TextToVideo.from_checkpoint(scan_blocks=)``."""
    parser.add_argument("--scan-blocks", action=argparse.BooleanOptionalAction,
                        help="run the DiT's blocks scanned (compiles faster: an XL forward 8.5 s against 31 s on an "
                             "H200) or unrolled; default: as the model was trained (the weights convert on load)")


@contextlib.contextmanager
def one_line_warnings(command: str):
    """Within the block, warnings print as ``<command>: warning: <message>`` (no file, no source line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"{command}: warning: {message}", file=sys.stderr)
        yield


def check_sampling_flags(args) -> None:
    """The sampling flags ``generate`` and ``eval`` share, checked before a model loads."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be at least 1")
    if args.guidance is not None and not math.isfinite(args.guidance):  # NaN would give black clips
        raise ValueError(f"--guidance={args.guidance} must be a finite number (1 = off)")


def check_writable(path) -> None:
    """A one-line ``OSError`` now, not after minutes of sampling, when no file can be created at ``path``."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot write {path}: it is a directory; give a file name")
    io.check_folders(path)
    parent = path.parent.absolute()
    missing = [folder for folder in (parent, *parent.parents) if not folder.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".vidiff-write-test-"):
            pass
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}; choose a writable output path") from None
    finally:  # a run that fails later leaves no empty folders behind; the writers create them again
        for folder in missing:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
