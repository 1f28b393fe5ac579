"""Races and churn around the core behaviour: concurrent create/open,
handle churn (descriptors, participant entries), lost wake-ups, close() while
another thread is blocked, threads inside several processes."""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import threading
import time

import pytest

import fastmq
import _workers as W
from conftest import ChildGroup, Shm, segment_name

pytestmark = pytest.mark.timeout(120)


def _fds():
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------ create/open races

def _racing_creator(name, backend, start, results, i):
    start.wait(30)
    try:
        q = fastmq.Queue.create(name, maxsize=64, exist_ok=True, _backend=backend)
        q.put(("hello", i), timeout=30)
        q.close()
        results.put(("ok", i))
    except BaseException as e:  # reported to the parent
        results.put(("error", f"{type(e).__name__}: {e}"))


def test_concurrent_create_exist_ok_share_one_queue(mq, qname, backend):
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    g = ChildGroup(ctx)
    try:
        for i in range(8):
            g.start(_racing_creator, qname, backend, start, results, i)
        start.set()
        outcomes = [results.get(timeout=60) for _ in range(8)]
        g.join(60)
    finally:
        g.reap()
    errors = [o for o in outcomes if o[0] != "ok"]
    assert not errors, errors
    mq.names.append(qname)
    q = mq.open(qname)
    got = q.get_many(100, timeout=5)
    assert sorted(i for _, i in got) == list(range(8)), "creators ended up in different queues"


def _racing_exclusive_creator(name, backend, start, results):
    start.wait(30)
    try:
        q = fastmq.Queue.create(name, _backend=backend)
        q.close()
        results.put("created")
    except fastmq.QueueExists:
        results.put("exists")
    except BaseException as e:
        results.put(f"{type(e).__name__}: {e}")


def test_concurrent_exclusive_create_exactly_one_wins(mq, qname, backend):
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    g = ChildGroup(ctx)
    try:
        for _ in range(8):
            g.start(_racing_exclusive_creator, qname, backend, start, results)
        start.set()
        outcomes = [results.get(timeout=60) for _ in range(8)]
        g.join(60)
    finally:
        g.reap()
    mq.names.append(qname)
    assert sorted(outcomes) == ["created"] + ["exists"] * 7, outcomes


def _racing_opener(name, backend, start, results):
    start.wait(30)
    deadline = time.monotonic() + 30
    while True:
        try:
            q = fastmq.Queue.open(name, _backend=backend)
            break
        except fastmq.QueueNotFound:
            if time.monotonic() > deadline:
                results.put("never appeared")
                return
        except BaseException as e:  # CorruptQueue here = half-initialized segment seen
            results.put(f"{type(e).__name__}: {e}")
            return
    try:
        results.put(("got", q.get(timeout=30)))
    finally:
        q.close()


def test_open_racing_create_never_sees_a_half_made_queue(mq, qname, backend):
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    g = ChildGroup(ctx)
    try:
        for _ in range(4):
            g.start(_racing_opener, qname, backend, start, results)
        start.set()
        q = mq.create(qname)
        q.put_many(["a", "b", "c", "d"])
        outcomes = [results.get(timeout=60) for _ in range(4)]
        g.join(60)
    finally:
        g.reap()
    assert sorted(outcomes) == [("got", x) for x in "abcd"], outcomes


# ------------------------------------------------------------ churn

def test_named_handle_churn_keeps_working_and_leaks_nothing(mq, qname):
    q = mq.create(qname)
    gc.collect()
    fds = _fds()
    for i in range(300):
        h = mq.open(qname)
        h.put(i)
        assert q.get(timeout=5) == i
        h.close()
    mq.handles.clear()
    mq.handles.append(q)
    gc.collect()
    assert _fds() <= fds + 2, f"descriptors leaked: {fds} -> {_fds()}"
    assert q.stats()["producers"] <= 2


def test_many_simultaneous_handles_in_one_process(mq, qname):
    q = mq.create(qname)
    hs = [mq.open(qname) for _ in range(150)]
    for i, h in enumerate(hs):
        h.put_bytes(b"%d" % i)
    got = sorted(int(q.get_bytes(timeout=5)) for _ in range(150))
    assert got == list(range(150))


