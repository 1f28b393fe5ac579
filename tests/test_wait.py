"""``fastmq.wait(queues, timeout)``: the ready queues, as soon as one is.

Both backends; the wake-ups come from other processes (real producers), every
wait is bounded and every child is reaped in ``finally``.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

import fastmq


def _put_later(name, delay, item):
    time.sleep(delay)
    q = fastmq.Queue.open(name)
    try:
        q.put(item)
    finally:
        q.close()


def test_reports_the_ready_queues_in_order_and_takes_nothing(mq):
    a, b, c = mq.Queue(), mq.Queue(), mq.Queue()
    b.put("b")
    c.put("c")
    assert fastmq.wait([a, b, c], timeout=5) == [b, c]
    assert fastmq.wait([c, a, b], timeout=0) == [c, b]
    assert (b.qsize(), c.qsize()) == (1, 1)          # nothing was taken
    assert b.get_nowait() == "b"
    assert fastmq.wait([a, b, c], timeout=5) == [c]


def test_times_out_with_an_empty_list(mq):
    a, b = mq.Queue(), mq.Queue()
    t0 = time.monotonic()
    assert fastmq.wait([a, b], timeout=0.3) == []
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 5, elapsed
    assert fastmq.wait([a, b], timeout=0) == []


@pytest.mark.parametrize("which", [0, 1, 2])
def test_wakes_for_a_put_from_another_process_into_any_queue(mq, qname, which):
    names = [f"{qname}-{i}" for i in range(3)]
    queues = [mq.create(n) for n in names]
    child = mp.get_context("spawn").Process(target=_put_later,
                                            args=(names[which], 0.3, "hello"))
    try:
        child.start()
        t0 = time.monotonic()
        ready = fastmq.wait(queues, timeout=30)
        assert time.monotonic() - t0 < 30
        assert ready == [queues[which]]
        assert queues[which].get_nowait() == "hello"
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        for n in names:
            try:
                mq.unlink(n)
            except fastmq.QueueNotFound:
                pass


def test_without_timeout_it_waits_until_a_message_comes(mq, qname):
    queues = [mq.Queue(), mq.create(qname)]
    child = mp.get_context("spawn").Process(target=_put_later, args=(qname, 0.5, 42))
    try:
        child.start()
        assert fastmq.wait(queues) == [queues[1]]
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)


def test_bad_input_is_a_typed_error(mq):
    q = mq.Queue()
    with pytest.raises(ValueError, match="at least one queue"):
        fastmq.wait([])
    with pytest.raises(TypeError, match="fastmq.Queue"):
        fastmq.wait([q, object()])             # type: ignore[list-item]
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            fastmq.wait([q], timeout=bad)
    with pytest.raises(TypeError, match="timeout"):
        fastmq.wait([q], timeout="1")          # type: ignore[arg-type]
    closed = mq.Queue()
    closed.close()
    with pytest.raises(fastmq.QueueClosed):
        fastmq.wait([q, closed], timeout=0)
