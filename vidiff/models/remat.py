"""Remat policies of the DiT's blocks: which forward values backward keeps and which it recomputes.

``DiTConfig.remat_policy`` names one; it applies to each block (each unrolled block, or the scanned
body). They trade memory for a second forward: ``none`` keeps everything, ``norms`` recomputes only the
norms, ``dots`` and ``attention`` recompute the cheap elementwise work around what they keep, ``block``
recomputes whole blocks, as the PyTorch peer does. ``experiments/PERF.md`` has what each costs.
"""
from __future__ import annotations

import jax
from flax import linen as nn

from vidiff.models.attention import flash_attention_saveable

_KEEP_ATTENTION = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names("attention"), flash_attention_saveable)
REMAT_POLICIES = {
    "none": None,
    # No block remat, but the layer and q/k norms rerun in backward from their compute-dtype inputs instead of
    # keeping float32 copies of them (layers.rms_normalize): what "none" saves, minus most of its norm residuals.
    "norms": None,
    "block": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in backward, as the peer does
    # Recompute the block but not attention: the flash kernel's output and softmax statistics are kept (linear in
    # the tokens), so backward reruns projections, norms and MLP but not the T^2 forward kernel (XLA attention,
    # which has no statistics to keep, still recomputes its probabilities).
    "attention": _KEEP_ATTENTION,
    # Also keep projection/MLP matmul outputs; recompute only norms, modulation, GELU.
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_ATTENTION),
}


def recomputes_norms(policy: str) -> bool:
    """Whether the blocks' norms are told to recompute themselves (the others recompute inside a block remat)."""
    return policy == "norms"


def remat_block(block: type[nn.Module], policy: str, looped: bool) -> type[nn.Module]:
    """``block`` under ``policy``; ``looped``: the blocks run as a scan's loop, not straight-line code."""
    if REMAT_POLICIES[policy] is None:
        return block
    # A scan's loop already keeps XLA from merging the recomputation with the forward; straight-line code
    # (unscanned, or the loop unrolled whole) needs the barrier.
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=not looped)
