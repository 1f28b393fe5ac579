"""Atomic batches: ``put_many(items, atomic=True)``, ``put_many_bytes(...,
atomic=True)`` and ``with q.transaction() as tx:``.

What is promised, and checked here on every backend that applies:

* all or nothing: a producer killed at any step (crash points in the native
  core; SIGKILL at random moments on both shared-memory backends) leaves the
  whole batch queued or none of it; a consumer never receives a message of a
  batch that is not whole in the queue (checked by batch id + index: every
  batch of which any message was ever delivered is delivered whole);
* order: a batch's messages come out in order, and in FIFO place among the
  messages around it;
* ``get_many`` takes a batch whole (when it fits in max_messages), ``get`` and
  ``get_message`` one message at a time, across consumer processes; leased
  messages of a batch are acked, nacked and redelivered one by one;
* a consumer killed mid-batch neither loses nor duplicates beyond the
  delivery rules of its call (auto-ack: the one message being handed over
  may be lost; get_message: nothing lost, redelivered once);
* a batch that can never fit is refused before anything is written;
* a transaction commits on a normal exit and sends nothing on an exception.
"""
from __future__ import annotations

import collections
import os
import pickle
import random
import signal
import threading
import time

import pytest

from conftest import selected_backends, unique_name, wait_until
import _batch_workers as W
from _worker_child import WorkerChild, read_log

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "_batch_workers.py")
SMALL, BIG = 8, 400        # payload bytes: a batch record inline in its slot / in a block

pytestmark = pytest.mark.timeout(240)


# ====================================================================== helpers

@pytest.fixture
def kids():
    made = []

    def start(role, backend, **kw):
        c = WorkerChild(WORKERS, role, backend, **kw)
        made.append(c)
        return c
    try:
        yield start
    finally:
        for c in made:
            c.kill()


def died_by_sigkill(child):
    rc = child.wait()
    assert rc == -signal.SIGKILL, (f"expected the child to die at its crash point (rc -9), "
                                   f"got rc={rc}; stderr:\n{child.stderr()}")


def exited_ok(child, timeout=120.0):
    rc = child.wait(timeout)
    assert rc == 0, f"child failed rc={rc}; stderr:\n{child.stderr()}"


def committed_in(log):
    return {(int(f[1]), int(f[2])): int(f[3]) for f in read_log(log) if f[0] == "C"}


def received_in(log):
    out = []
    for f in read_log(log):
        if f[0] == "R" and f[1] != "None":
            out.append((int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5] == "1"))
        elif f[0] in ("R", "T"):
            out.append((None, None, None, None, False))
    return out


def drain(q, settle=2.0, lease=False):
    """Everything left in q, as (producer, batch, index, n, ok), in the order
    received; waits up to ``settle`` s for more (a dead process's slot is
    recovered within about 0.2 s)."""
    import fastmq
    out = []
    while True:
        try:
            if lease:
                held = q.get_messages(64, timeout=settle)
                items = [m.value for m in held]
                for m in held:
                    m.ack()
            else:
                items = q.get_many(64, timeout=settle)
        except fastmq.Empty:
            return out
        out.extend(W.check(m) for m in items)


def assert_batches(received, committed, *, in_flight=None, lost=(), dup_ok=False):
    """Every batch delivered whole or not at all, never torn.

    received: (producer, batch, index, n, ok) tuples; committed: {(p, b): n}
    whose put returned; in_flight: {(p, b): n} of batches whose put was cut
    short (each must come out whole or not at all); lost: (p, b, i) keys that
    an auto-ack consumer killed after the hand-over took with it."""
    torn = [r for r in received if not r[4]]
    assert not torn, f"torn messages delivered: {torn[:5]}"
    counts = collections.Counter((p, b, i) for p, b, i, _, _ in received)
    if not dup_ok:
        dups = {k: v for k, v in counts.items() if v > 1}
        assert not dups, f"messages delivered twice: {dups}"
    seen = collections.defaultdict(set)
    sizes = {}
    for p, b, i, n, _ in received:
        seen[(p, b)].add(i)
        sizes[(p, b)] = n
    lost = set(lost)
    known = dict(committed)
    known.update(in_flight or {})
    for key, idx in seen.items():
        assert key in known, f"batch {key} was delivered but never put"
        want = {i for i in range(known[key]) if (key + (i,)) not in lost}
        assert idx == want, (f"batch {key} delivered in part: got indices {sorted(idx)}, "
                             f"want {sorted(want)}")
    for key, n in committed.items():
        want = {i for i in range(n) if (key + (i,)) not in lost}
        if want:
            assert seen.get(key) == want, f"committed batch {key} not delivered whole"
    for key in lost:
        assert counts[key] == 0, f"{key} must be gone (handed over to the killed consumer)"


