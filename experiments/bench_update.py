"""What the parameter update costs: clipping, AdamW, the EMA and the non-finite guard, apart from the model.

    PYTHONPATH=. python3 experiments/bench_update.py --params 835e6            # XL's parameter count, on a GPU
    PYTHONPATH=. python experiments/bench_update.py --params 40e6              # CPU

The update is memory-bound work over every parameter, the same at any sequence
length, so it weighs most on short sequences (64 x 256 tokens). The "model"
here is a loss whose gradient is one elementwise pass (``sum(w * c)``), so a
step is almost all update. Variants of the step in ``vidiff.train.state``
(``make_train_step``: optax clipping + AdamW from ``make_optimizer``, the EMA,
then the guard that keeps the old state after a non-finite loss or gradient):

- ``where``: the guard as ``jnp.where(finite, new, old)`` per leaf (what vidiff does);
- ``cond``: the guard as ``lax.cond(finite, update, keep)``;
- ``no_guard``: no guard (a lower bound for ``where``);
- ``no_ema``: the ``where`` guard without the EMA;
- ``adamw``: AdamW alone, no clipping, EMA or guard: the peer's optimizer work, as
  ``bench_dit.py --update adamw`` times it (the goal rows); ``where`` less ``adamw`` is
  what vidiff's full step adds to it.

Each prints one JSON line: step_ms (median), grad_ms (the gradient alone),
update_ms (the difference), copy_GBps (a donated scale-by-constant pass over
the parameters, 8 bytes each), update_bytes_per_param (update_ms x copy_GBps /
params) and the number of fusions in the compiled step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp
import optax

from vidiff.train.optimizer import ema_update, make_optimizer
from vidiff.train.state import TrainState, _ema_decay

VARIANTS = ("where", "cond", "no_guard", "no_ema", "adamw")
OPTIM = types.SimpleNamespace(lr=1e-4, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, b1=0.9, b2=0.999,
                              eps=1e-8, weight_decay=0.01, grad_clip=1.0, accumulate=1)


def loss_fn(params, scale):
    return sum(jnp.sum(w * scale) for w in jax.tree.leaves(params)) * 1e-6


def make_step(variant: str, tx):
    def step(state, scale):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, scale)
        grad_norm = optax.tree.norm(grads) if variant != "adamw" else jnp.zeros(())  # adamw: no norm pass
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema_params if variant == "no_ema" else ema_update(
                state.ema_params, params, _ema_decay(0.999, state.step))
            return state.replace(params=params, opt_state=opt_state, ema_params=ema)

        if variant == "adamw":  # tx without clipping (main); no EMA, no guard
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        elif variant == "cond":
            new = jax.lax.cond(finite, update, lambda s: s, state)
        elif variant == "no_guard":
            new = update(state)
        else:
            updated = update(state)
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
            new = state.replace(params=keep(updated.params, state.params),
                                opt_state=keep(updated.opt_state, state.opt_state),
                                ema_params=keep(updated.ema_params, state.ema_params))
        return new.replace(step=state.step + 1), {"loss": loss, "grad_norm": grad_norm}

    return jax.jit(step, donate_argnums=(0,))


def make_params(count: int, leaves: int) -> dict:
    rows = max(1, count // leaves // 1024)
    keys = jax.random.split(jax.random.key(0), leaves)
    return {f"w{i}": 0.01 * jax.random.normal(k, (rows, 1024), jnp.float32) for i, k in enumerate(keys)}


def fresh_state(params, tx) -> TrainState:
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=jax.random.key_data(jax.random.key(1)),
                      skipped=jnp.zeros((), jnp.int32), first_bad_step=jnp.full((), -1, jnp.int32))


def median_ms(run, steps: int) -> float:
    run()  # compile / warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=40e6, help="parameter count (float32)")
    p.add_argument("--leaves", type=int, default=20, help="parameter arrays it is split into")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    tx, _ = make_optimizer(OPTIM, 1000)
    # The same optimizer state tree without clipping (make_optimizer keeps a placeholder in its place).
    tx_adamw, _ = make_optimizer(types.SimpleNamespace(**{**vars(OPTIM), "grad_clip": 0.0}), 1000)
    params = make_params(int(args.params), args.leaves)
    count = sum(x.size for x in jax.tree.leaves(params))
    scale = jnp.float32(1.0)
    grad = jax.jit(jax.grad(loss_fn))
    grad_ms = median_ms(lambda: jax.block_until_ready(grad(params, scale)), args.steps)
    copy = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0001, p), donate_argnums=(0,))
    held = {"p": jax.tree.map(jnp.copy, params)}

    def copy_pass():
        held["p"] = jax.block_until_ready(copy(held["p"]))

    copy_gbps = 8 * count / median_ms(copy_pass, args.steps) / 1e6
    records = []
    for variant in variants:
        step = make_step(variant, tx_adamw if variant == "adamw" else tx)
        holder = {"state": fresh_state(params, tx)}
        fusions = step.lower(holder["state"], scale).compile().as_text().count(" fusion(")

        def run():
            holder["state"], metrics = step(holder["state"], scale)
            jax.block_until_ready((holder["state"], metrics))

        step_ms = median_ms(run, args.steps)
        update_ms = step_ms - grad_ms
        record = dict(bench="update", variant=variant, params=count, leaves=args.leaves, step_ms=step_ms,
                      grad_ms=grad_ms, update_ms=update_ms, copy_GBps=copy_gbps,
                      update_bytes_per_param=update_ms * copy_gbps * 1e6 / count, fusions=fusions,
                      backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind)
        print(json.dumps(record), flush=True)
        records.append(record)
    return records


if __name__ == "__main__":
    main()
