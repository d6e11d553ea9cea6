"""Batching: stacking records into batches, and bucketed batching with exact resume.

``batch_records`` stacks arrays along a new first axis and keeps text fields
(``caption``, ``id``, any string) as numpy object arrays of Python ``str``.

``BucketBatch`` emits a batch as soon as one bucket holds ``batch_size``
records, so every batch has one shape. Its iterator state stays small (no
frames in it): the parent's state from just before the oldest record still
waiting in a bucket, how many records were pulled since, and which of those
are still waiting. ``set_state`` replays that stretch of the parent to refill
the buckets, so a restored iterator continues bitwise identically.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import grain
import numpy as np


def _stack(values: Sequence[Any]):
    first = values[0]
    if isinstance(first, dict):
        return {key: _stack([v[key] for v in values]) for key in first}
    if isinstance(first, (str, bytes)) or first is None:
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out
    return np.stack([np.asarray(v) for v in values])


def batch_records(records: Sequence[dict]) -> dict:
    """Stack a list of records (same keys, same shapes) into one batch dict."""
    return _stack(list(records))


class _BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, drop_remainder: bool, batch_fn: Callable, bucket_key: str):
        super().__init__(parent)
        self._batch_size, self._drop_remainder = batch_size, drop_remainder
        self._batch_fn, self._bucket_key = batch_fn, bucket_key
        self._reset()

    def _reset(self):
        # Every pulled record gets a sequence number; waiting records keep the
        # parent state from just before they were pulled, so the oldest one's
        # state is where a replay must start.
        self._waiting: dict[int, list[tuple[int, Any, dict]]] = {}
        self._next_seq = 0
        self._exhausted = False

    def _pull(self):
        state_before = copy.deepcopy(self._parent.get_state())
        record = next(self._parent)
        seq = self._next_seq
        self._next_seq += 1
        return seq, state_before, record

    def _file(self, seq, state_before, record):
        bucket = int(record[self._bucket_key])
        self._waiting.setdefault(bucket, []).append((seq, state_before, record))
        return bucket

    def __next__(self):
        while not self._exhausted:
            try:
                seq, state_before, record = self._pull()
            except StopIteration:
                self._exhausted = True
                break
            bucket = self._file(seq, state_before, record)
            if len(self._waiting[bucket]) == self._batch_size:
                return self._emit(bucket)
        # The parent is done: flush partial buckets in bucket order.
        for bucket in sorted(self._waiting):
            if self._waiting[bucket] and not self._drop_remainder:
                return self._emit(bucket)
        raise StopIteration

    def _emit(self, bucket):
        entries = self._waiting.pop(bucket)
        return self._batch_fn([record for _, _, record in entries])

    def get_state(self) -> dict:
        waiting = sorted((seq, state) for entries in self._waiting.values() for seq, state, _ in entries)
        if not waiting:
            return {"parent": copy.deepcopy(self._parent.get_state()), "replay": 0, "waiting": []}
        anchor_seq, anchor_state = waiting[0][0], waiting[0][1]
        return {
            "parent": copy.deepcopy(anchor_state),
            "replay": self._next_seq - anchor_seq,
            "waiting": [seq - anchor_seq for seq, _ in waiting],
        }

    def set_state(self, state: dict) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._reset()
        waiting = set(state["waiting"])
        for offset in range(state["replay"]):
            seq, state_before, record = self._pull()
            if offset in waiting:
                self._file(seq, state_before, record)


class BucketBatch(grain.IterDataset):
    """Batches records of the same ``record[bucket_key]`` only; checkpointable (see module docstring)."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, *, drop_remainder: bool = True,
                 batch_fn: Callable[[Sequence[dict]], Any] = batch_records, bucket_key: str = "bucket"):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._batch_size, self._drop_remainder = batch_size, drop_remainder
        self._batch_fn, self._bucket_key = batch_fn, bucket_key

    def __iter__(self):
        return _BucketBatchIterator(self._parent.__iter__(), self._batch_size, self._drop_remainder,
                                    self._batch_fn, self._bucket_key)

    def __str__(self):
        return f"BucketBatch(batch_size={self._batch_size}, drop_remainder={self._drop_remainder})"