def in_order(received):
    """Within each batch, indices arrive increasing, per consumer log."""
    last = {}
    for p, b, i, _, _ in received:
        if (p, b) in last:
            assert i > last[(p, b)], f"batch {(p, b)}: index {i} after {last[(p, b)]}"
        last[(p, b)] = i


def put_batches(q, producer, batches, n, size):
    for b in batches:
        assert q.put_many(W.make_batch(producer, b, n, size), atomic=True, timeout=10) == n
    return {(producer, b): n for b in batches}


def census_clean(q):
    """No block held by anyone (nobody else uses q now)."""
    carved, free, held = q._ring._pool_census()
    return held == 0 and carved == free


# ============================================================ API on every backend

pytestmark_all = pytest.mark.backends("native", "pure", "redis")


@pytestmark_all
def test_batch_comes_out_in_order_in_its_fifo_place(mq):
    q = mq.Queue(16)
    q.put("before")
    assert q.put_many(range(5), atomic=True) == 5
    q.put("after")
    got = [q.get(timeout=5) for _ in range(7)]
    assert got == ["before", 0, 1, 2, 3, 4, "after"]


@pytestmark_all
def test_get_many_takes_a_batch_whole(mq):
    q = mq.Queue(32)
    q.put_many([f"m{i}" for i in range(10)], atomic=True)
    assert q.get_many(100, timeout=5) == [f"m{i}" for i in range(10)]


@pytestmark_all
def test_get_many_smaller_than_the_batch_takes_its_head_the_rest_stays_in_order(mq):
    q = mq.Queue(32)
    q.put_many(list(range(6)), atomic=True)
    assert q.get_many(2, timeout=5) == [0, 1]
    assert q.get(timeout=5) == 2
    assert q.get_many(10, timeout=5) == [3, 4, 5]


@pytestmark_all
def test_get_many_never_mixes_batches_out_of_order(mq):
    q = mq.Queue(64)
    q.put("a")
    q.put_many(["b0", "b1", "b2"], atomic=True)
    q.put_many(["c0", "c1"], atomic=True)
    q.put("d")
    got = []
    while len(got) < 7:
        got += q.get_many(100, timeout=5)
    assert got == ["a", "b0", "b1", "b2", "c0", "c1", "d"]


@pytestmark_all
def test_put_many_bytes_atomic(mq):
    q = mq.Queue(16)
    assert q.put_many_bytes([b"x", bytearray(b"yy"), memoryview(b"zzz")], atomic=True) == 3
    assert q.get_many_bytes(10, timeout=5) == [b"x", b"yy", b"zzz"]


@pytestmark_all
def test_empty_atomic_batch_is_a_no_op(mq):
    q = mq.Queue(4)
    assert q.put_many([], atomic=True) == 0
    assert q.qsize() == 0


@pytestmark_all
def test_transaction_commits_on_normal_exit(mq):
    q = mq.Queue(16)
    with q.transaction() as tx:
        tx.put({"k": 1})
        tx.put_bytes(b"raw")
        tx.put([2, 3])
        assert q.qsize() == 0          # nothing before the block ends
    assert tx.sent == 3
    assert q.get(timeout=5) == {"k": 1}
    assert q.get_bytes(timeout=5) == b"raw"
    assert q.get(timeout=5) == [2, 3]


