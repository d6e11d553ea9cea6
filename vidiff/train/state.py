"""Train state and the one jitted train step every vidiff model trains with.

``TrainState`` holds the step, float32 parameters, optimizer state, the EMA of
the parameters, the base RNG key (as raw ``uint32`` data so orbax saves it
like any array) and counters for skipped non-finite steps. It is created
sharded: ``jax.jit`` with ``out_shardings`` from the logical axis names, so no
device ever holds a full unsharded copy.

A *task* supplies ``loss_fn(params, batch, rng, frozen, step) -> (loss, metrics)``;
``frozen`` carries whatever the loss needs but never trains (a frozen VAE for
the DiT); ``step`` counts the optimizer updates so far, skipped steps left out,
as the optimizer's schedules and a discriminator's start count them. The step
never syncs with the host: a non-finite loss or gradient leaves the state
unchanged, is counted, and the first such step is recorded so the loop can stop
(or carry on) at its next log line, naming the step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from vidiff import parallel
from vidiff.train.optimizer import ema_update

# From this many random-number draws in its init program up, an accelerator's state is built faster on the
# host's CPU: each draw is a kernel the GPU compiler handles on its own. Measured on an H200
# (experiments/PERF.md), an XL DiT's state: initialised unscanned, 259 draws, 25-31 s on the host against 71-89
# on the GPU; scanned, 16 draws (a loop body's count once), 16.8 against 6.7 s. Lines through those points
# (~0.3 s a draw on the GPU, ~0.04 on the host) cross near 55 draws; nothing between was measured.
HOST_INIT_MIN_RANDOM_DRAWS = 64
# Where a state is built, by name (a stage's init_on, bench_dit.py's --init-on) -> create_state(on_host=).
INIT_ON = {"auto": None, "host": True, "device": False}


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped steps included)
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32 key data; per-step keys are fold_in(key, step)
    skipped: jax.Array  # int32: steps whose loss or gradient was not finite
    first_bad_step: jax.Array  # int32: the first such step, -1 if none


def _init_fn(init_params: Callable, tx: optax.GradientTransformation) -> Callable:
    def init(key):
        params = init_params(key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            # float32 whatever the parameters' dtype: bf16 would round away the EMA's small increments
            ema_params=jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                                    params),
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            skipped=jnp.zeros((), jnp.int32),
            first_bad_step=jnp.full((), -1, jnp.int32),
        )

    return init


def _unboxed(tree):
    """``tree`` with logical-axis boxes removed, without the sharding constraints ``nn.meta.unbox`` adds."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def abstract_state(init_params: Callable, tx: optax.GradientTransformation, mesh, rules=parallel.LOGICAL_RULES):
    """``(state of jax.ShapeDtypeStruct carrying shardings, state_shardings)``: nothing is allocated.

    What ``vidiff plan`` compiles the step against, and the target for restoring a checkpoint.
    """
    abstract = jax.eval_shape(_init_fn(init_params, tx), jax.random.key(0))
    logical = nn.get_partition_spec(abstract)
    shardings = parallel.logical_to_sharding(logical, mesh, rules)
    unboxed = _unboxed(abstract)  # shapes: no sharding constraint to apply, though a mesh may be active
    parallel.check_divisible(unboxed, logical, mesh, rules)
    shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
    return shapes, shardings


def create_state(init_params: Callable, tx: optax.GradientTransformation, seed: int, mesh, rules=parallel.LOGICAL_RULES,
                 *, on_host: bool | None = False):
    """Build a sharded ``TrainState`` and return ``(state, state_shardings)``.

    ``init_params(key)`` returns parameters boxed with logical axis names
    (``model.init(...)["params"]``); it is traced once abstractly to derive the
    shardings, then run under ``jit`` with those ``out_shardings``. ``on_host``:
    see :func:`build_sharded`; None decides by :func:`host_init_pays`.
    """
    _, shardings = abstract_state(init_params, tx, mesh, rules)
    if on_host is None:
        on_host = host_init_pays(init_params)
    return build_sharded(_init_fn(init_params, tx), jax.random.key(seed), shardings, mesh, on_host=on_host), shardings


