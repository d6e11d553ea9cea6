"""Optimizer (optax AdamW), its learning-rate schedule, and the parameter EMA.

The optimizer config (``config.optim`` in experiment files) has the fields
``lr``, ``schedule`` (``cosine`` | ``constant``), ``warmup_steps``,
``end_lr_fraction``, ``b1``, ``b2``, ``eps``, ``weight_decay``, ``grad_clip``
(0 = off) and ``accumulate`` (gradient accumulation over that many micro-steps,
through ``optax.MultiSteps``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``optim.lr`` then cosine decay to ``lr * end_lr_fraction`` (or constant)."""
    warmup = int(optim.warmup_steps)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=optim.lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=optim.lr * optim.end_lr_fraction,
        )
    if optim.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), optax.constant_schedule(optim.lr)], [warmup]
        )
    raise ValueError(f"optim.schedule={optim.schedule!r} is unknown; use one of {SCHEDULES}")


def decay_mask(params):
    """Weight decay on matrices and conv kernels only: not on biases, norm scales or embeddings' 1-D stats."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and optional accumulation; returns ``(tx, schedule)``."""
    if optim.accumulate < 1:
        raise ValueError(f"optim.accumulate={optim.accumulate} must be >= 1 (1 = no accumulation)")
    schedule = learning_rate_schedule(optim, total_steps)
    parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    parts.append(
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)
    )
    tx = optax.chain(*parts)
    if optim.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(optim.accumulate))
    return tx, schedule


def ema_update(ema_params, params, decay: float):
    """``ema <- decay * ema + (1 - decay) * params``, kept in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)