@pytestmark_all
def test_transaction_sends_nothing_on_exception(mq):
    import fastmq
    q = mq.Queue(16)
    with pytest.raises(KeyError):
        with q.transaction() as tx:
            tx.put(1)
            tx.put_bytes(b"2")
            raise KeyError("boom")
    assert tx.sent == 0
    with pytest.raises(fastmq.Empty):
        q.get(timeout=0.2)
    with pytest.raises(RuntimeError):
        tx.put(3)                      # an ended transaction takes nothing more


@pytestmark_all
def test_transaction_put_bytes_copies_at_once(mq):
    q = mq.Queue(16)
    buf = bytearray(b"first")
    with q.transaction() as tx:
        tx.put_bytes(buf)
        buf[:] = b"later"
    assert q.get_bytes(timeout=5) == b"first"


@pytestmark_all
def test_batch_larger_than_maxsize_is_refused_before_anything_is_written(mq):
    import fastmq
    q = mq.Queue(4)
    q.put("keep")
    with pytest.raises(ValueError, match="maxsize"):
        q.put_many(range(5), atomic=True)
    with pytest.raises(ValueError, match="maxsize"):
        with q.transaction() as tx:
            for i in range(5):
                tx.put(i)
    assert q.qsize() == 1
    assert q.get(timeout=5) == "keep"
    with pytest.raises(fastmq.Empty):
        q.get(timeout=0.2)


@pytestmark_all
def test_batch_with_an_oversize_message_is_refused_whole(mq):
    import fastmq
    q = mq.Queue(16, max_message_size=1024)
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_many_bytes([b"a", b"b" * 2000, b"c"], atomic=True)
    with pytest.raises(fastmq.MessageTooLarge):
        with q.transaction() as tx:
            tx.put_bytes(b"a")
            tx.put_bytes(b"b" * 2000)
    with pytest.raises(fastmq.Empty):
        q.get_bytes(timeout=0.2)


@pytest.mark.backends("native", "pure")
def test_batch_bigger_than_the_queue_can_hold_is_refused(mq, backend):
    """Native: a batch is one record, so its framed size is bounded by
    max_message_size; pure: by the ring's byte capacity."""
    import fastmq
    if backend == "native":
        q = mq.Queue(64, max_message_size=4096)
        items = [b"x" * 1000] * 5           # each fits, the framed batch does not
    else:
        q = mq.Queue(64, max_message_size=4096, capacity_bytes=4096)
        items = [b"x" * 1000] * 5
    with pytest.raises(fastmq.MessageTooLarge, match="atomic batch"):
        q.put_many_bytes(items, atomic=True)
    assert q.qsize() == 0
    assert q.stats()["enqueued"] == 0
    q.put_many_bytes(items[:3], atomic=True)    # a smaller one goes in
    assert q.get_many_bytes(10, timeout=5) == items[:3]


@pytestmark_all
def test_batch_waits_for_room_for_all_of_it(mq):
    import fastmq
    q = mq.Queue(4)
    q.put(0)
    q.put(1)
    with pytest.raises(fastmq.Full):
        q.put_many([2, 3, 4], atomic=True, block=False)
    with pytest.raises(fastmq.Full):
        q.put_many([2, 3, 4], atomic=True, timeout=0.2)
    assert q.qsize() == 2                 # nothing of it went in
    assert q.get(timeout=5) == 0
    assert q.put_many([2, 3, 4], atomic=True, timeout=5) == 3
    assert [q.get(timeout=5) for _ in range(4)] == [1, 2, 3, 4]


@pytestmark_all
def test_qsize_counts_the_messages_of_a_batch(mq):
    q = mq.Queue(16)
    q.put_many(["a", "b", "c"], atomic=True)
    q.put("d")
    assert q.qsize() == 4
    assert q.get(timeout=5) == "a"
    assert q.qsize() == 3
    assert q.get_many(2, timeout=5) == ["b", "c"]
    assert q.qsize() == 1
    assert q.get(timeout=5) == "d"
    assert q.qsize() == 0


