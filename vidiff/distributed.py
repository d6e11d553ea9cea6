"""Multi-host start-up: ``jax.distributed.initialize`` from a config section or the environment.

One process runs per host (or per GPU); every process runs the same program and
``initialize`` must come before anything touches a jax backend. The settings come from,
in order:

1. the config's optional ``distributed`` section: ``coordinator_address`` ("host:port"
   of process 0), ``num_processes``, ``process_id`` (and optionally ``local_device_ids``),
   or ``auto=True`` to let jax detect them (SLURM, Open MPI, Cloud TPU);
2. the environment: ``VIDIFF_DISTRIBUTED=auto``, else ``VIDIFF_COORDINATOR_ADDRESS``,
   ``VIDIFF_NUM_PROCESSES``, ``VIDIFF_PROCESS_ID`` (or jax's own ``JAX_COORDINATOR_ADDRESS`` /
   ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``).

Nothing set means a single process, and :func:`initialize` does nothing. Before joining, each
process logs one line naming itself, the coordinator and how long it waits for the others
(``distributed.initialization_timeout`` or ``VIDIFF_INITIALIZATION_TIMEOUT``, default jax's 300 s):
past it jax aborts the process with a DEADLINE_EXCEEDED that names neither. On CPU the
processes exchange data through gloo, so the multi-host paths run on one machine
(``tests/test_multihost.py``). After start-up: data is sliced per process by the
Grain pipeline, metrics and samples are written by process 0 (:func:`is_main`),
orbax saves and restores checkpoints collectively, and the few integers the processes
agree on at each step (:func:`every_process`) go host to host through jax.distributed's
key-value store.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

_FIELDS = ("coordinator_address", "num_processes", "process_id")
_SECTION = (*_FIELDS, "local_device_ids", "auto", "initialization_timeout")
DEFAULT_INITIALIZATION_TIMEOUT_S = 300  # jax's own default


def settings(config: Any = None, environ: Mapping[str, str] | None = None) -> dict | None:
    """The ``jax.distributed.initialize`` keyword arguments asked for, ``{}`` for auto-detection, or None."""
    environ = os.environ if environ is None else environ
    section = config.get("distributed") if config is not None and hasattr(config, "get") else None
    if section:
        section = dict(section)
        unknown = sorted(set(section) - set(_SECTION))
        if unknown:  # a misspelled field would otherwise be ignored, and its setting with it
            raise ValueError(f"distributed.{unknown[0]} is not a distributed field; use one of {list(_SECTION)}")
        if section.get("auto"):
            return {}
        given = {k: section.get(k) for k in (*_FIELDS, "local_device_ids") if section.get(k) is not None}
        if given:
            return _checked(given, "distributed.")
    if environ.get("VIDIFF_DISTRIBUTED", "").lower() == "auto":
        return {}
    for prefix in ("VIDIFF_", "JAX_"):
        given = {k: environ[prefix + k.upper()] for k in _FIELDS if environ.get(prefix + k.upper())}
        if given:
            return _checked(given, prefix, upper=True)
    return None


def _checked(given: dict, prefix: str, upper: bool = False) -> dict:
    name = lambda k: prefix + (k.upper() if upper else k)  # noqa: E731
    missing = [name(k) for k in _FIELDS if k not in given]
    if missing:
        raise ValueError(f"distributed: {', '.join(missing)} not set; give all of {[name(k) for k in _FIELDS]}")
    out = dict(given)
    for key in ("num_processes", "process_id"):
        try:
            out[key] = int(given[key])
        except (TypeError, ValueError):
            raise ValueError(f"{name(key)}={given[key]!r} must be an integer") from None
    if not 0 <= out["process_id"] < out["num_processes"]:
        raise ValueError(f"{name('process_id')}={out['process_id']} must be in [0, {name('num_processes')}="
                         f"{out['num_processes']})")
    if ":" not in str(out["coordinator_address"]):
        raise ValueError(f"{name('coordinator_address')}={out['coordinator_address']!r} must be host:port of process 0")
    return out


def initialization_timeout(config: Any = None, environ: Mapping[str, str] | None = None) -> int:
    """Seconds ``initialize`` waits for every process to join: ``distributed.initialization_timeout``, else
    ``VIDIFF_INITIALIZATION_TIMEOUT``, else jax's default."""
    environ = os.environ if environ is None else environ
    section = config.get("distributed") if config is not None and hasattr(config, "get") else None
    value = dict(section).get("initialization_timeout") if section else None
    field = "distributed.initialization_timeout"
    if value is None and environ.get("VIDIFF_INITIALIZATION_TIMEOUT"):
        value, field = environ["VIDIFF_INITIALIZATION_TIMEOUT"], "VIDIFF_INITIALIZATION_TIMEOUT"
    if value is None:
        return DEFAULT_INITIALIZATION_TIMEOUT_S
    try:
        seconds = None if isinstance(value, (bool, float)) else int(value)
    except (TypeError, ValueError):
        seconds = None
    if seconds is None or seconds < 1:
        raise ValueError(f"{field}={value!r} must be a whole number of seconds >= 1, e.g. 600")
    return seconds


