"""Per-operation costs in one process (put+get pairs, batches, zero-copy).

Every benchmark round moves a message through the queue and back out, so a queue
never fills up, and the last message is checked so a broken queue cannot look fast.
"""
from __future__ import annotations

import pytest

from fastmq._bench import peers as _peers
from fastmq._bench.payloads import Builder, Tally
from fastmq._bench.peers import BATCH

PEERS = [name for name, cls in _peers.PEERS.items() if cls.available()[0]]
# Pipe and SimpleQueue are one OS pipe: a put+get pair in one process measures the same
# syscalls as between processes; mp.Queue's feeder thread makes its put+get slow here,
# which is what a one-process user of it pays too.


def _roundtrip(benchmark, send, recv, msgs, mode, size):
    it = iter(range(1 << 62))

    def op():
        send(msgs[next(it) & 63])
        return recv()
    last = benchmark(op)
    tally = Tally(1, 64, size, mode)
    tally.check(last)
    assert not tally.n_errors, tally.errors


@pytest.mark.parametrize("peer", PEERS)
def test_put_get_bytes_64(benchmark, channel, peer):
    """``put_bytes`` + ``get_bytes`` of 64 B (each peer's raw-bytes calls)."""
    s, r = channel(peer, "bytes", 64)
    b = Builder(0, 64, "bytes")
    _roundtrip(benchmark, s.send, r.recv, [b.build(i) for i in range(64)], "bytes", 64)


@pytest.mark.parametrize("peer", PEERS)
def test_put_get_small_object(benchmark, channel, peer):
    """``put`` + ``get`` of a small pickled tuple."""
    s, r = channel(peer, "pickle", 0)
    b = Builder(0, 0, "pickle")
    _roundtrip(benchmark, s.send, r.recv, [b.build(i) for i in range(64)], "pickle", 0)


@pytest.mark.parametrize("peer", [p for p in PEERS if p in ("fastmq", "faster-fifo")])
def test_put_many_get_many_64(benchmark, channel, peer):
    """``put_many`` of a batch of 64 x 64 B, then ``get_many`` until all are back."""
    s, r = channel(peer, "batch", 64)
    b = Builder(0, 64, "batch")
    batch = [b.build(i) for i in range(BATCH)]

    def op():
        s.send_many(batch)
        got = []
        while len(got) < len(batch):
            got += r.recv_many()
        return got
    got = benchmark(op)
    assert got == batch
    benchmark.extra_info["messages_per_round"] = len(batch)


@pytest.fixture
def fastmq_queue():
    fastmq = pytest.importorskip("fastmq")
    q = fastmq.Queue(maxsize=1024, max_message_size=2 << 20, capacity_bytes=64 << 20)
    yield q
    q.close()


@pytest.mark.parametrize("size", [64, 4096, 1 << 20])
def test_fastmq_reserve_commit_recv(benchmark, fastmq_queue, size):
    """``with q.reserve(n)`` (fill in place) + ``with q.recv()`` (read in place)."""
    q = fastmq_queue
    payload = Builder(0, size, "bytes")._raw(7)

    def op():
        with q.reserve(size) as buf:
            buf[:] = payload
        with q.recv() as msg:
            return bytes(msg.data[:16])
    assert benchmark(op) == payload[:16]


def test_fastmq_recv_64(benchmark, fastmq_queue):
    """``with q.recv()`` alone (the queue is refilled with put_many outside timing)."""
    q = fastmq_queue
    payload = b"r" * 64

    def setup():
        q.put_bytes(payload)
        return (), {}

    def op():
        with q.recv() as msg:
            return msg.data.nbytes
    assert benchmark.pedantic(op, setup=setup, rounds=2000, iterations=1) == 64


def test_fastmq_numpy_1m_zero_copy(benchmark, fastmq_queue):
    """``put(array)`` + ``get(zero_copy=True)`` of a 1 MiB numpy array."""
    np = pytest.importorskip("numpy")
    q = fastmq_queue
    arr = np.frombuffer(Builder(0, 1 << 20, "bytes")._raw(3), dtype=np.uint8).copy()

    def op():
        q.put(arr)
        out = q.get(zero_copy=True)
        return int(out[100])
    assert benchmark(op) == int(arr[100])


def test_fastmq_async_put_get_small_object(benchmark, fastmq_queue):
    """``await put_async(obj)`` + ``await get_async()`` of a small object in a
    running event loop, next to ``asyncio.Queue`` (one process: the cost of
    the awaits themselves; neither waits, the queue never runs empty)."""
    import asyncio
    q = fastmq_queue
    loop = asyncio.new_event_loop()

    async def rounds(n=100):
        for i in range(n):
            await q.put_async(("job", i))
            out = await q.get_async()
        return out
    try:
        assert benchmark(lambda: loop.run_until_complete(rounds())) == ("job", 99)
    finally:
        loop.close()


def test_asyncio_queue_put_get_small_object(benchmark):
    """The same 100 rounds through ``asyncio.Queue`` (in-process only: the
    floor for an awaited put + get)."""
    import asyncio
    loop = asyncio.new_event_loop()
    aq = asyncio.Queue()

    async def rounds(n=100):
        for i in range(n):
            await aq.put(("job", i))
            out = await aq.get()
        return out
    try:
        assert benchmark(lambda: loop.run_until_complete(rounds())) == ("job", 99)
    finally:
        loop.close()


@pytest.mark.parametrize("kind,queues", [("direct", 1), ("topic", 1), ("fanout", 4)])
def test_fastmq_exchange_publish_small_object(benchmark, kind, queues):
    """``Exchange.publish`` of a small object + ``get`` from each queue it
    reaches (compare with test_fastmq_put_get_pickled: the routing's cost)."""
    import uuid
    fastmq = pytest.importorskip("fastmq")
    tag = uuid.uuid4().hex[:8]
    names = [f"bench-{tag}-{i}" for i in range(queues)]
    qs = [fastmq.Queue.create(n, maxsize=1024) for n in names]
    ex = fastmq.Exchange.create(f"bench-{tag}", kind)
    try:
        for n in names:
            ex.bind(n, "orders.*" if kind == "topic" else "orders.eu")
        obj = {"id": 1, "item": "widget", "qty": 3}

        def op():
            ex.publish(obj, "orders.eu")
            return [q.get() for q in qs][-1]
        assert benchmark(op) == obj
    finally:
        ex.close()
        fastmq.Exchange.unlink(ex.name)
        for q, n in zip(qs, names):
            q.close()
            fastmq.Queue.unlink(n)
