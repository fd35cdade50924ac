"""The harvest's reading-ahead and writing-behind threads: order, bounded depth, errors handed to the caller."""

from __future__ import annotations

import threading

import pytest

from lit_sae.data.overlap import BackgroundWorker, Prefetch


def test_prefetch_keeps_order_and_raises_the_source_error():
    with Prefetch(iter(range(50)), depth=3) as items:
        assert list(items) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        with Prefetch(broken()) as items:
            list(items)


def test_prefetch_reads_at_most_depth_ahead_and_stops_on_early_exit():
    produced = []

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    with Prefetch(source(), depth=2) as items:
        assert next(items) == 0
    # consumer took 1; the queue holds 2 more; the thread may hold one it could not put: at most 4 made
    assert len(produced) <= 4


def test_worker_runs_in_order_and_finishes_submitted_work_when_the_caller_fails():
    done = []
    gate = threading.Event()
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWorker(depth=2) as w:
            w.submit(lambda: (gate.wait(5), done.append(0)))
            w.submit(done.append, 1)
            gate.set()
            raise KeyboardInterrupt
    assert done == [0, 1]  # what was handed over before the interruption is stored, in order


def test_worker_error_reaches_the_caller_and_skips_later_calls():
    done = []

    def fail():
        raise ValueError("bad shard")

    with pytest.raises(ValueError, match="bad shard"):
        with BackgroundWorker(depth=1) as w:
            w.submit(fail)
            for i in range(5):
                w.submit(done.append, i)  # may raise here already, or at the end of the block
    assert done == []