def host_init_pays(init_params: Callable) -> bool:
    """Whether :func:`build_sharded` should build ``init_params(key)`` and its state on the host: one process
    on accelerators, a CPU backend to build with, and at least ``HOST_INIT_MIN_RANDOM_DRAWS`` random draws."""
    return (jax.default_backend() != "cpu" and jax.process_count() == 1 and host_cpu() is not None
            and random_draws(init_params, jax.random.key(0)) >= HOST_INIT_MIN_RANDOM_DRAWS)


def random_draws(fn: Callable, *args) -> int:
    """How many random-number draws ``fn(*args)``'s program holds (traced, not run; a loop body's count once)."""
    def count(jaxpr) -> int:
        return sum((eqn.primitive.name == "random_bits") + sum(map(count, _subjaxprs(eqn.params)))
                   for eqn in jaxpr.eqns)
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _subjaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr wraps its Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def build_sharded(init: Callable, key: jax.Array, shardings, mesh, *, on_host: bool = False):
    """``init(key)`` (a tree, possibly boxed with logical axis names), unboxed and placed with ``shardings``.

    By default it runs under ``jit`` on ``mesh`` with those ``out_shardings``, so no device ever holds a
    full copy. ``on_host=True`` runs it on the host's CPU backend instead and copies the result onto the
    mesh: the same values (threefry is one function on every backend, and the same variant is used either
    way), a different compiler. On a GPU an unscanned XL DiT's train state, one program with ~750
    random-number kernels, took 71-89 s to build (experiments/PERF.md); XLA:CPU compiles the same
    program in ~18 s on two cores. It needs one process and host memory for the whole tree.
    """
    # Partitionable threefry lets accelerators generate each shard locally, but XLA:CPU
    # compiles it ~5x slower (15 s for the tiny VAE); the CPU gains nothing from it.
    partitionable = jax.threefry_partitionable(jax.default_backend() != "cpu")
    if not on_host:
        with jax.set_mesh(mesh), partitionable:
            return jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(key)
    if jax.process_count() > 1:
        raise ValueError(f"on_host=True builds the whole tree in one process's memory; with "
                         f"{jax.process_count()} processes build it on the mesh (on_host=False)")
    cpu = host_cpu()
    if cpu is None:
        raise ValueError(f"on_host=True needs JAX's CPU backend, which JAX_PLATFORMS="
                         f"{jax.config.jax_platforms!r} leaves out; add cpu to it or use on_host=False")
    with partitionable:  # no mesh on the host: no sharding constraints to apply
        host = jax.jit(lambda k: _unboxed(init(k)))(jax.device_put(key, cpu))
    return jax.device_put(host, shardings)


