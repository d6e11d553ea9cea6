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
from unittest import mock

from vidiff.models import attention, dit

# name -> (module, global, stand-in) patched for the block's duration
ABLATIONS = {
    "rope": (attention, "apply_rope", lambda x, cos, sin: x),
    # Every text token valid, none masked: cross-attention gets neither a mask nor lengths.
    "text-mask": (dit, "text_mask_and_lengths", lambda mask_or_lengths: (None, None)),
}


def check(names) -> None:
    """A one-line ``ValueError`` naming any ablation ``ABLATIONS`` does not have."""
    if unknown := sorted(set(names) - set(ABLATIONS)):
        raise ValueError(f"--ablate: unknown {unknown}; choose from {sorted(ABLATIONS)}")


@contextlib.contextmanager
def ablated(names):
    """Apply the named ablations inside the block (checked first, see :func:`check`)."""
    check(names)
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(*ABLATIONS[name]))
        yield
