"""Batches prepared ahead of the step that trains on them (``data.prefetch_to_device``).

Why: making a DiT batch reads device values back to the host (the text encoder's embeddings of captions
it has not seen, the latent cache's VAE latents on a miss). On the main thread such a read queues behind
the step just dispatched, so the host waits for that step to end and the device then idles while the
host finishes the next batch. Here the main thread draws each host batch, in order (with several
processes :func:`vidiff.train.stopping.draw_batch` holds a collective, which every process must issue
in the same order), up to ``depth`` batches ahead of the step, and one worker thread turns each into
device arrays (``task.device_batch``), so its reads wait there while the main thread keeps dispatching.
``depth = 0`` draws and prepares each batch on the main thread when its step needs it.

What stays as without read-ahead:
- the values: the one worker prepares the batches in draw order, so caches fill in the same order and
  losses and parameters are bit-identical;
- the data position a checkpoint saves (:attr:`Prefetcher.position`): the iterator's state recorded
  right after each draw, that of the last batch a step consumed, not of the batches read ahead;
- errors: data that ran out, batches of different shapes (:class:`vidiff.train.stopping.Missing`), a
  draw's exception (a bad record) and the worker's own stay with their batch and are raised, with their
  type and message, when the loop reaches its step, after the checkpoints due before it;
- the time the main thread spends drawing (``waited(seconds)`` per draw, the log rows' ``data_wait_s``):
  drawing is where a step waits for the data pipeline's reading and decoding. Preparation is not counted:
  its reads of device values wait for the steps dispatched before it, not for the data. The main thread's
  wait for each prepared batch is told apart (``prepare_waited``): for a batch of shapes new to the run it
  holds compiles (the latent cache's VAE for a new clip shape), which the rates leave out
  (:class:`vidiff.train.metrics.CompileTimer`);
- counters: ``task.device_batch`` returns a batch's truncated captions beside it, and the loop adds them
  when it consumes the batch. The data's ``SkipLedger`` is not kept so: it counts the records the
  pipeline read, read-ahead included (Grain's reader threads already read ahead of the step).

The worker and the main thread share the task's host caches (the text encoder's, the latent cache):
the worker prepares under :attr:`Prefetcher.lock`, and the loop takes it to evaluate or save a cache.
:meth:`Prefetcher.close` cancels what was not started and joins the worker.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import threading
import time
from typing import Any, Callable

from vidiff.train.stopping import Missing


@dataclasses.dataclass
class _Drawn:
    """One drawn batch: its preparation, or why there is none, and the iterator's state after it."""

    future: concurrent.futures.Future | None = None
    missing: Missing | None = None
    error: Exception | None = None
    state: bytes | None = None


class _Position:
    """What Grain's checkpoint handler saves for an item that is not a ``grain.DatasetIterator``:
    ``get_state()`` as bytes. Here the JSON the handler writes for the real iterator, so a restore into
    it reads the same file."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _state_of(iterator) -> bytes:
    state = iterator.get_state()
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()


class Prefetcher:
    """The prepared batches of steps ``start + 1 .. steps`` in order, up to ``depth`` drawn ahead.

    ``draw(step)``: the host batch of the step after ``step``, or a ``Missing`` (main thread);
    ``prepare(raw)``: what the step takes (worker thread); ``fail(missing)`` raises its error;
    ``waited(seconds)``: told how long each draw took; ``prepare_waited(prepared, seconds)``: how long the
    main thread then waited for each prepared batch (its preparation on the main thread with ``depth = 0``).
    """

    def __init__(self, iterator, draw: Callable[[int], Any], prepare: Callable[[Any], Any],
                 fail: Callable[[Missing], None], *, depth: int, start: int, steps: int,
                 waited: Callable[[float], None] = lambda seconds: None,
                 prepare_waited: Callable[[Any, float], None] = lambda prepared, seconds: None):
        self.iterator, self.depth = iterator, int(depth)
        self._draw, self._prepare, self._fail, self._waited = draw, prepare, fail, waited
        self._prepare_waited = prepare_waited
        self._next, self._steps, self._ended = start, steps, False
        self._queue: collections.deque[_Drawn] = collections.deque()
        self.lock = threading.Lock()
        self._pool = None
        self._consumed = None
        if self.depth:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidiff-prefetch")
            self._consumed = _state_of(iterator)

    @property
    def position(self):
        """What a checkpoint saves as the data iterator: the position after the last consumed batch."""
        return self.iterator if not self.depth else _Position(self._consumed)

    def next(self):
        """The next step's prepared batch; raises its batch's error."""
        if not self.depth:
            raw = self._timed_draw(self._next)
            self._next += 1
            if isinstance(raw, Missing):
                self._fail(raw)
            return self._waited_for(lambda: self._prepared(raw))
        while len(self._queue) <= self.depth and self._next < self._steps and not self._ended:
            self._queue.append(self._draw_ahead())
        drawn = self._queue.popleft()
        if drawn.error is not None:
            raise drawn.error
        if drawn.missing is not None:
            self._fail(drawn.missing)
        prepared = self._waited_for(drawn.future.result)
        self._consumed = drawn.state
        return prepared

    def _waited_for(self, prepared: Callable[[], Any]):
        """``prepared()``, the main thread's wait for it told to ``prepare_waited`` with the batch."""
        began = time.perf_counter()
        batch = prepared()
        self._prepare_waited(batch, time.perf_counter() - began)
        return batch

    def _draw_ahead(self) -> _Drawn:
        step = self._next
        self._next += 1
        try:
            raw = self._timed_draw(step)
        except Exception as error:  # a bad record: raised at its own step, nothing drawn after it
            self._ended = True
            return _Drawn(error=error)
        if isinstance(raw, Missing):
            self._ended = True
            return _Drawn(missing=raw)
        state = _state_of(self.iterator)
        return _Drawn(future=self._pool.submit(self._prepared, raw), state=state)

    def _timed_draw(self, step: int):
        began = time.perf_counter()
        try:
            return self._draw(step)
        finally:
            self._waited(time.perf_counter() - began)

    def _prepared(self, raw):
        with self.lock:
            return self._prepare(raw)

    def close(self) -> None:
        """Drop the batches read ahead and join the worker (it finishes the one it is preparing)."""
        for drawn in self._queue:
            if drawn.future is not None:
                drawn.future.cancel()
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