@pytestmark_all
def test_a_queued_batch_counts_its_messages_toward_maxsize(mq):
    import fastmq
    q = mq.Queue(8)
    q.put_many(range(5), atomic=True)
    with pytest.raises(fastmq.Full):
        q.put_many(range(4), atomic=True, block=False)      # 5 + 4 > 8
    assert q.put_many(range(3), atomic=True, block=False) == 3
    assert q.qsize() == 8


@pytestmark_all
def test_blocked_batch_goes_in_once_a_consumer_makes_room(mq):
    q = mq.Queue(3)
    q.put("a")
    q.put("b")
    done = []
    t = threading.Thread(target=lambda: done.append(q.put_many(["x", "y"], atomic=True,
                                                                timeout=10)))
    t.start()
    try:
        time.sleep(0.2)
        assert not done
        assert q.get(timeout=5) == "a"
        t.join(10)
        assert done == [2]
        assert [q.get(timeout=5) for _ in range(3)] == ["b", "x", "y"]
    finally:
        t.join(10)


@pytestmark_all
def test_leased_messages_of_a_batch_ack_and_nack_one_by_one(mq, backend):
    q = mq.Queue(16)
    q.put_many(["a", "b", "c"], atomic=True)
    held = q.get_messages(10, timeout=5)
    while len(held) < 3:
        held += q.get_messages(10, timeout=5)
    assert [m.value for m in held] == ["a", "b", "c"]
    assert all(m.delivery_count == 1 for m in held)
    held[0].ack()
    held[1].nack()
    held[2].ack()
    again = q.get_message(timeout=5)
    assert again.value == "b" and again.delivery_count == 2
    again.ack()
    import fastmq
    with pytest.raises(fastmq.Empty):
        q.get(timeout=0.2)


@pytestmark_all
def test_get_message_takes_a_batch_one_message_at_a_time(mq):
    q = mq.Queue(16)
    q.put_many(["a", "b", "c"], atomic=True)
    m1 = q.get_message(timeout=5)
    assert m1.value == "a"
    assert q.get(timeout=5) == "b"         # the rest of the batch is still queued
    m3 = q.get_message(timeout=5)
    assert m3.value == "c"
    m1.ack()
    m3.ack()


@pytest.mark.backends("native", "pure")
def test_big_messages_of_a_batch(mq):
    """Batch records in a block, messages bigger than a slot: get, recv
    (zero-copy), get_message each take their own."""
    import numpy as np
    q = mq.Queue(16, max_message_size=1 << 20)
    arrays = [np.full(1000 * (i + 1), i, dtype=np.int32) for i in range(4)]
    q.put_many(arrays, atomic=True)
    a0 = q.get(timeout=5)
    a1 = q.get(timeout=5, zero_copy=True)
    m2 = q.get_message(timeout=5)
    a3 = q.get_many(10, timeout=5)
    assert np.array_equal(a0, arrays[0]) and np.array_equal(a1, arrays[1])
    assert np.array_equal(m2.value, arrays[2])
    m2.ack()
    assert len(a3) == 1 and np.array_equal(a3[0], arrays[3])
    del a1


@pytest.mark.backends("native", "pure")
def test_batches_with_an_authkey(mq, backend):
    q = mq.Queue(16, authkey=b"k" * 32)
    q.put_many([1, 2], atomic=True)
    with q.transaction() as tx:
        tx.put(3)
        tx.put_bytes(b"four")
    assert [q.get(timeout=5) for _ in range(3)] == [1, 2, 3]
    assert q.get_bytes(timeout=5) == b"four"


@pytest.mark.backends("native", "pure")
def test_undecodable_message_inside_a_batch(mq):
    """get_many over a batch: the ones before a bad message are returned,
    the bad one is consumed by the call that meets it first, the rest stay."""
    import fastmq
    q = mq.Queue(16)
    good = pickle.dumps("ok")
    q.put_many_bytes([good, b"\x80\x05garbage", good], atomic=True)
    assert q.get_many(10, timeout=5) == ["ok"]
    with pytest.raises(fastmq.BadMessage):
        q.get_many(10, timeout=5)
    assert q.get_many(10, timeout=5) == ["ok"]


