"""Timeouts on every blocking call, on both backends.

The family: a timeout is a float the user computes, so every blocking call
must accept the whole float line the way ``multiprocessing.Queue`` does --
``inf`` and absurdly long timeouts wait forever (they must not raise at once
because a deadline overflowed), a timeout of zero or less makes one
non-blocking try (``get(timeout=deadline - time.monotonic())`` past its
deadline raises ``Empty``), and NaN is a ``ValueError`` that changes nothing.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

import fastmq

from conftest import unique_name

BOUND = 20          # seconds: no call here may take longer
pytestmark = pytest.mark.timeout(60)   # a deadline that overflowed may hang
HUGE = [float("inf"), 1.8e10, 2 ** 70]
NEGATIVE = [-1, -0.001, -1e300, float("-inf")]


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND))


def _recv(q, timeout):
    with q.recv(timeout=timeout) as msg:
        return bytes(msg.data)


def _get_message(q, timeout):
    m = q.get_message(timeout=timeout)
    m.ack()
    return m.value


def _get_messages(q, timeout):
    ms = q.get_messages(4, timeout=timeout)
    q.ack_many(ms)
    return [m.value for m in ms]


def _get_message_async(q, timeout):
    async def main():
        m = await q.get_message_async(timeout=timeout)
        m.ack()
        return m.value
    return _run(main())


# Each consumer call takes what one put("x") left; returns something that is
# "x"-ish so the test can check it got the message.
TAKES = {
    "get": lambda q, t: q.get(timeout=t),
    "get_zero_copy": lambda q, t: q.get(timeout=t, zero_copy=True),
    "get_bytes": lambda q, t: q.get_bytes(timeout=t),
    "get_many": lambda q, t: q.get_many(4, timeout=t),
    "get_many_bytes": lambda q, t: q.get_many_bytes(4, timeout=t),
    "recv": _recv,
    "get_message": _get_message,
    "get_messages": _get_messages,
    "get_async": lambda q, t: _run(q.get_async(timeout=t)),
    "get_many_async": lambda q, t: _run(q.get_many_async(4, timeout=t)),
    "get_message_async": _get_message_async,
}


def _reserve(q, t):
    with q.reserve(5, timeout=t) as buf:
        buf[:] = b"hello"
    return 1


def _reserve_array(q, t):
    arr = q.reserve_array((4,), "uint8", timeout=t)
    arr[:] = 7
    q.commit(arr)
    return 1


class _Publish:
    """Exchange.publish into the (named) queue under test."""

    def __init__(self, backend):
        self.backend = backend
        self.made = []

    def __call__(self, q, t):
        ex = fastmq.Exchange.create(unique_name("x"), "fanout", _backend=self.backend)
        self.made.append(ex)
        ex.bind(q.name)
        return ex.publish("y", timeout=t)

    def close(self):
        for ex in self.made:
            try:
                ex.close()
                fastmq.Exchange.unlink(ex.name)
            except Exception:
                pass


# Each producer call adds one message; returns a truthy value when it went in
# (put_many returns a count: 0 when it did not).
GIVES = {
    "put": lambda q, t: q.put("y", timeout=t) or 1,
    "put_bytes": lambda q, t: q.put_bytes(b"y", timeout=t) or 1,
    "put_many": lambda q, t: q.put_many(["y"], timeout=t),
    "put_many_bytes": lambda q, t: q.put_many_bytes([b"y"], timeout=t),
    "reserve": _reserve,
    "reserve_array": _reserve_array,
    "put_async": lambda q, t: _run(q.put_async("y", timeout=t)) or 1,
    "publish": None,          # built per test: needs the backend
}


def _give(name, backend, cleanup):
    if name == "publish":
        pub = _Publish(backend)
        cleanup.append(pub.close)
        return pub
    return GIVES[name]


@pytest.fixture
def cleanup():
    fns = []
    yield fns
    for fn in fns:
        fn()


def _named(mq, **kw):
    return mq.create(unique_name("to"), **kw)


def _later(delay, fn):
    """Run ``fn`` in a thread after ``delay`` seconds; returns the thread."""
    def run():
        time.sleep(delay)
        fn()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


# ------------------------------------------------------ huge and infinite

@pytest.mark.parametrize("timeout", HUGE, ids=repr)
@pytest.mark.parametrize("call", sorted(TAKES))
def test_huge_timeout_on_take_waits_for_a_message(mq, call, timeout):
    q = _named(mq)
    if call == "recv":
        other = mq.open(q.name)
        t = _later(0.25, lambda: other.put_bytes(b"x"))
    else:
        other = mq.open(q.name)
        t = _later(0.25, lambda: other.put("x"))
    try:
        out, took = _timed(lambda: TAKES[call](q, timeout))
    finally:
        t.join(BOUND)
    assert out, f"{call}(timeout={timeout!r}) returned {out!r}"
    assert took >= 0.2, f"{call}(timeout={timeout!r}) did not wait ({took:.3f}s)"


@pytest.mark.parametrize("timeout", HUGE, ids=repr)
@pytest.mark.parametrize("call", sorted(GIVES))
def test_huge_timeout_on_give_waits_for_room(mq, backend, cleanup, call, timeout):
    q = _named(mq, maxsize=1)
    q.put_bytes(b"full")
    other = mq.open(q.name)
    t = _later(0.25, lambda: other.get_bytes(timeout=BOUND))
    try:
        out, took = _timed(lambda: _give(call, backend, cleanup)(q, timeout))
    finally:
        t.join(BOUND)
    assert out, f"{call}(timeout={timeout!r}) did not send ({out!r})"
    assert took >= 0.2, f"{call}(timeout={timeout!r}) did not wait ({took:.3f}s)"
    assert q.qsize() == 1


# --------------------------------------------------------------- negative

@pytest.mark.parametrize("timeout", NEGATIVE, ids=repr)
@pytest.mark.parametrize("call", sorted(TAKES))
def test_negative_timeout_on_take_is_one_nonblocking_try(mq, call, timeout):
    q = _named(mq)
    with pytest.raises(fastmq.Empty):
        _, took = _timed(lambda: TAKES[call](q, timeout))
    if call == "recv":
        q.put_bytes(b"x")
    else:
        q.put("x")
    out, took = _timed(lambda: TAKES[call](q, timeout))
    assert out
    assert q.qsize() == 0


def test_timeout_past_its_deadline_raises_empty_at_once(mq):
    q = mq.Queue()
    deadline = time.monotonic() - 0.5      # already passed
    t0 = time.monotonic()
    with pytest.raises(fastmq.Empty):
        q.get(timeout=deadline - time.monotonic())
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("timeout", NEGATIVE, ids=repr)
@pytest.mark.parametrize("call", sorted(GIVES))
def test_negative_timeout_on_give_is_one_nonblocking_try(mq, backend, cleanup, call,
                                                         timeout):
    q = _named(mq, maxsize=1)
    give = _give(call, backend, cleanup)
    assert give(q, timeout)              # room: it goes in
    assert q.qsize() == 1
    t0 = time.monotonic()
    try:
        out = give(q, timeout)           # full now: one try, no wait
    except fastmq.Full:
        out = 0
    assert not out, f"{call} put into a full queue"
    assert time.monotonic() - t0 < 1.0
    assert q.qsize() == 1


# --------------------------------------------------------------------- NaN

@pytest.mark.parametrize("call", sorted(TAKES))
def test_nan_timeout_on_take_is_value_error(mq, call):
    q = _named(mq)
    q.put_bytes(b"x") if call == "recv" else q.put("x")
    with pytest.raises(ValueError, match="NaN"):
        TAKES[call](q, float("nan"))
    assert q.qsize() == 1                # nothing was taken


@pytest.mark.parametrize("call", sorted(GIVES))
def test_nan_timeout_on_give_is_value_error(mq, backend, cleanup, call):
    q = _named(mq)
    with pytest.raises(ValueError, match="NaN"):
        _give(call, backend, cleanup)(q, float("nan"))
    assert q.qsize() == 0                # nothing was sent


# --------------------------------------------- the ring itself (native _deadline)

@pytest.mark.parametrize("timeout", HUGE[:3], ids=repr)
def test_ring_level_huge_timeout_waits(mq, timeout):
    """The ring below the layer (used by other modules directly) treats a huge
    timeout as forever too, rather than as an already-passed deadline."""
    q = mq.Queue()
    ring = q._ring
    t = _later(0.25, lambda: ring.put(b"x", None))
    try:
        out, took = _timed(lambda: ring.get(timeout))
    finally:
        t.join(BOUND)
    assert out == b"x" and took >= 0.2
    with pytest.raises(ValueError, match="NaN"):
        ring.get(float("nan"))
