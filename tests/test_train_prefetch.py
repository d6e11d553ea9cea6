"""Batches prepared ahead (vidiff.train.prefetch): order, the data position a checkpoint saves, errors at
their own step, the main thread drawing, no thread left behind. Fast: stub data and preparation."""
import json
import threading
import time

import pytest

from vidiff.train import prefetch
from vidiff.train.stopping import Missing


class Numbers:
    """An iterator with Grain's ``get_state`` (a dict); ``bad`` positions raise like a bad record."""

    def __init__(self, count, bad=()):
        self.position, self.count, self.bad = 0, count, set(bad)
        self.drawn_on = []

    def __next__(self):
        self.drawn_on.append(threading.current_thread().name)
        if self.position >= self.count:
            raise StopIteration
        self.position += 1
        if self.position in self.bad:
            raise ValueError(f"record {self.position} is bad; fix the file")
        return self.position

    def get_state(self):
        return {"position": self.position}


def _draw(numbers):
    def draw(step):
        try:
            return next(numbers)
        except StopIteration:
            return Missing(step)
    return draw


def _fail(missing):
    raise RuntimeError(f"data ran out after step {missing.step}")


def _prefetcher(numbers, depth, prepare=lambda raw: raw * 10, steps=100):
    return prefetch.Prefetcher(numbers, _draw(numbers), prepare, _fail, depth=depth, start=0, steps=steps)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_batches_come_in_order_prepared_on_a_worker_and_drawn_on_the_main_thread(depth):
    numbers, threads = Numbers(10), []

    def prepare(raw):
        threads.append(threading.current_thread().name)
        return raw * 10

    with _prefetcher(numbers, depth, prepare) as batches:
        assert [batches.next() for _ in range(5)] == [10, 20, 30, 40, 50]
        assert numbers.position == 5 + depth  # up to `depth` drawn ahead of the consumed batch
    assert set(numbers.drawn_on) == {threading.current_thread().name}  # a multi-process draw holds a collective
    assert all(name.startswith("vidiff-prefetch") for name in threads) if depth else set(threads) == {"MainThread"}


def test_nothing_is_drawn_past_the_last_step():
    numbers = Numbers(10)
    with _prefetcher(numbers, 2, steps=3) as batches:
        assert [batches.next() for _ in range(3)] == [10, 20, 30]
        assert numbers.position == 3


def test_the_saved_position_is_that_of_the_last_consumed_batch_as_grain_writes_it():
    numbers = Numbers(10)
    with _prefetcher(numbers, 2) as batches:
        batches.next()
        batches.next()
        state = batches.position.get_state()
    assert numbers.position == 4  # two read ahead...
    assert state == json.dumps({"position": 2}, indent=4).encode()  # ...but a resume starts after batch 2
    with _prefetcher(numbers, 0) as batches:
        assert batches.position is numbers  # without read-ahead, the iterator itself


@pytest.mark.parametrize("depth", [0, 2])
def test_errors_are_raised_at_their_own_step_with_their_type_and_message(depth):
    with _prefetcher(Numbers(10, bad={3}), depth) as batches:
        assert [batches.next() for _ in range(2)] == [10, 20]  # drawn before the bad record, consumed first
        with pytest.raises(ValueError, match=r"^record 3 is bad; fix the file$"):
            batches.next()
    with _prefetcher(Numbers(2), depth) as batches:
        assert [batches.next() for _ in range(2)] == [10, 20]
        with pytest.raises(RuntimeError, match=r"^data ran out after step 2$"):  # failed only when step 3 needs it
            batches.next()

    def prepare(raw):
        if raw == 2:
            raise KeyError("batch: 'video' is missing")
        return raw

    with _prefetcher(Numbers(10), depth, prepare) as batches:
        assert batches.next() == 1
        with pytest.raises(KeyError, match="batch: 'video' is missing"):  # the worker's own, unchanged
            batches.next()


def test_close_cancels_what_was_read_ahead_and_joins_the_worker():
    started = []

    def prepare(raw):
        started.append(raw)
        time.sleep(0.2)
        return raw

    batches = _prefetcher(Numbers(10), 2, prepare)
    batches.next()
    batches.close()
    assert len(started) <= 2  # batch 3 was cancelled, or not started before close
    assert not [t for t in threading.enumerate() if t.name.startswith("vidiff-prefetch")]


def test_the_worker_waits_while_the_main_thread_holds_the_lock():
    """The loop holds it to evaluate or save a cache: the host caches are not shared meanwhile."""
    order = []

    def prepare(raw):
        order.append(f"prepare {raw}")
        return raw

    with _prefetcher(Numbers(10), 2, prepare) as batches:
        batches.next()  # batches 2 and 3 drawn
        time.sleep(0.3)  # and prepared
        with batches.lock:
            assert batches.next() == 2  # draws batch 4, whose preparation waits
            time.sleep(0.2)
            order.append("evaluated")
        assert [batches.next() for _ in range(2)] == [3, 4]
    assert order[:5] == ["prepare 1", "prepare 2", "prepare 3", "evaluated", "prepare 4"]


@pytest.mark.parametrize("depth", [0, 2])
def test_each_draw_says_how_long_it_took_and_preparing_is_not_counted(depth):
    """The log rows' data_wait_s: the main thread drawing from the data pipeline. Preparing waits for the device
    (a DiT's batches read values back behind the steps dispatched), so it is not the data's wait. The main
    thread's wait for each prepared batch is told apart, with the batch (a new shape's holds compiles)."""
    class Slow(Numbers):
        def __next__(self):
            time.sleep(0.05)
            return super().__next__()

    numbers, waits = Slow(10), []

    def prepare(raw):
        time.sleep(0.1)
        return raw

    prepared = []
    with prefetch.Prefetcher(numbers, _draw(numbers), prepare, _fail, depth=depth, start=0, steps=3,
                             waited=waits.append, prepare_waited=lambda *told: prepared.append(told)) as batches:
        assert [batches.next() for _ in range(3)] == [1, 2, 3]
    assert len(waits) == 3 and all(0.05 <= w < 0.14 for w in waits), waits  # with preparing: >= 0.15
    assert [batch for batch, _ in prepared] == [1, 2, 3] and all(seconds >= 0 for _, seconds in prepared)
    if not depth:  # prepared on the main thread: the whole preparation is waited for
        assert all(seconds >= 0.1 for _, seconds in prepared), prepared