# ===================================================== many consumers, processes

@pytest.mark.backends("native", "pure")
def test_consumers_in_processes_take_batches_one_at_a_time(kids, mq, backend, tmp_path):
    name = unique_name("abatch")
    q = mq.create(name, maxsize=64)
    committed = {}
    logs = [tmp_path / f"c{i}.log" for i in range(3)]
    cons = [kids("consume", backend, queue=name, log=logs[i], mode="get", count=0, idle=2.0)
            for i in range(3)]
    for c in cons:
        c.expect("ready")
    for b in range(30):
        committed.update(put_batches(q, 0, [b], 7, SMALL))
    for c in cons:
        exited_ok(c)
    per = [received_in(log) for log in logs]
    for r in per:
        in_order(r)
    everything = [x for r in per for x in r] + drain(q, settle=0.3)
    assert_batches(everything, committed)
    assert len(everything) == 30 * 7


@pytest.mark.backends("native", "pure")
def test_forked_children_put_batches_and_transactions(mq, children):
    q = mq.Queue(256)

    def producer(k):
        for b in range(20):
            items = W.make_batch(k, b, 5, SMALL)
            if b % 2:
                q.put_many(items, atomic=True, timeout=10)
            else:
                with q.transaction(timeout=10) as tx:
                    for m in items:
                        tx.put(m)

    for k in range(3):
        children.start(producer, k, name=f"p{k}")
    got = []
    deadline = time.monotonic() + 60
    while len(got) < 3 * 20 * 5 and time.monotonic() < deadline:
        try:
            got.append(W.check(q.get(timeout=0.5)))
        except Exception:
            pass
    children.join(30)
    committed = {(k, b): 5 for k in range(3) for b in range(20)}
    assert_batches(got, committed)
    in_order(got)


# ================================================ crash points (native core only)

native_crash = pytest.mark.skipif("native" not in selected_backends(),
                                  reason="crash points exist only in the native core")


@pytest.fixture
def cq():
    import fastmq
    name = unique_name("abcrash")
    q = fastmq.Queue.create(name, maxsize=16, max_message_size=1 << 16,
                            capacity_bytes=4 << 20, _backend="native")
    try:
        yield name, q
    finally:
        q.close()
        try:
            fastmq.Queue.unlink(name, _backend="native")
        except Exception:
            pass


PRODUCER_POINTS = [
    # point, fate of the batch in flight, abandoned slots
    ("ring.reserve.claimed", "absent", 1),
    ("ring.batch.before_publish", "absent", 1),
    ("ring.batch.published", "whole", 0),
    ("pool.alloc.popped", "absent", 0),       # block records only (see below)
]


@native_crash
@pytest.mark.parametrize("mode", ["put_many", "transaction"])
@pytest.mark.parametrize("size", [SMALL, BIG], ids=["inline", "block"])
@pytest.mark.parametrize("point,fate,abandoned", PRODUCER_POINTS)
def test_producer_killed_at_every_step_of_a_batch(cq, kids, tmp_path, point, fate, abandoned,
                                                  size, mode):
    if point == "pool.alloc.popped" and size == SMALL:
        pytest.skip("an inline batch record takes no block")
    name, q = cq
    before = q.stats()
    log = tmp_path / "p.log"
    # Batches 0 and 1 go in; the child dies inside the put of batch 2.
    child = kids("produce", "native", crash=f"{point}:3", queue=name, log=log, producer=1,
                 count=5, n=4, size=size, mode=mode)
    died_by_sigkill(child)
    committed = committed_in(log)
    assert set(committed) == {(1, 0), (1, 1)}
    got = drain(q)
    assert_batches(got, committed, in_flight={(1, 2): 4})
    batches = {(p, b) for p, b, *_ in got}
    if fate == "whole":
        assert (1, 2) in batches, "a published batch must be delivered"
    else:
        assert (1, 2) not in batches, "an unpublished batch must never be delivered"
    assert got == sorted(got), "FIFO: batches and their messages in order"
    q._ring.recover()
    stats = q.stats()
    assert stats["abandoned"] - before["abandoned"] == abandoned
    # not wedged, and no block lost
    assert q.put_many([1, 2, 3], atomic=True, timeout=5) == 3
    assert q.get_many(10, timeout=5) == [1, 2, 3]
    if point == "pool.alloc.popped":
        # The pool's one documented leak window (a block popped, not yet
        # named): one block, found by the audit of a lone opener; nothing else.
        carved, free, held = q._ring._pool_census()
        assert (carved - free, held) == (1, 0)
    else:
        assert wait_until(lambda: census_clean(q), 5), q._ring._pool_census()


