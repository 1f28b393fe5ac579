"""asyncio: get_async / put_async / get_many_async / get_message_async
(no busy-waiting: an awaiting coroutine costs no CPU).

Both backends. Producers on the other side are real processes (fork), joined
with deadlines and always reaped (``children``). Every await is bounded by
``asyncio.wait_for`` so a hang fails the test instead of stalling the suite.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import fastmq
from conftest import WITH_REDIS, not_on_redis, unique_name

pytestmark = [pytest.mark.timeout(120), pytest.mark.backends(*WITH_REDIS)]

BOUND = 20.0      # s: an await that should finish does so well within this


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND))


def _put_later(backend, name, delay, items):
    q = fastmq.Queue.open(name, _backend=backend)
    time.sleep(delay)
    for item in items:
        q.put(item, timeout=10)


def _async_threads(q):
    """The waiter threads of this queue handle's segment."""
    seg = q._live_ring().name
    return [t for t in threading.enumerate()
            if t.name.startswith("fastmq-async") and t.name.endswith(" " + seg)]


# ------------------------------------------------------------------ basics

def test_round_trip_of_every_async_method(mq, backend):
    not_on_redis(backend, "a redis lease is a RedisMessage, not an instance of fastmq.Message "
                          "(a C type it cannot subclass)")
    q = mq.Queue(maxsize=8)

    async def main():
        await q.put_async({"a": 1})
        assert await q.get_async(timeout=5) == {"a": 1}
        for i in range(3):
            await q.put_async(i)
        assert await q.get_many_async(10, timeout=5) == [0, 1, 2]
        await q.put_async("job")
        m = await q.get_message_async(timeout=5, lease=30)
        assert isinstance(m, fastmq.Message) and m.value == "job"
        m.ack()
        assert q.pending() == [] and q.qsize() == 0
    run(main())


def test_get_async_waits_for_a_producer_process(mq, backend, children):
    name = unique_name("aget")
    q = mq.create(name, maxsize=8)

    async def main():
        children.start(_put_later, backend, name, 0.3, ["hello"])
        t0 = time.monotonic()
        got = await q.get_async(timeout=10)
        return got, time.monotonic() - t0
    got, waited = run(main())
    children.join(10)
    assert got == "hello"
    assert 0.2 <= waited < 5, waited


def test_timeouts_raise_empty_and_full(mq):
    q = mq.Queue(maxsize=2)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(fastmq.Empty):
            await q.get_async(timeout=0.3)
        assert time.monotonic() - t0 >= 0.25
        with pytest.raises(fastmq.Empty):
            await q.get_message_async(timeout=0)
        await q.put_async(1)
        await q.put_async(2)
        t0 = time.monotonic()
        with pytest.raises(fastmq.Full):
            await q.put_async(3, timeout=0.3)
        assert time.monotonic() - t0 >= 0.25
        with pytest.raises(fastmq.Full):
            await q.put_async(3, timeout=0)
        with pytest.raises(ValueError):
            await q.get_async(timeout=float("nan"))
        with pytest.raises(fastmq.Full):
            await q.put_async(3, timeout=-1)     # one try, as mp.Queue
    run(main())
    assert q.get_many(10, timeout=1) == [1, 2]      # the failed puts left nothing


def test_put_async_waits_for_room_then_delivers_in_order(mq):
    q = mq.Queue(maxsize=2)

    async def main():
        await q.put_async("a")
        await q.put_async("b")
        pending = asyncio.ensure_future(q.put_async("c", timeout=10))
        await asyncio.sleep(0.2)
        assert not pending.done()                    # blocked: the queue is full
        assert await q.get_async(timeout=5) == "a"   # makes room
        await asyncio.wait_for(pending, 5)
        assert await q.get_many_async(10, timeout=5) == ["b", "c"]
    run(main())


def test_put_async_of_a_big_object_waits_for_pool_room(mq):
    q = mq.Queue(maxsize=16, max_message_size=1 << 20, capacity_bytes=2 << 20)
    big = b"x" * 300_000

    async def main():
        n = 0
        while True:                                  # fill the pool with big messages
            try:
                q.put_bytes(big, block=False)
                n += 1
            except fastmq.Full:
                break
        assert 0 < n < 16                            # the pool, not the slots, is full
        pending = asyncio.ensure_future(q.put_async(big, timeout=10))
        await asyncio.sleep(0.3)
        assert not pending.done()
        q.get_bytes(timeout=5)                       # frees one block
        await asyncio.wait_for(pending, 5)
        assert q.qsize() == n
    run(main())