def test_anonymous_queue_churn_leaks_nothing(mq):
    gc.collect()
    fds = _fds()
    names = []
    for i in range(120):
        q = fastmq.Queue(maxsize=4, _backend=mq.backend)
        q.put(i)
        assert q.get_nowait() == i
        names.append(segment_name(q))
        if i % 2:
            q.close()
        else:
            del q  # garbage collection closes it too
    gc.collect()
    assert _fds() <= fds + 2, f"descriptors leaked: {fds} -> {_fds()}"
    left = [n for n in names if os.path.exists(Shm.path(n))]
    assert not left, f"{len(left)} anonymous segments left behind"


def _short_lived_user(q, i):
    q.put(i, timeout=30)
    # normal exit without close()


def test_many_short_lived_processes(mq):
    """More processes than any participant table has rows use one queue one
    after another (each exits normally without closing): entries are reused."""
    q = mq.Queue()
    g = ChildGroup(mp.get_context("fork"))
    try:
        for batch in range(10):
            procs = [g.start(_short_lived_user, q, batch * 20 + j) for j in range(20)]
            g.join(60, procs)
            g.procs.clear()
    finally:
        g.reap()
    got = []
    while len(got) < 200:
        got += q.get_many(1000, timeout=5)
    assert sorted(got) == list(range(200))
    st = q.stats()
    assert st["producers"] <= 2, f"dead processes still counted as producers: {st}"


# ------------------------------------------------------------ wake-ups

def _ponger(a, b, n):
    for _ in range(n):
        b.put_bytes(a.get_bytes(timeout=20), timeout=20)


@pytest.mark.parametrize("n", [1000])
def test_ping_pong_has_no_lost_wakeups(mq, n):
    """Two processes take turns blocking on each other. A lost wake-up costs
    a stall (a whole timeout, or at best a periodic re-check) on the round trip."""
    a, b = mq.Queue(maxsize=1), mq.Queue(maxsize=1)
    g = ChildGroup(mp.get_context("fork"))
    try:
        p = g.start(_ponger, a, b, n)
        t0 = time.monotonic()
        worst = 0.0
        for i in range(n):
            t = time.monotonic()
            a.put_bytes(b"%d" % i, timeout=20)
            assert b.get_bytes(timeout=20) == b"%d" % i
            worst = max(worst, time.monotonic() - t)
        total = time.monotonic() - t0
        g.join(30, [p])
    finally:
        g.reap()
    assert total < 20, f"{n} round trips took {total:.1f}s (lost wake-ups?)"
    assert worst < 5, f"one round trip stalled {worst:.2f}s"


def _blocked_consumer(q, ready, results):
    ready.release()
    results.put(q.get(timeout=30))


def test_put_many_wakes_every_blocked_consumer(mq):
    q = mq.Queue()
    ctx = mp.get_context("fork")
    ready, results = ctx.Semaphore(0), ctx.Queue()
    g = ChildGroup(ctx)
    try:
        for _ in range(6):
            g.start(_blocked_consumer, q, ready, results)
        for _ in range(6):
            assert ready.acquire(timeout=30)
        time.sleep(0.3)  # let them reach the blocking call (the property holds either way)
        t0 = time.monotonic()
        q.put_many(range(6))
        got = sorted(results.get(timeout=30) for _ in range(6))
        dt = time.monotonic() - t0
        g.join(30)
    finally:
        g.reap()
    assert got == list(range(6))
    assert dt < 3, f"waking 6 blocked consumers took {dt:.2f}s"


def test_many_waiting_threads_all_time_out_on_time(mq):
    q = mq.Queue()
    out = []

    def waiter():
        t0 = time.monotonic()
        try:
            q.get(timeout=0.5)
            out.append(("got", 0))
        except fastmq.Empty:
            out.append(("empty", time.monotonic() - t0))

    ts = [threading.Thread(target=waiter) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert len(out) == 8
    assert all(kind == "empty" and 0.49 <= dt <= 2.0 for kind, dt in out), out


# ------------------------------------------------------------ close while blocked

@pytest.mark.parametrize("op", ["get", "get_bytes", "get_many", "put", "recv"])
def test_close_from_other_thread_ends_blocked_call(mq, op):
    """Ring contract: a blocked call notices close() of its handle (within
    ~100 ms); it then fails with QueueClosed instead of sleeping on."""
    q = mq.Queue(maxsize=1)
    if op == "put":
        q.put("filler")
    result = []

    def blocked():
        try:
            if op == "put":
                q.put("x", timeout=30)
            elif op == "get_many":
                q.get_many(3, timeout=30)
            elif op == "recv":
                q.recv(timeout=30)
            else:
                getattr(q, op)(timeout=30)
            result.append("returned")
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)  # let it block (if it has not, it sees a closed handle: same outcome)
    t0 = time.monotonic()
    q.close()
    t.join(10)
    dt = time.monotonic() - t0
    assert not t.is_alive(), "the blocked call did not notice close()"
    assert len(result) == 1 and isinstance(result[0], fastmq.QueueClosed), result
    assert dt < 2.0, f"close() took {dt:.2f}s to end the blocked call"