CONSUMER_POINTS = [
    # point:nth (nth get call of the child, batch 0 has 4 messages), the key lost
    # (handed over to the dead consumer), or None (it comes back)
    ("ring.claim.claimed:2", None),
    ("ring.batch.advanced:2", (0, 0, 1)),
    ("ring.release.before_free:1", None),     # the batch's last message (index 3)
    ("ring.release.freed:1", (0, 0, 3)),
]


@native_crash
@pytest.mark.parametrize("size", [SMALL, BIG], ids=["inline", "block"])
@pytest.mark.parametrize("point,lost", CONSUMER_POINTS)
def test_get_consumer_killed_mid_batch(cq, kids, tmp_path, point, lost, size):
    name, q = cq
    committed = put_batches(q, 0, [0, 1], 4, size)
    log = tmp_path / "c.log"
    child = kids("consume", "native", crash=point, queue=name, log=log, mode="get", count=100)
    died_by_sigkill(child)
    mine = received_in(log)
    in_order(mine)
    rest = drain(q)
    assert_batches(mine + rest, committed, lost=[lost] if lost else ())
    assert wait_until(lambda: census_clean(q), 5), q._ring._pool_census()


GET_MANY_POINTS = [
    ("ring.claim.claimed:1", False),          # before the hand-over: all of it comes back
    ("ring.release.freed:1", True),           # after: the whole batch was handed over
]


@native_crash
@pytest.mark.parametrize("size", [SMALL, BIG], ids=["inline", "block"])
@pytest.mark.parametrize("point,gone", GET_MANY_POINTS)
def test_get_many_consumer_killed_taking_a_batch(cq, kids, tmp_path, point, gone, size):
    name, q = cq
    committed = put_batches(q, 0, [0, 1], 4, size)
    log = tmp_path / "c.log"
    child = kids("consume", "native", crash=point, queue=name, log=log, mode="get_many",
                 count=100)
    died_by_sigkill(child)
    assert received_in(log) == []
    rest = drain(q)
    lost = [(0, 0, i) for i in range(4)] if gone else []
    assert_batches(rest, committed, lost=lost)
    assert wait_until(lambda: census_clean(q), 5), q._ring._pool_census()


LEASE_POINTS = [
    "lease.batch.filled:2",        # entry filled, not leased: the slot gives it back
    "lease.batch.leased:2",        # leased, cursor not moved: recovery moves it
    "ring.batch.advanced:2",       # leased and cursor moved, slot not given back
    "lease.batch.leased:4",        # the last message, before its record is freed
    "ring.release.before_free:1",  # the last message, inside the release
]


@native_crash
@pytest.mark.parametrize("size", [SMALL, BIG], ids=["inline", "block"])
@pytest.mark.parametrize("point", LEASE_POINTS)
def test_get_message_consumer_killed_mid_batch_loses_and_duplicates_nothing(
        cq, kids, tmp_path, point, size):
    """At-least-once: the dead consumer acked what it logged; what it was
    taking when it died comes back exactly once (redelivered from its lease,
    or from the batch, never both)."""
    name, q = cq
    committed = put_batches(q, 0, [0, 1], 4, size)
    log = tmp_path / "c.log"
    child = kids("consume", "native", crash=point, queue=name, log=log, mode="get_message",
                 max=1, count=100)
    died_by_sigkill(child)
    mine = received_in(log)
    in_order(mine)
    rest = drain(q, lease=True)
    assert_batches(mine + rest, committed)
    assert len(mine) + len(rest) == 8
    assert q.in_flight == 0
    assert wait_until(lambda: census_clean(q), 5), q._ring._pool_census()


