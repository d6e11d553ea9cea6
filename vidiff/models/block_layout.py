"""Scanned or unrolled: the two layouts of a stack of transformer blocks' parameters, and the conversion.

``nn.scan`` over blocks keeps one ``blocks`` entry whose arrays have a leading ``layers`` axis; a Python
loop of blocks keeps ``blocks_0`` ... ``blocks_{depth-1}``. The values are the same network either way
(tests/test_dit.py), so a model trained in one layout runs in the other after :func:`with_block_layout`.
``config`` is anything with ``scan_blocks`` and ``depth`` (:class:`vidiff.models.dit.DiTConfig`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

LAYERS_AXIS = {nn.PARTITION_NAME: "layers"}  # scanned blocks' leading axis, by its logical name


def with_block_layout(params: dict, config) -> dict:
    """``params`` with its blocks laid out as ``config.scan_blocks`` expects, converting if need be.

    E.g. trained unrolled (faster steps without remat), sampled scanned (an XL forward compiles in 8.5 s
    instead of 31 on an H200, experiments/PERF.md). Boxed parameters (``init``'s logical axis names) gain or
    lose the ``layers`` name with the axis; a tree already in ``config``'s layout is returned as it is.
    """
    unrolled = [f"blocks_{i}" for i in range(config.depth)]
    boxed = lambda x: isinstance(x, nn.meta.Partitioned)  # noqa: E731
    # Another depth is left as it is, for the caller's shape check to name (indexing past the end would clamp,
    # and stacking only the first blocks of a deeper tree would drop the rest).
    if config.scan_blocks and all(name in params for name in unrolled) and f"blocks_{config.depth}" not in params:
        rest = {k: v for k, v in params.items() if k not in unrolled}
        return {**rest, "blocks": jax.tree.map(_stacked, *(params[k] for k in unrolled), is_leaf=boxed)}
    stacked = params.get("blocks")
    if not config.scan_blocks and stacked is not None and {np.shape(x)[0] for x in jax.tree.leaves(stacked)} == {
            config.depth}:
        rest = {k: v for k, v in params.items() if k != "blocks"}
        return {**rest, **{name: jax.tree.map(functools.partial(_layer, i=i), stacked, is_leaf=boxed)
                           for i, name in enumerate(unrolled)}}
    return params


def _stacked(*layers):
    if isinstance(layers[0], nn.meta.Partitioned):
        return layers[0].add_axis(0, LAYERS_AXIS).replace_boxed(jnp.stack([x.value for x in layers]))
    return jnp.stack(layers)


def _layer(stacked, i: int):
    if isinstance(stacked, nn.meta.Partitioned):
        return stacked.remove_axis(0, LAYERS_AXIS).replace_boxed(stacked.value[i])
    return stacked[i]