def test_pickling_a_closed_handle_is_queue_closed(mq):
    q = mq.Queue()
    q.close()
    with pytest.raises(fastmq.QueueClosed):
        pickle.dumps(q)


# ------------------------------------------------------------ threads in processes

def _threaded_producer(q, pid, per_thread):
    def run(t):
        for i in range(per_thread):
            q.put((pid, t, i), timeout=30)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts)


def _threaded_consumer(q, result_path):
    got, lock = [], threading.Lock()

    def run():
        mine = []
        while True:
            batch = q.get_many(16, timeout=30)
            if None in batch:
                k = batch.index(None)
                mine.extend(batch[:k])
                for extra in batch[k + 1:]:  # other threads' sentinels: give back
                    q.put(extra, timeout=30)
                with lock:
                    got.extend(mine)
                return
            mine.extend(batch)

    ts = [threading.Thread(target=run) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    with open(result_path, "wb") as f:
        pickle.dump(got, f)


def test_threads_inside_several_processes(mq, tmp_path):
    q = mq.Queue(maxsize=32)
    g = ChildGroup(mp.get_context("fork"))
    per = 300
    paths = [str(tmp_path / f"c{i}") for i in range(2)]
    try:
        prods = [g.start(_threaded_producer, q, p, per) for p in range(2)]
        cons = [g.start(_threaded_consumer, q, paths[i]) for i in range(2)]
        g.join(90, prods)
        for _ in range(6):  # one sentinel per consumer thread
            q.put(None, timeout=30)
        g.join(90, cons)
    finally:
        g.reap()
    got = []
    for path in paths:
        with open(path, "rb") as f:
            got += pickle.load(f)
    expected = sorted((p, t, i) for p in range(2) for t in range(3) for i in range(per))
    assert sorted(got) == expected


# ------------------------------------------------------------ fork while busy

def _child_after_busy_fork(q, other, results):
    t0 = time.monotonic()
    try:
        q.put("from child", timeout=10)
        other.put_bytes(b"x", timeout=10)
        assert other.get_bytes(timeout=10) == b"x"
        q.close()
        other.close()
        results.put(("ok", time.monotonic() - t0))
    except BaseException as e:
        results.put((f"{type(e).__name__}: {e}", time.monotonic() - t0))


@pytest.mark.parametrize("parent_op", ["get", "put"])
def test_fork_while_another_thread_is_blocked(mq, parent_op):
    """A thread of the parent sits in a blocking call on the same handle
    when the process forks: the child's copy must work and close normally."""
    q = mq.Queue(maxsize=2)
    other = mq.Queue()
    if parent_op == "put":
        q.put("filler")
        q.put("filler")
    done = []

    def blocked():
        try:
            if parent_op == "get":
                done.append(q.get(timeout=20))
            else:
                q.put("from parent thread", timeout=20)
                done.append("put")
        except BaseException as e:
            done.append(e)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)  # the thread is (very likely) inside the blocking call now
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    g = ChildGroup(ctx)
    try:
        if parent_op == "put":  # room for both the thread's and the child's put
            assert q.get_many(2, timeout=10) == ["filler", "filler"]
        p = g.start(_child_after_busy_fork, q, other, results)
        outcome, dt = results.get(timeout=30)
        g.join(30, [p])
    finally:
        g.reap()
        t.join(30)
    assert outcome == "ok", outcome
    assert not t.is_alive()
    if parent_op == "get":
        assert done == ["from child"]
    else:
        assert done == ["put"]
        assert sorted([q.get(timeout=5), q.get(timeout=5)]) == ["from child",
                                                                "from parent thread"]