@native_crash
def test_reaper_killed_finishing_a_dead_leasers_cursor_move(cq, kids, tmp_path):
    """The consumer dies with a batch message leased but the cursor not yet
    moved; the reaper that moves it for it dies too, between the cursor store
    and giving the slot back. The next reaper finishes: the message is
    redelivered once (from its lease), never again from the batch."""
    name, q = cq
    committed = put_batches(q, 0, [0], 4, SMALL)
    log = tmp_path / "c.log"
    child = kids("consume", "native", crash="lease.batch.leased:2", queue=name, log=log,
                 mode="get_message", max=1, count=100)
    died_by_sigkill(child)
    reaper = kids("reap", "native", crash="recover.batch.advanced", queue=name)
    died_by_sigkill(reaper)
    mine = received_in(log)
    rest = drain(q, lease=True)
    assert_batches(mine + rest, committed)
    assert len(mine) + len(rest) == 4
    assert wait_until(lambda: census_clean(q), 5), q._ring._pool_census()


# ============================================== SIGKILL at random moments

@pytest.mark.backends("native", "pure")
def test_random_sigkill_never_exposes_part_of_a_batch(kids, mq, backend, tmp_path):
    """Producers putting atomic batches (put_many and transactions) and
    consumers (get_message: at-least-once, so nothing may go missing) are
    SIGKILLed at random moments and restarted; a consumer that is never
    killed takes messages one at a time with get(). At the end every batch
    of which anything was delivered, and every batch whose put returned, is
    delivered whole; nothing torn."""
    rng = random.Random(1234)
    name = unique_name("abkill")
    q = mq.create(name, maxsize=64, max_message_size=1 << 16, capacity_bytes=4 << 20)
    logs = []
    producer_ids = iter(range(1, 10_000))

    def new_producer():
        pid = next(producer_ids)
        log = tmp_path / f"p{pid}.log"
        logs.append(log)
        return kids("produce", backend, queue=name, log=log, producer=pid, count=100_000,
                    n=rng.choice([2, 5, 9]), size=rng.choice([SMALL, BIG]),
                    mode=rng.choice(["put_many", "transaction"]))

    def new_consumer(mode, count=0):
        log = tmp_path / f"c{len(logs)}.log"
        logs.append(log)
        return kids("consume", backend, queue=name, log=log, mode=mode, max=4, count=count,
                    lease=2.0, idle=3.0)

    producers = [new_producer() for _ in range(2)]
    consumers = [new_consumer("get_message") for _ in range(2)]
    steady = new_consumer("get")
    kills = 0
    deadline = time.monotonic() + (6 if backend == "native" else 8)
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 0.4))
        pool = producers if rng.random() < 0.6 else consumers
        k = rng.randrange(len(pool))
        pool[k].kill()
        kills += 1
        pool[k] = new_producer() if pool is producers else new_consumer("get_message")
    for c in producers:
        c.kill()
    for c in consumers:
        c.kill()
    exited_ok(steady, timeout=120)     # it stops after 3 s without messages
    committed, received = {}, []
    for log in logs:
        committed.update(committed_in(log))
        received += received_in(log)
    received += drain(q, settle=3.0, lease=True)
    assert kills > 5 and committed, "the run did not exercise anything"
    in_flight = {}
    for p, b, i, n, ok in received:
        if ok and (p, b) not in committed:
            in_flight[(p, b)] = n       # its producer died inside the put
    assert_batches(received, committed, in_flight=in_flight, dup_ok=True)
    assert q.in_flight == 0
