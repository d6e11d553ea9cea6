"""Train world_tiny end to end, score it, and bundle it (optionally as the model shipped with the package).

    python experiments/bundle_world_tiny.py                    # train VAE + DiT, evaluate, bundle into the workdir
    python experiments/bundle_world_tiny.py --skip-train --workdir workdir/world_tiny --install   # ship a run

The config's defaults train the DiT 700 steps (all correct on 25% of held-out
prompts); the shipped model trained 19,500 in seven stages, listed in its
``metrics.json`` (``note``, ``overrides``). So ``--install``, which replaces
``vidiff/assets/world_tiny``, is for a run that scores at least as well.

Steps: ``vidiff train --model vae`` then ``--model dit`` with
``vidiff/configs/world_tiny.py`` (each stage timed, wall clock), the
VAE's held-out PSNR / SSIM and the final losses read from the stages'
``metrics.jsonl``, ``vidiff eval adherence`` on the held-out combinations and
on the paraphrases, then the export (``vae.safetensors``, ``dit.safetensors``,
``vidiff.json``) is copied to ``<workdir>/bundle`` (or, with ``--install``,
``vidiff/assets/world_tiny/``) together with
``metrics.json`` (the commands, times, losses, PSNR and adherence) and refused
if it exceeds 20 MB. ``vidiff generate`` uses the package's directory by default,
any other with ``--checkpoint DIR``.
Extra ``--config.a.b=v`` arguments go to both training stages.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from measure import one_line_errors  # (experiments/ is the script's own folder)

REPO = Path(__file__).resolve().parents[1]
CONFIG = "world_tiny"  # vidiff/configs/world_tiny.py, named as `vidiff train --config` takes it
BUNDLE = REPO / "vidiff" / "assets" / "world_tiny"
FILES = ("vae.safetensors", "dit.safetensors", "vidiff.json")
MAX_BYTES = 20 * 1024 * 1024


def _run(argv: list[str]) -> float:
    """Run ``vidiff ARGV`` in a subprocess (its own jax runtime); return the wall time in seconds."""
    print("$ vidiff " + " ".join(argv), flush=True)
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "vidiff.cli", *argv], cwd=REPO).returncode
    if status:
        raise ChildProcessError(f"vidiff {argv[0]} exited with status {status}: its error is above")
    return time.perf_counter() - start


def _missing(workdir: Path) -> list[str]:
    """What ``--skip-train`` reads from a finished run that ``workdir`` lacks."""
    needed = [Path(stage, "metrics.jsonl") for stage in ("vae", "dit")] + [Path("export", f) for f in FILES]
    return [str(path) for path in needed if not (workdir / path).is_file()]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage_metrics(stage_dir: Path) -> dict:
    rows = _rows(stage_dir / "metrics.jsonl")
    losses = [r for r in rows if "loss" in r]
    # One logged batch is noisy (DiT batches differ in timesteps, masks and images): also the mean of the last 10 logs.
    out = {"steps": losses[-1]["step"], "final_loss": losses[-1]["loss"],
           "mean_loss_last_10_logs": sum(r["loss"] for r in losses[-10:]) / len(losses[-10:])}
    evals = [r for r in rows if "val_psnr" in r]
    if evals:
        out.update(val_psnr=evals[-1]["val_psnr"], val_ssim=evals[-1]["val_ssim"])
    return out


def bundle(args, overrides: list[str]) -> int:
    """Train (unless ``--skip-train``), score and bundle; see the module docstring."""
    workdir = Path(args.workdir).resolve()
    if args.skip_train and (missing := _missing(workdir)):
        raise FileNotFoundError(f"--skip-train: {workdir} has no {', '.join(missing)}; give --workdir a finished "
                                f"world_tiny run, or leave out --skip-train to train one")
    export = workdir / "export"
    train = ["train", "--config", CONFIG, f"--config.workdir={workdir}", *overrides]
    record: dict = {"config": CONFIG, "overrides": overrides,
                    "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores"}
    if not args.skip_train:
        times = {model: _run([*train, "--model", model]) for model in ("vae", "dit")}
        record["train_seconds"] = {k: round(v, 1) for k, v in times.items()}
        record["train_seconds"]["total"] = round(sum(times.values()), 1)
    record["commands"] = [" ".join(["vidiff", *train, "--model", m]) for m in ("vae", "dit")]
    record["vae"], record["dit"] = _stage_metrics(workdir / "vae"), _stage_metrics(workdir / "dit")
    record["adherence"] = {}
    for prompts in ("heldout", "paraphrase"):
        out = workdir / f"adherence_{prompts}.json"
        _run(["eval", "adherence", "--checkpoint", str(export), "--prompts", prompts, "--seeds", str(args.seeds),
              "--out", str(out)])
        summary = json.loads(out.read_text())
        record["adherence"][prompts] = {"seeds": args.seeds, "num_clips": summary["num_clips"],
                                        "accuracy": summary["accuracy"], "sampling": summary["sampling"]}
    size = sum((export / f).stat().st_size for f in FILES)
    if size > MAX_BYTES:
        raise SystemExit(f"the export is {size / 2**20:.1f} MB, over the 20 MB bundle limit; use a smaller model")
    target = BUNDLE if args.install else Path(args.out or workdir / "bundle")
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(export / name, target / name)
    record["bytes"] = size
    (target / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"bundled {size / 2**20:.1f} MB into {target}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdir/world_tiny_bundle", help="training workdir")
    parser.add_argument("--seeds", type=int, default=4, help="adherence clips per combination")
    parser.add_argument("--skip-train", action="store_true", help="bundle the existing run in --workdir")
    parser.add_argument("--out", help="where to bundle the model (default: <workdir>/bundle)")
    parser.add_argument("--install", action="store_true",
                        help=f"bundle into {BUNDLE.relative_to(REPO)}, replacing the model shipped with vidiff")
    args, overrides = parser.parse_known_args(argv)
    if any(not o.startswith("--config.") for o in overrides):
        parser.error(f"unrecognized arguments: {' '.join(o for o in overrides if not o.startswith('--config.'))}")
    if args.install and args.out:
        parser.error("--install bundles into the package; give --out or --install, not both")
    with one_line_errors("bundle_world_tiny.py"):  # a failed stage, a workdir that is no finished run
        return bundle(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
