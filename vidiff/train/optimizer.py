"""Optimizer (optax AdamW), its learning-rate schedule, and the parameter EMA.

The optimizer config (``config.optim`` in experiment files) has the fields
``lr``, ``schedule`` (``cosine`` | ``constant``), ``warmup_steps``,
``end_lr_fraction``, ``b1``, ``b2``, ``eps``, ``weight_decay``, ``grad_clip``
(0 or None = off) and ``accumulate`` (micro-batches per step, whose gradients
``vidiff.train.state.make_train_step`` averages inside the step, so the schedule
here counts optimizer updates). ``check_optim`` refuses values that
cannot train (a learning rate <= 0, moments outside [0, 1), ...) in one line.
"""
from __future__ import annotations

import jax
import optax

from vidiff.checks import config_int, field_checker, finite_number

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


def check_optim(optim, name: str = "optim") -> None:
    """Raise a one-line ``ValueError`` naming ``<name>.<field>`` and the fix for the first unusable value."""
    need = field_checker(name, optim.get)
    need(finite_number(optim.lr) and optim.lr > 0, "lr", "use a finite learning rate > 0, e.g. 1e-4")
    need(optim.schedule in SCHEDULES, "schedule", f"use one of {', '.join(map(repr, SCHEDULES))}")
    need(config_int(optim.warmup_steps) and optim.warmup_steps >= 0, "warmup_steps", "use an int >= 0")
    need(finite_number(optim.end_lr_fraction) and optim.end_lr_fraction >= 0, "end_lr_fraction",
         "use a fraction >= 0 of optim.lr (e.g. 0.1)")
    for field in ("b1", "b2"):
        need(finite_number(optim[field]) and 0 <= optim[field] < 1, field, "use a number in [0, 1), e.g. 0.9 / 0.99")
    need(finite_number(optim.eps) and optim.eps > 0, "eps", "use a small number > 0, e.g. 1e-8")
    need(finite_number(optim.weight_decay) and optim.weight_decay >= 0, "weight_decay", "use a number >= 0 (0 = off)")
    need(optim.grad_clip is None or (finite_number(optim.grad_clip) and optim.grad_clip >= 0), "grad_clip",
         "use a global-norm limit > 0, or 0 / None to turn clipping off")
    need(config_int(optim.accumulate) and optim.accumulate >= 1, "accumulate",
         "use an int >= 1 (1 = no accumulation)")


DECAYED = ("kernel", "embedding")


def decay_mask(params):
    """Weight decay on dense and conv kernels and embeddings, told by the leaf's name: never on biases or
    norm scales, whose rank says nothing (attention biases are ``(heads, head_dim)``, scanned blocks stack a
    layer axis on every leaf)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in DECAYED, params)


def make_optimizer(optim, total_steps: int, *, networks: dict[str, int] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping over ``total_steps`` optimizer updates; returns ``(tx, schedule)``.

    ``networks``: top-level parameter groups trained side by side (a VAE and its discriminator), each mapped
    to the first update that trains it. Each gets its own clipping and AdamW state, so one network's gradient
    norm never scales down the other's update. Before its first update a network is left exactly as it is:
    no weight decay, and Adam's moments and bias correction start when its gradients do (counted through
    zeros, a discriminator switched on at step 5,000 would take ~3x too large first steps). It then follows
    the run's schedule from where the run is.
    """
    schedule = learning_rate_schedule(optim, total_steps)

    # The optimizer state's tree must not depend on values a resumed run may change (grad_clip, the
    # discriminator's start step): a placeholder stands in for clipping that is off, and side-by-side
    # networks are always wrapped, so a checkpoint restores whatever those values are now.
    def adamw(first_update: int | None = None):
        lr = schedule if not first_update else (lambda count: schedule(count + first_update))
        clip = optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip else optax.identity()  # 0 / None: off
        tx = optax.chain(clip, optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                           weight_decay=optim.weight_decay, mask=decay_mask))
        if first_update is None:
            return tx
        return optax.transforms.conditionally_mask(tx, lambda count: count >= first_update)

    if not networks:
        return adamw(), schedule
    return optax.multi_transform({name: adamw(int(first)) for name, first in networks.items()},
                                 lambda params: {k: k for k in params}), schedule


def ema_update(ema_params, params, decay: float):
    """``ema <- decay * ema + (1 - decay) * params``, kept in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)