def initialize(config: Any = None) -> bool:
    """Start the multi-process runtime if config or environment ask for it; True when running multi-process.

    Safe to call more than once. Must run before any jax computation or ``jax.devices()``.
    """
    if jax.distributed.is_initialized():
        return True
    kwargs = settings(config)
    if kwargs is None:
        return False
    timeout = initialization_timeout(config)
    # Printed (and flushed) first: if a process never joins, jax aborts this one after the timeout naming neither it
    # nor the coordinator, so this line is what says where to look.
    print(f"{_who(kwargs)}: waiting for all {_count(kwargs)} processes at {_where(kwargs)} (timeout {timeout} s: past "
          f"it jax aborts with DEADLINE_EXCEEDED if a process has not started or cannot reach that address)",
          file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "backend" in str(e):
            raise ValueError("distributed: jax was already used in this process; call "
                             "vidiff.distributed.initialize() first thing (vidiff train does)") from None
        if "DEADLINE_EXCEEDED" in str(e):  # jax 0.10 aborts instead; a version that raises gets one line
            raise RuntimeError(f"distributed: {_who(kwargs)} waited {timeout} s at {_where(kwargs)} and not all "
                               f"{_count(kwargs)} processes joined; check that each one started and can reach that "
                               f"address, or raise distributed.initialization_timeout") from None
        raise
    return True


# What the start-up lines name: the settings given, or what auto-detection (kwargs {}) leaves to jax.
def _who(kwargs: dict) -> str:
    return f"process {kwargs['process_id']} of {kwargs['num_processes']}" if kwargs else "this process"


def _count(kwargs: dict) -> str:
    return str(kwargs["num_processes"]) if kwargs else "the"


def _where(kwargs: dict) -> str:
    return kwargs["coordinator_address"] if kwargs else "the coordinator jax detects (SLURM, Open MPI, Cloud TPU)"


def is_main() -> bool:
    """True on the process that writes logs, metrics, samples and exports (process 0)."""
    return jax.process_index() == 0


def local_batch_size(global_batch: int) -> int:
    """Rows of a global batch each process loads; one-line error when they do not split evenly."""
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"data.batch_size={global_batch} must be divisible by the {count} processes; "
                         f"use a multiple of {count}")
    return global_batch // count


def every_process(values) -> np.ndarray:
    """``(process_count, n)`` int32: each process's ``values`` (n small ints), on every process. A collective:
    every process must call it, at the same point."""
    row = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return row
    client = _coordination_client()
    if client is None:  # processes not started by jax.distributed: the devices are the only shared channel
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(row[0])).reshape(jax.process_count(), -1)
    return _exchange(client, row[0], next(_calls))


# Long, because process 0 evaluates and writes samples alone while the others already wait here for the
# next step's agreement; a process that crashed or took another path is still named, not waited for forever.
EXCHANGE_TIMEOUT_S = 3600
_KEY = "vidiff/every_process"
_calls = itertools.count()  # every process calls in the same order, so the n-th calls share keys


def _coordination_client():
    """The coordination-service client ``jax.distributed.initialize`` made (orbax and grain use it too), or None."""
    from jax._src import distributed as jax_distributed

    return getattr(getattr(jax_distributed, "global_state", None), "client", None)


def _exchange(client, row: np.ndarray, call: int) -> np.ndarray:
    """``every_process`` through the coordination service's key-value store: host to host, so it does not
    queue behind (and wait for) the train step still running on the devices, as a device all-gather would."""
    me, count = jax.process_index(), jax.process_count()
    folder = f"{_KEY}/{call}"
    client.key_value_set(f"{folder}/{me}", ",".join(map(str, row.tolist())))
    found = dict(client.key_value_dir_get(folder))  # the processes that came first, in one round trip
    deadline = time.monotonic() + EXCHANGE_TIMEOUT_S
    for process in range(count):
        key = f"{folder}/{process}"
        if key not in found:
            found[key] = _wait_for(client, key, deadline, process, call)
    rows = [[int(v) for v in found[f"{folder}/{p}"].split(",") if v] for p in range(count)]
    if any(len(r) != row.size for r in rows):
        raise ValueError(f"every_process call {call}: the processes gave {[len(r) for r in rows]} values; every "
                         f"process must pass the same number")
    # Each process has set its key of this call, so each has read all of the call before: ours can go.
    if call:
        client.key_value_delete(f"{_KEY}/{call - 1}/{me}")
    return np.asarray(rows, np.int32).reshape(count, -1)


def _wait_for(client, key: str, deadline: float, process: int, call: int) -> str:
    timeout_ms = max(int((deadline - time.monotonic()) * 1000), 1)
    try:
        return client.blocking_key_value_get(key, timeout_ms)
    except Exception as error:  # jax's runtime error; only its text says it was the deadline
        if "DEADLINE_EXCEEDED" not in str(error):
            raise
    raise RuntimeError(f"processes did not agree at every_process call {call}: process {process} of "
                       f"{jax.process_count()} did not answer within {EXCHANGE_TIMEOUT_S} s (it stopped, hangs, or "
                       f"took another path); see its log") from None