# ----------------------------------------------------------- cancellation

def test_cancelled_get_async_loses_nothing(mq):
    """Cancel an awaiting get_async right as a message arrives, many times:
    each message is either returned by the task or still in the queue --
    never both, never neither."""
    q = mq.Queue(maxsize=64)

    async def main():
        returned, left = [], []
        for i in range(60):
            task = asyncio.ensure_future(q.get_async(timeout=10))
            await asyncio.sleep(0.002 * (i % 5))
            q.put(i)
            await asyncio.sleep(0.001 * (i % 3))
            task.cancel()
            try:
                returned.append(await task)
            except asyncio.CancelledError:
                pass
            try:
                left.append(q.get(block=False))
            except fastmq.Empty:
                pass
        return returned, left
    returned, left = run(main())
    assert sorted(returned + left) == list(range(60))
    assert q.qsize() == 0


def test_close_while_awaiting_raises_queue_closed(mq):
    q = mq.Queue(maxsize=4)

    async def main():
        task = asyncio.ensure_future(q.get_async())
        await asyncio.sleep(0.2)
        q.close()
        t0 = time.monotonic()
        with pytest.raises(fastmq.QueueClosed):
            await asyncio.wait_for(task, 5)
        return time.monotonic() - t0
    assert run(main()) < 2


# ------------------------------------------------------- many and idle

def test_many_coroutines_share_one_waiter_thread(mq, backend, children):
    not_on_redis(backend, "waiter threads of a shm segment; redis awaits on redis.asyncio")
    """100 coroutines await one queue; a producer process sends 1000 objects:
    each is received exactly once, and the waiting costs one thread."""
    name = unique_name("amany")
    q = mq.create(name, maxsize=64)
    n, consumers = 1000, 100

    async def consumer(got):
        while True:
            try:
                got.append(await q.get_async(timeout=3))
            except fastmq.Empty:
                return

    async def main():
        got = []
        tasks = [asyncio.ensure_future(consumer(got)) for _ in range(consumers)]
        await asyncio.sleep(0.3)
        threads = len(_async_threads(q))
        children.start(_put_later, backend, name, 0.0, list(range(n)))
        await asyncio.gather(*tasks)
        return got, threads
    got, threads = run(main())
    children.join(10)
    assert sorted(got) == list(range(n))
    assert threads == 1, threads


def test_idle_awaiting_consumer_costs_no_cpu(mq):
    q = mq.Queue(maxsize=4)

    async def main():
        t0, c0 = time.monotonic(), time.process_time()
        with pytest.raises(fastmq.Empty):
            await q.get_async(timeout=2.0)
        return time.monotonic() - t0, time.process_time() - c0
    wall, cpu = run(main())
    assert wall >= 1.9
    assert cpu < 0.2, f"an await idle for {wall:.1f} s used {cpu:.3f} s of CPU"


def test_waiter_thread_exits_when_nobody_waits(mq, backend):
    not_on_redis(backend, "waiter threads of a shm segment; redis awaits on redis.asyncio")
    q = mq.Queue(maxsize=4)

    async def main():
        with pytest.raises(fastmq.Empty):
            await q.get_async(timeout=0.3)
    run(main())
    deadline = time.monotonic() + 5
    while _async_threads(q) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _async_threads(q) == []


def _await_in_child(q, out):
    async def main():
        return await q.get_async(timeout=10)
    got = asyncio.run(main())
    with open(out, "w") as f:
        f.write(repr(got))


def test_forked_child_awaits_on_an_inherited_handle(mq, children, tmp_path):
    q = mq.Queue(maxsize=4)

    async def warm():                      # the parent has a waiter thread first
        with pytest.raises(fastmq.Empty):
            await q.get_async(timeout=0.2)
    run(warm())
    out = tmp_path / "got"
    child = children.start(_await_in_child, q, str(out))
    time.sleep(0.3)
    q.put("to the child")
    children.join(15, [child])
    assert out.read_text() == repr("to the child")
    assert os.path.exists(out)
