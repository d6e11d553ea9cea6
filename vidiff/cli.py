"""The ``vidiff`` command: one subcommand per job, each living in its own module.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when chosen, so ``vidiff --help`` stays fast. A user's
mistake (``ValueError`` / ``OSError`` raised by vidiff) prints one line and
exits with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time

SUBCOMMANDS = {
    "world": ("vidiff.data.world", "render clips of the built-in captioned world to mp4 + gif"),
    "prepare": ("vidiff.train.precompute", "write ArrayRecord shards from a video folder + manifest (--latents adds VAE latents)"),
    "train": ("vidiff.train.command", "train the VAE or the DiT from an experiment config"),
    "plan": ("vidiff.plan", "compile a train step ahead of time: memory per device, does it fit, on how many devices"),
    "generate": ("vidiff.generate", "prompt in, video out: text-to-video, image-to-video, extend, connect, edit, loop"),
    "eval": ("vidiff.eval.command", "evaluate a model: prompt adherence on the captioned world, prompting modes"),
}


def _unknown_message(extra: list[str], unknown: list[str], overrides_ok: bool) -> str:
    """The error for arguments no parser took; ``--config.a.b 1`` (a space, as other flags take) leaves the value
    over and the override without one: that is shown written with '='."""
    spaced = [(flag, value) for flag, value in zip(extra, extra[1:])
              if overrides_ok and value in unknown and flag.startswith("--config.") and "=" not in flag]
    rest = [e for e in unknown if e not in {value for _, value in spaced}]
    parts = []
    if spaced:
        parts.append(f"a config override takes its value after '=': write {' '.join(f'{f}={v}' for f, v in spaced)}")
    if rest:
        parts.append(f"unrecognized arguments: {' '.join(rest)}")
    return "; ".join(parts)


def main(argv=None) -> int:
    """The ``vidiff`` command: parse, run the subcommand, turn user errors into one line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vidiff", description="Text-to-video diffusion in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parsers = {name: sub.add_parser(name, help=help_text, description=help_text)
               for name, (_, help_text) in SUBCOMMANDS.items()}
    if chosen:
        importlib.import_module(SUBCOMMANDS[chosen][0]).add_arguments(parsers[chosen])
    args, extra = parser.parse_known_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    # Config overrides (--config.a.b=value) pass through to modules that take them.
    overrides_ok = getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False)
    if unknown := [e for e in extra if not (overrides_ok and e.startswith("--config."))]:
        # "vidiff generate: error: ...", with that subcommand's usage; only these, not the good overrides beside them
        parsers[args.command].error(_unknown_message(extra, unknown, overrides_ok))
    args.overrides = extra
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:
        print(f"vidiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits itself): one line, not a trace
        print(f"vidiff {args.command}: interrupted", file=sys.stderr, flush=True)
        _let_writes_finish()
        sys.stdout.flush()
        os._exit(130)  # not a return: the interpreter's teardown after an interrupt mid-compile can crash in XLA


def _let_writes_finish(seconds: float = 60.0) -> None:
    """Wait (``seconds`` at most; a second Ctrl-C stops waiting) for the non-daemon threads, as a normal exit
    would: the latent cache's writer and an async checkpoint save finish their files rather than vanish."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if not others:
        return
    print(f"waiting up to {seconds:g} s for {len(others)} background write(s) to finish (Ctrl-C again: stop now)",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + seconds
    try:
        for thread in others:
            thread.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
