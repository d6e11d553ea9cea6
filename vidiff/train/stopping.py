"""How a training run stops before its last step, each way with its own message.

A signal: SIGTERM / SIGINT become a flag the loop checks between steps (with several processes, jax's
preemption sync point, which every process reaches at the same step), and the loop saves and exits; after the
last step, while the run exports, one is acted on once the export is whole (``ExportGuard``). A
non-finite step under ``on_nonfinite='stop'``. Data that runs out (a finite stream, skipped records) and,
with several processes, batches of different shapes: there the processes agree at every step on whether
each still has a batch, and on its shape, so all of them stop at the same step in one line.
``vidiff.train.loop`` calls these; the checks that can be made before compiling are in
``vidiff.train.preflight``.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import zlib
from typing import Any

import jax
import numpy as np

from vidiff import distributed
from vidiff.train.preflight import DataExhaustedError, NonFiniteError


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps.

    With several processes a signal seen by one alone would leave the others waiting in a
    collective, so there the flag comes from jax's preemption sync point instead, which
    every process reaches at the same step.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}
        self._multi = jax.process_count() > 1

    def __enter__(self):
        for sig in () if self._multi else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if self._multi and self.signal_name is None:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = "SIGTERM"
            except RuntimeError:  # no preemption service (processes not started by jax.distributed)
                self._multi = False
        return self.signal_name is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ExportGuard(StopRequest):
    """SIGTERM / SIGINT after the last step, while the run exports: noted and said at once, acted on when the
    export is whole. Left to Python, a KeyboardInterrupt raised meanwhile could be lost in a jax callback (the
    run then exported and exited 0, the key press unanswered). A second signal ends the process at once, which
    leaves no half-written file (exports are written whole) but maybe no export."""

    def __init__(self, log):
        super().__init__()
        self._log = log

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            os._exit(128 + signum)
        super()._handle(signum, frame)
        line = f"{self.signal_name}: finishing the export first ({self.signal_name} again: stop at once)"
        try:
            self._log(line)
        except RuntimeError:  # the signal came in the middle of a write to the same stream, which is not reentrant
            os.write(2, (line + "\n").encode())



def stop_if_nonfinite(state, *, stage, model: str, checkpointer, skipped_before: int, start: int) -> None:
    """With ``on_nonfinite='stop'``, a non-finite step of this run (more than the ``skipped_before`` steps the
    resumed checkpoint had skipped) ends it in one line."""
    if stage.on_nonfinite != "stop" or int(state.skipped) <= skipped_before:
        return
    bad = int(state.first_bad_step)  # the first ever: a resumed checkpoint's own may come before this run's
    where = f"step {bad + 1}" if bad >= start else f"a step after {start} (the run resumed with earlier skips)"
    checkpointer.close()
    raise NonFiniteError(
        f"non-finite loss or gradient at {where}; stopped. The last good checkpoint "
        f"({checkpointer.latest_step()}) is intact; set {model}_train.on_nonfinite='skip' to skip such steps"
    )


def skip_totals(ledger) -> dict:
    """The data's skip counts of every process (``SkipLedger.totals``); zeros without a ledger."""
    return ledger.totals() if ledger is not None else {"seen": 0, "skipped": {}, "bad": 0}


@dataclasses.dataclass(frozen=True)
class Missing:
    """Why there is no batch for the step after ``step``: the data ended (here or on another process), or,
    with ``rows`` (every process's batch signature), the processes' batches differ in shape."""

    step: int
    rows: Any = None


def draw_batch(iterator, step: int, config):
    """The next host batch, or a :class:`Missing` saying why there is none (:func:`fail` raises its error).

    Detecting is apart from failing so that a batch drawn ahead (:mod:`vidiff.train.prefetch`) fails only
    when the loop reaches its step. With several processes and finite data or several buckets they agree
    here (a small host-to-host exchange, :func:`vidiff.distributed.every_process`, so every process must
    draw in the same order, on its main thread) on whether each still has a batch, and on its shape. A
    process whose share ran out first (its records skipped more, or its buckets filled later) would
    otherwise exit alone and leave the others waiting forever at the step's first collective; batches of
    different buckets cannot form one global batch, so they fail in one line on every process.
    """
    try:
        batch = next(iterator)
    except StopIteration:
        batch = None
    ended = batch is None
    buckets = config.data.get("buckets") or ()
    if jax.process_count() > 1 and (config.data.num_epochs is not None or len(buckets) > 1):
        rows = distributed.every_process([ended, *_batch_signature(batch)])
        ended = bool(rows[:, 0].any())
        if not ended and len({tuple(row[1:]) for row in rows}) > 1:
            return Missing(step, rows)
    # It ended here or on another process: every process stops at this same step.
    return Missing(step) if ended else batch


def fail(missing: Missing, stage, model: str, checkpointer, ledger, config):
    """Raise ``missing``'s one-line error, after pending checkpoint saves have landed."""
    checkpointer.close()
    step = missing.step
    if missing.rows is not None:
        buckets = config.data.get("buckets") or ()
        shapes = ", ".join(f"process {i} {'x'.join(map(str, row[2:]))}" for i, row in enumerate(missing.rows))
        raise ValueError(
            f"at step {step + 1} the processes' batches differ in shape (clips of frames x height x width: "
            f"{shapes}): each clip's own shape picked its bucket among data.buckets={list(buckets)}; use one "
            f"bucket (data.buckets=None), one process, or fixed-size shards from `vidiff prepare`")
    skips = skip_totals(ledger)
    skipped = (f", {skips['bad']} skipped: " + ", ".join(f"{k}={v}" for k, v in skips["skipped"].items())
               if skips["bad"] else "")
    latest = checkpointer.latest_step()
    kept = f"checkpoint {latest} is intact" if latest else "no checkpoint was saved"
    raise DataExhaustedError(
        f"data ran out after step {step} of {model}_train.steps={stage.steps} ({skips['seen']} records read"
        f"{skipped}; data.num_epochs={config.data.num_epochs}); {kept}; set data.num_epochs=None or "
        f"{model}_train.steps<={step}"
    )


def _batch_signature(batch) -> list[int]:
    """What every process's batch must share: a checksum of all its array shapes, then the clips' frames,
    height and width (for the error message). Zeros for no batch."""
    if batch is None:
        return [0, 0, 0, 0]
    shapes = sorted((key, tuple(np.shape(value))) for key, value in batch.items())
    clips = batch["video"] if "video" in batch else batch.get("latents")
    dims = [*np.shape(clips)[1:4], 0, 0, 0][:3] if clips is not None else [0, 0, 0]
    return [zlib.crc32(repr(shapes).encode()) & 0x7FFFFFFF, *dims]  # int32, as every_process carries it
