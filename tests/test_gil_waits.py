"""Every blocking call releases the GIL while it waits, and ``close()`` from
another thread interrupts it.

For each call that can block (an empty queue for the takers; a full ring, a
full block pool or a full in-flight table for the others): the call runs in a
thread; while it is blocked, a second thread's counter keeps advancing (the
GIL is not held across the wait); then the main thread closes the handle and
the blocked call raises ``QueueClosed`` within about a second. Both backends.

Also here: batch calls size their work by what they find, not by the largest
batch they may return.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import tracemalloc

import pytest

import fastmq
from conftest import unique_name

pytestmark = pytest.mark.timeout(120)

KiB = 1024
BIG = 200 * KiB
SMALL = {"maxsize": 4, "max_message_size": 4 * KiB}
POOL = {"maxsize": 32, "max_message_size": 512 * KiB, "capacity_bytes": 1024 * KiB}
BLOCKED_FOR = 0.4       # s: the call must still be waiting after this
CLOSE_BOUND = 1.5       # s: from close() to the blocked call raising

class Counter:
    """A thread that counts as fast as the GIL lets it."""

    def __init__(self):
        self.n = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.n += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


def assert_waits_then_closes(call, close, expect=fastmq.QueueClosed):
    """``call()`` blocks (GIL released) until ``close()`` makes it raise."""
    out = {}

    def target():
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["exc"] = exc
        out["t"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    with Counter() as counter:
        t_start = time.monotonic()       # (start() itself may wait for the GIL)
        t.start()
        time.sleep(BLOCKED_FOR)
        slept = time.monotonic() - t_start
        assert slept < 10 * BLOCKED_FOR, (f"this thread could not run for {slept:.1f}s: "
                                          f"the blocked call holds the GIL ({out})")
        assert t.is_alive(), f"the call did not block: {out}"
        before = counter.n
        time.sleep(BLOCKED_FOR)
        advanced = counter.n - before
        assert t.is_alive(), f"the call did not keep blocking: {out}"
        assert advanced > 100, (f"another thread advanced only {advanced} steps in "
                                f"{BLOCKED_FOR}s: the blocked call holds the GIL")
        t0 = time.monotonic()
        closer = threading.Thread(target=close, daemon=True)   # close() may block too
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() blocked while the call waited"
        t.join(10)
    assert not t.is_alive(), "close() from another thread did not interrupt the call"
    assert isinstance(out.get("exc"), expect), f"expected {expect.__name__}, got {out}"
    took = out["t"] - t0
    assert took < CLOSE_BOUND, f"the blocked call noticed close() only after {took:.2f}s"


# ---------------------------------------------------------------- situations

def empty(mq):
    return mq.Queue(**SMALL)


def full_ring(mq):
    q = mq.Queue(**SMALL)
    while True:
        try:
            q.put_bytes(b"x", block=False)
        except fastmq.Full:
            return q


def full_pool(mq):
    """Slots free, but no block for a BIG message."""
    q = mq.Queue(**POOL)
    while True:
        try:
            q.put_bytes(b"p" * BIG, block=False)
        except fastmq.Full:
            break
    assert q.qsize() < POOL["maxsize"], "the ring filled before the pool"
    return q


def _numpy():
    import numpy
    return numpy


CALLS = {
    # name: (situation, the blocking call)
    "get": (empty, lambda q: q.get()),
    "get_zero_copy": (empty, lambda q: q.get(zero_copy=True)),
    "get_many": (empty, lambda q: q.get_many(10)),
    "get_bytes": (empty, lambda q: q.get_bytes()),
    "get_many_bytes": (empty, lambda q: q.get_many_bytes(10)),
    "recv": (empty, lambda q: q.recv()),
    "get_message": (empty, lambda q: q.get_message()),
    "get_messages": (empty, lambda q: q.get_messages(10)),
    "put": (full_ring, lambda q: q.put("x")),
    "put_bytes": (full_ring, lambda q: q.put_bytes(b"x")),
    "put_many": (full_ring, lambda q: q.put_many(["x", "y"])),
    "put_many_bytes": (full_ring, lambda q: q.put_many_bytes([b"x", b"y"])),
    "put_bytes_pool_full": (full_pool, lambda q: q.put_bytes(b"b" * BIG)),
    "reserve": (full_pool, lambda q: q.reserve(BIG).__enter__()),
    "reserve_array": (full_pool, lambda q: q.reserve_array((BIG,), _numpy().uint8)),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_blocking_call_releases_gil_and_close_interrupts_it(mq, call):
    situation, fn = CALLS[call]
    q = situation(mq)
    assert_waits_then_closes(lambda: fn(q), q.close)


def test_get_message_with_full_in_flight_table(mq, backend):
    """Messages are queued, but every in-flight entry is held by another
    process: get_message waits for an entry (the lease-table wait)."""
    name = unique_name("gilt")
    q = mq.create(name, maxsize=4, max_message_size=4 * KiB)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                      # holds the whole table, then waits to be killed
        try:
            os.close(r)
            # One handle per lease: a single handle may hold at most maxsize
            # leases (TooManyInFlight past that); several fill the table.
            handles, held = [], []
            for i in range(1000):
                h = fastmq.Queue.open(name, _backend=backend)
                handles.append(h)
                h.put(i, timeout=10)
                try:
                    held.extend(h.get_messages(1, block=False, lease=120))
                except fastmq.Empty:       # a message is queued: the table is full
                    break
            os.write(w, b"%d %d\n" % (len(held), h.qsize()))
            time.sleep(8)             # bounds the wait if the GIL is held
        finally:
            os._exit(0)
    try:
        os.close(w)
        with os.fdopen(r) as f:
            held, queued = map(int, f.readline().split())
        assert held >= 4 and queued == 1, (held, queued)   # queued, but no free entry
        assert_waits_then_closes(lambda: q.get_message(), q.close)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_exchange_publish_to_full_queue(mq, backend):
    name = unique_name("gilx")
    full_ring_q = mq.create(name, **SMALL)
    while True:
        try:
            full_ring_q.put_bytes(b"x", block=False)
        except fastmq.Full:
            break
    ename = unique_name("gilx-ex")
    ex = fastmq.Exchange.create(ename, "fanout", _backend=backend)
    try:
        ex.bind(name)
        assert_waits_then_closes(lambda: ex.publish("x"), ex.close)
    finally:
        try:
            ex.close()
        finally:
            fastmq.Exchange.unlink(ename)


# ---------------------------------------------------------------- batch sizes

@pytest.mark.parametrize("call", ["get_many", "get_many_bytes"])
def test_get_many_allocates_for_what_it_finds(mq, call):
    """max_messages may be up to 2**30: a call that finds 3 messages must not
    reserve room for 2**30 of them (that was a 40 GiB allocation)."""
    q = mq.Queue(maxsize=64, max_message_size=4 * KiB)
    for i in range(3):
        q.put_bytes(b"%d" % i) if call == "get_many_bytes" else q.put(i)
    tracemalloc.start()
    try:
        got = getattr(q, call)(max_messages=2 ** 30, timeout=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == ([b"0", b"1", b"2"] if call == "get_many_bytes" else [0, 1, 2])
    assert peak < 1 << 20, f"get_many of 3 messages allocated {peak} bytes at its peak"
