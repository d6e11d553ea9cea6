"""Shared by the tests of the benchmark scripts: where they are, how one runs here, fake benchmark commands.

Each script runs as it would on the GPU machine, in a subprocess at tiny CPU
settings, or is imported from ``experiments/`` (put on ``sys.path`` here) to
test its parts. Torch is not installed here: the wrappers that run the peer
(``bench_compare.py``, ``bench_goals.py``) run ``FAKE`` in its place.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

# A stand-in for bench_dit.py and the peer's scripts: `python fake.py <impl> <speed>` prints a record per mode at
# `speed` x batch x tokens tokens/s.
FAKE = """
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--batch", type=int); p.add_argument("--tokens", type=int); p.add_argument("--mode")
a, _ = p.parse_known_args()
impl, speed = sys.argv[1], float(sys.argv[2])
modes = {"both": ["forward", "train"], None: [None]}.get(a.mode, [a.mode])
for mode in modes:
    rec = dict(impl=impl, batch=a.batch, tokens=a.tokens, step_s=1.0, tokens_per_s=speed * a.batch * a.tokens,
               model_tflops=1.0, peak_mem_GiB=2.0)
    if mode:
        rec.update(mode=mode, status="ok", mfu=0.5, cudnn_attention=False)
    print(json.dumps(rec))
"""
SLEEPER = "import time; time.sleep(60)"  # a benchmark that hangs


def script_env(**extra: str) -> dict:
    """The environment a script runs in here: the CPU, the checkout importable."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **extra}


def run_script(name: str, *args: str, timeout: float = 240, **env: str) -> list[dict]:
    """Run ``experiments/<name>`` on one CPU device, with ``env`` added to its environment; its stdout JSON
    lines."""
    # One device: the conftest's 8 virtual devices would only slow these single-device runs.
    env = script_env(XLA_FLAGS="", JAX_DEFAULT_PRNG_IMPL="rbg", **env)  # rbg compiles faster on CPU than threefry
    done = subprocess.run([sys.executable, str(EXPERIMENTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def assert_positive(record: dict, *keys: str):
    for key in keys:
        assert isinstance(record[key], (int, float)) and record[key] > 0 and math.isfinite(record[key]), (key, record)