def host_cpu():
    """The host's first CPU device, or None where ``JAX_PLATFORMS`` leaves the CPU backend out."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, *, ema_decay: float,
                    accumulate: int = 1, networks: dict | None = None) -> Callable:
    """``step(state, batch, frozen) -> (state, metrics)``; jit it with shardings and donate ``state``.

    ``accumulate`` > 1 splits the batch into that many micro-batches, run one after another (``lax.scan``)
    with their gradients averaged before the one optimizer update: activations take 1/k of the memory,
    while the update, the learning-rate schedule, the EMA and the step count stay those of the whole batch.

    The metrics' ``loss`` is the loss_fn's own ``metrics["loss"]`` where it reports one (a VAE's generator
    side, without its discriminator's loss), else the loss optimized. ``grad_norm`` is the gradients' global
    norm before clipping; with ``networks`` (top-level parameter groups clipped apart, the first the model
    trained) one per network: ``grad_norm`` for the first, ``grad_norm_<name>`` for each other.
    """
    if not (isinstance(accumulate, int) and accumulate >= 1):
        raise ValueError(f"accumulate={accumulate!r} must be an int >= 1 (1 = no accumulation)")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, frozen):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # The loss's step is the updates' count: a loss term switched on at step n (the GAN's) then starts with
        # the discriminator's optimizer, which counts updates, not the steps skipped as non-finite.
        updates_so_far = state.step - state.skipped
        if accumulate == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, rng, frozen, updates_so_far)
        else:
            (loss, metrics), grads = _accumulated_grads(grad_fn, accumulate, state.params, batch, rng, frozen,
                                                        updates_so_far)
        norms = _grad_norms(grads, networks)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(jnp.stack(list(norms.values()))))
        # A bad step keeps the previous parameters: the last good state stays intact.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema_params=keep(ema_update(state.ema_params, params, _ema_decay(ema_decay, updates_so_far)),
                            state.ema_params),
            skipped=state.skipped + (~finite).astype(jnp.int32),
            first_bad_step=jnp.where((state.first_bad_step < 0) & ~finite, state.step, state.first_bad_step),
        )
        return new_state, {"loss": loss, **metrics, **norms}

    return step


def _grad_norms(grads, networks: dict | None) -> dict:
    """Each network's gradient norm (before clipping, which is each network's own), named as the log rows
    name them: one norm over both would mostly say how large the discriminator's gradients are."""
    if not networks:
        return {"grad_norm": optax.tree.norm(grads)}
    main, *others = networks
    return {"grad_norm": optax.tree.norm(grads[main]),
            **{f"grad_norm_{name}": optax.tree.norm(grads[name]) for name in others}}


def micro_batches(batch, k: int):
    """``(B, ...)`` leaves -> ``(k, B / k, ...)``. Micro-batch j takes rows j, j + k, ...: every device keeps
    its own rows of a row-sharded batch (given B / k divides over the data devices), so nothing moves."""
    rows = {x.shape[0] for x in jax.tree.leaves(batch)}
    if any(n % k for n in rows):
        raise ValueError(f"a batch of {min(rows)} rows does not split into accumulate={k} micro-batches; "
                         f"use a batch size divisible by {k}")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def _accumulated_grads(grad_fn: Callable, k: int, params, batch, rng, frozen, step):
    """``((loss, metrics), grads)`` averaged over ``k`` micro-batches, each with its own key."""
    def one(total, xs):
        index, micro = xs
        (loss, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, index), frozen, step)
        return jax.tree.map(jnp.add, total, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, (losses, metrics) = jax.lax.scan(one, zeros, (jnp.arange(k), micro_batches(batch, k)))
    mean = lambda x: jnp.mean(x, axis=0)  # noqa: E731
    return (mean(losses), jax.tree.map(mean, metrics)), jax.tree.map(lambda g: g / k, total)


def skipped_steps_clause(state: TrainState) -> str:
    """``"; 3 non-finite steps were skipped, the first at step 7"`` (empty when none were), for error lines."""
    skipped, first = int(state.skipped), int(state.first_bad_step)
    return f"; {skipped} non-finite steps were skipped, the first at step {first + 1}" if skipped else ""


def _ema_decay(decay: float, updates):
    """EMA warm-up ``min(decay, (1 + updates) / (10 + updates))``, ``updates`` the optimizer updates before this
    one: early on the average follows the parameters closely instead of staying near the random init for
    ~1/(1 - decay) steps. Skipped steps do not count, as for the schedule: they moved no parameter."""
    return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


def jit_train_step(step: Callable, state_shardings, batch_shardings, frozen_shardings, mesh, *,
                   keep_unused: bool = False):
    """``jax.jit`` the step with explicit in/out shardings and the state donated. ``keep_unused``: count inputs
    the step does not read (a frozen VAE's decoder) among its arguments, as ``vidiff plan`` must: they are on
    the device all the same."""
    metrics_sharding = parallel.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, metrics_sharding),
        donate_argnums=(0,),
        keep_unused=keep_unused,
    )
