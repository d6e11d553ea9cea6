"""Benchmark-only ablations: vidiff's DiT with one piece of work the PyTorch peer does not do taken out.

    PYTHONPATH=. python3 experiments/bench_dit.py --mode train --ablate rope        # what RoPE costs
    PYTHONPATH=. python3 experiments/bench_dit.py --mode train --ablate text-mask   # what masked text attention costs

The peer's block (``../shared/bench/torch_dit_reference.py``) has no rotary
embedding and attends to every text token; vidiff rotates q and k in every
self-attention and passes the captions' lengths to every cross-attention. An
ablated run times the same step without that work, so the difference is its
cost. The model is then not vidiff's: ablated records are diagnoses, never
goal rows (``bench_dit.py`` names them in ``ablate``; ``bench_goals.py`` and
``bench_compare.py`` never pass the flag). The ablations patch module
globals for the life of the process only.
"""
from __future__ import annotations

import contextlib

from vidiff.models import attention, dit


def _no_rope():
    return _patched(attention, "apply_rope", lambda x, cos, sin: x)


def _no_text_mask():
    # Every text token valid, none masked: cross-attention gets neither a mask nor lengths.
    return _patched(dit, "text_mask_and_lengths", lambda mask_or_lengths: (None, None))


@contextlib.contextmanager
def _patched(module, name: str, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


ABLATIONS = {"rope": _no_rope, "text-mask": _no_text_mask}


@contextlib.contextmanager
def ablated(names):
    """Apply the named ablations (``ABLATIONS``) inside the block; a one-line error for an unknown name."""
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"--ablate: unknown {unknown}; choose from {sorted(ABLATIONS)}")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(ABLATIONS[name]())
        yield
