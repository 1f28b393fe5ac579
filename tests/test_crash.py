"""Crash safety: any process may be SIGKILLed at any step and the queue keeps
its data and keeps moving (README "Crash safety": nothing committed is lost
or torn; nothing wedges).

NATIVE BACKEND ONLY. The crash points (``FASTMQ_CRASH_AT=<name>[:<nth>]``)
are compiled into the C core only; the pure-Python backend has none. These
tests therefore always use ``_backend="native"`` and are left out only when
``FASTMQ_TEST_BACKENDS`` explicitly excludes "native".

Method. Each test makes a small named queue (16 slots, so that later traffic
laps the ring and meets whatever a dead process left behind), runs a *fresh*
child interpreter (``tests/_crash_workers.py``) with ``FASTMQ_CRASH_AT`` set
in the child's environment only, checks that the child died by SIGKILL at
the point (returncode -9), then drains the queue and asserts:

* every committed message (``put`` returned: logged by the child after the
  call) is delivered exactly once, none torn (checksums), none duplicated;
* the message in flight at the crash has the documented fate: a producer
  killed before the publish -> never delivered (and ``abandoned`` counts the
  skipped slot); killed after it -> delivered once; a consumer killed before
  the hand-over (the slot release) -> delivered to another consumer once;
  killed after -> gone (at-most-once), never duplicated;
* the queue is not wedged: new puts and gets go through within a bounded
  time (the first message behind a dead producer's slot within
  ``RECOVERY_BOUND`` seconds);
* ``abandoned`` / ``reclaimed_blocks`` moved by exactly the expected amount.

``test_soak_short`` runs tests/soak.py for ~18 s (random SIGKILL/SIGSTOP of
producers and consumers) and asserts no torn/duplicated message and losses
only within the at-most-once bound.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import selected_backends, unique_name
import _crash_workers as W
from _worker_child import WorkerChild, read_log

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "_crash_workers.py")
CAP = 16                      # slots: small, so post-crash traffic laps the ring
RECOVERY_BOUND = 2.0          # s: first message behind a dead slot (reaping takes ~0.2 s)
MOVE_BOUND = 10.0             # s: a whole post-crash round of traffic
INLINE, BLOCK = W.SIZES["inline"], W.SIZES["block"]
SIZE_IDS = {"inline": INLINE, "block": BLOCK}

pytestmark = [
    pytest.mark.skipif("native" not in selected_backends(),
                       reason="crash points exist only in the native core and "
                              "FASTMQ_TEST_BACKENDS excludes native"),
    pytest.mark.timeout(180),
]


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    try:
        import fastmq._core  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"native backend not built ({exc!r}): the crash tests need it; "
                    "build with `pip install -e . --no-build-isolation`", pytrace=False)
    monkeypatch.setenv("FASTMQ_BACKEND", "native")
    monkeypatch.delenv("FASTMQ_CRASH_AT", raising=False)


# ------------------------------------------------------------------ children

@pytest.fixture
def kids():
    made = []

    def start(role, **kw):
        c = WorkerChild(WORKERS, role, **kw)
        made.append(c)
        return c
    try:
        yield start
    finally:
        for c in made:
            c.kill()


def died_by_sigkill(child, timeout=60.0):
    rc = child.wait(timeout)
    assert rc == -signal.SIGKILL, (f"expected the child to SIGKILL itself at the crash "
                                   f"point (rc -9), got rc={rc}; stderr:\n{child.stderr()}")


def exited_ok(child, timeout=60.0):
    rc = child.wait(timeout)
    assert rc == 0, f"child failed rc={rc}; stderr:\n{child.stderr()}"


# ------------------------------------------------------------------ the queue

@pytest.fixture
def cq():
    """(name, handle) of a fresh small named native queue; unlinked afterwards."""
    import fastmq
    name = unique_name("crash")
    q = fastmq.Queue.create(name, maxsize=CAP, max_message_size=1 << 20,
                            capacity_bytes=16 << 20, _backend="native")
    try:
        yield name, q
    finally:
        q.close()
        try:
            fastmq.Queue.unlink(name, _backend="native")
        except Exception:
            pass


class Collector(threading.Thread):
    """A consumer on its own handle in this process: drains continuously."""

    def __init__(self, name):
        super().__init__(daemon=True)
        import fastmq
        self.q = fastmq.Queue.open(name, _backend="native")
        self.got = []                 # (producer, seq, ok, monotonic time)
        self.stop = threading.Event()
        self.error = None
        self.start()

    def run(self):
        import fastmq
        try:
            while not self.stop.is_set():
                try:
                    m = self.q.get(timeout=0.05)
                except fastmq.Empty:
                    continue
                except fastmq.BadMessage:
                    self.got.append((None, None, False, time.monotonic()))
                    continue
                p, s, ok = W.check_msg(m)
                self.got.append((p, s, ok, time.monotonic()))
        except BaseException as exc:  # pragma: no cover - reported by finish()
            self.error = exc

    def keys(self):
        return {(p, s) for p, s, _, _ in self.got}

    def wait_for(self, keys, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(keys) <= self.keys():
                return True
            time.sleep(0.01)
        return set(keys) <= self.keys()

    def time_of(self, key):
        for p, s, _, t in self.got:
            if (p, s) == key:
                return t
        return None

    def finish(self, settle=0.3):
        time.sleep(settle)            # anything still arriving (a duplicate) is seen
        self.stop.set()
        self.join(5)
        self.q.close()
        assert self.error is None, f"collector failed: {self.error!r}"
        return [(p, s, ok) for p, s, ok, _ in self.got]


def put_range(q, producer, seqs, size, timeout=MOVE_BOUND):
    for s in seqs:
        q.put(W.make_msg(producer, s, size), timeout=timeout)
    return {(producer, s) for s in seqs}


def committed_in(log):
    return {(int(f[1]), int(f[2])) for f in read_log(log) if f[0] == "C"}


def received_in(log):
    return [(int(f[1]), int(f[2]), f[3] == "1") if f[0] == "R" else (None, None, False)
            for f in read_log(log)]


def assert_delivery(received, committed, *, inflight_delivered=(), inflight_absent=()):
    """Exactly-once for ``committed`` + ``inflight_delivered``; none of
    ``inflight_absent``; nothing else, nothing torn, nothing twice."""
    torn = [r for r in received if not r[2]]
    assert not torn, f"torn messages delivered: {torn[:5]}"
    counts = collections.Counter((p, s) for p, s, _ in received)
    dups = {k: v for k, v in counts.items() if v > 1}
    assert not dups, f"duplicated messages: {dups}"
    expected = set(committed) | set(inflight_delivered)
    missing = sorted(expected - set(counts))
    assert not missing, f"committed messages never delivered: {missing}"
    ghosts = sorted(set(counts) & set(inflight_absent))
    assert not ghosts, f"messages that must not be delivered were: {ghosts}"
    unexpected = sorted(set(counts) - expected)
    assert not unexpected, f"unexpected messages delivered: {unexpected}"


def delta(after, before, key):
    return after[key] - before[key]


def final_stats(q):
    """Reap whatever dead participant is left, then stats."""
    q._ring.recover()
    return q.stats()


# ========================================================= producers killed

PRODUCER_POINTS = [
    # point, fate of the in-flight message, abandoned slots
    ("ring.reserve.claimed", "absent", 1),
    ("ring.commit.before_publish", "absent", 1),
    ("ring.commit.published", "delivered", 0),
]

# Blocks taken back from the dead producer (block-sized messages). Killed at
# ring.commit.published, its published message still names the block: if the
# dead producer is reaped while that message is queued (e.g. by a handle that
# registers into its participant entry), only its writer share is dropped and
# the consumer frees the block normally (0); reaped after the message was
# consumed, the block is freed by recovery (1). Either way nothing leaks.
RECLAIMED_BLOCK = {"ring.reserve.claimed": {1}, "ring.commit.before_publish": {1},
                   "ring.commit.published": {0, 1}}


@pytest.mark.parametrize("size", ["inline", "block"])
@pytest.mark.parametrize("point,fate,abandoned", PRODUCER_POINTS)
def test_producer_killed_at(cq, kids, tmp_path, point, fate, abandoned, size):
    name, q = cq
    nbytes = SIZE_IDS[size]
    before = q.stats()
    committed = put_range(q, 0, range(3), nbytes)                    # before the child
    k = 4                                                            # it dies on seq k
    child = kids("produce", crash=f"{point}:{k + 1}", log=tmp_path / "p1.log",
                 queue=name, producer=1, count=10, size=nbytes)
    died_by_sigkill(child)
    child_committed = committed_in(child.log)
    assert child_committed == {(1, s) for s in range(k)}, child_committed
    committed |= child_committed
    t_dead = time.monotonic()
    committed |= put_range(q, 0, range(3, 6), nbytes)                # queued behind it

    col = Collector(name)
    try:
        assert col.wait_for(committed, RECOVERY_BOUND + 3), \
            f"queue wedged behind the dead producer: got {sorted(col.keys())}"
        recovered_after = col.time_of((0, 3)) - t_dead
        # keep moving: laps the ring several times
        committed |= put_range(q, 2, range(3 * CAP), nbytes)
        assert col.wait_for(committed, MOVE_BOUND)
    finally:
        received = col.finish()
    inflight = {(1, k)}
    assert_delivery(received, committed,
                    inflight_delivered=inflight if fate == "delivered" else (),
                    inflight_absent=inflight if fate == "absent" else ())
    assert recovered_after < RECOVERY_BOUND, \
        f"first message behind the dead producer took {recovered_after:.2f}s"
    after = final_stats(q)
    assert delta(after, before, "abandoned") == abandoned
    # the dead producer held one block (writer share): taken back, counted once
    assert delta(after, before, "reclaimed_blocks") in (
        RECLAIMED_BLOCK[point] if size == "block" else {0})


@pytest.mark.parametrize("point,nth,published,abandoned,size", [
    # put_many of 6: the first nth-1 were published before the death
    ("ring.reserve.claimed", 4, 3, 1, "inline"),
    ("ring.commit.before_publish", 4, 3, 1, "block"),
    ("ring.commit.published", 4, 4, 0, "inline"),
    ("ring.commit.published", 2, 2, 0, "block"),
])
def test_producer_killed_inside_put_many(cq, kids, tmp_path, point, nth, published,
                                         abandoned, size):
    """put_many did not return, so nothing is logged as committed; the messages
    published before the death are delivered exactly once, the rest never."""
    name, q = cq
    nbytes = SIZE_IDS[size]
    before = q.stats()
    child = kids("produce", crash=f"{point}:{nth}", log=tmp_path / "p1.log",
                 queue=name, producer=1, count=6, batch=6, size=nbytes)
    died_by_sigkill(child)
    assert committed_in(child.log) == set()
    committed = put_range(q, 0, range(4), nbytes)
    col = Collector(name)
    try:
        published_keys = {(1, s) for s in range(published)}
        assert col.wait_for(committed | published_keys, RECOVERY_BOUND + 3)
        committed |= put_range(q, 2, range(3 * CAP), nbytes)
        assert col.wait_for(committed, MOVE_BOUND)
    finally:
        received = col.finish()
    assert_delivery(received, committed, inflight_delivered=published_keys,
                    inflight_absent={(1, s) for s in range(published, 6)})
    after = final_stats(q)
    assert delta(after, before, "abandoned") == abandoned
    reclaimed = RECLAIMED_BLOCK[point] if size == "block" else {0}
    assert delta(after, before, "reclaimed_blocks") in reclaimed


def test_producer_killed_after_block_pop_leaks_one_block_only(cq, kids, tmp_path):
    """pool.alloc.popped is the documented one-block leak window: the message
    is not delivered, nothing else is lost, the queue keeps moving."""
    name, q = cq
    before = q.stats()
    child = kids("produce", crash="pool.alloc.popped:3", log=tmp_path / "p1.log",
                 queue=name, producer=1, count=6, size=BLOCK)
    died_by_sigkill(child)
    committed = committed_in(child.log)
    assert committed == {(1, 0), (1, 1)}
    col = Collector(name)
    try:
        committed |= put_range(q, 2, range(3 * CAP), BLOCK)
        assert col.wait_for(committed, MOVE_BOUND)
    finally:
        received = col.finish()
    assert_delivery(received, committed, inflight_absent={(1, 2)})
    after = final_stats(q)
    assert delta(after, before, "abandoned") == 0


# ========================================================= consumers killed

CONSUMER_POINTS = [
    # point, fate of the message being taken, reaped blocks (block size)
    ("ring.claim.claimed", "redelivered", 0),
    ("ring.release.before_free", "redelivered", 0),
    ("ring.release.freed", "gone", 1),            # handed over; reader share reaped
]


@pytest.mark.parametrize("size", ["inline", "block"])
@pytest.mark.parametrize("point,fate,reclaimed", CONSUMER_POINTS)
def test_consumer_killed_at(cq, kids, tmp_path, point, fate, reclaimed, size):
    name, q = cq
    nbytes = SIZE_IDS[size]
    before = q.stats()
    committed = put_range(q, 0, range(10), nbytes)
    k = 3                                                # it dies taking seq k
    child = kids("consume", crash=f"{point}:{k + 1}", log=tmp_path / "c1.log",
                 queue=name, count=10, timeout=5)
    died_by_sigkill(child)
    by_child = received_in(child.log)
    assert [(p, s) for p, s, _ in by_child] == [(0, s) for s in range(k)]
    # Another consumer (a new handle: opening reaps dead participants) and a
    # producer keep going; the producer laps the ring and meets the dead
    # consumer's slot if it is still held. (An *already open* consumer alone
    # does not bring it back: test_dead_consumers_message_comes_back_without_lapping.)
    col = Collector(name)
    try:
        committed |= put_range(q, 2, range(3 * CAP), nbytes)
        expected = committed - {(0, s) for s in range(k)} - ({(0, k)} if fate == "gone" else set())
        assert col.wait_for(expected, MOVE_BOUND), \
            f"missing: {sorted(expected - col.keys())}"
    finally:
        received = col.finish()
    victim = {(0, k)}
    assert_delivery(by_child + received, committed - victim,
                    inflight_delivered=victim if fate == "redelivered" else (),
                    inflight_absent=victim if fate == "gone" else ())
    after = final_stats(q)
    assert delta(after, before, "abandoned") == 0
    assert delta(after, before, "reclaimed_blocks") == (reclaimed if size == "block" else 0)


def test_consumer_killed_after_block_release_before_free_push(cq, kids, tmp_path):
    """pool.free.before_push: the message was handed over (slot released), so
    it is gone (at-most-once), never duplicated; one block leaks (documented)."""
    name, q = cq
    committed = put_range(q, 0, range(6), BLOCK)
    child = kids("consume", crash="pool.free.before_push:3", log=tmp_path / "c1.log",
                 queue=name, count=6, timeout=5)
    died_by_sigkill(child)
    by_child = received_in(child.log)
    assert [(p, s) for p, s, _ in by_child] == [(0, 0), (0, 1)]
    col = Collector(name)
    try:
        committed |= put_range(q, 2, range(3 * CAP), BLOCK)
        assert col.wait_for(committed - {(0, 0), (0, 1), (0, 2)}, MOVE_BOUND)
    finally:
        received = col.finish()
    assert_delivery(by_child + received, committed - {(0, 2)}, inflight_absent={(0, 2)})


@pytest.mark.parametrize("point,nth,gone,size", [
    # get_many(5) over 10 queued messages: claims 0..4, then copies, then releases
    ("ring.claim.claimed", 3, 0, "inline"),        # dies claiming the 3rd: all back
    ("ring.claim.claimed", 5, 0, "block"),
    ("ring.release.before_free", 1, 0, "block"),   # nothing released yet: all back
    ("ring.release.before_free", 3, 2, "inline"),  # 0, 1 handed over: gone
    ("ring.release.freed", 1, 1, "inline"),        # 0 handed over: gone
    ("ring.release.freed", 2, 2, "block"),
])
def test_consumer_killed_inside_get_many(cq, kids, tmp_path, point, nth, gone, size):
    name, q = cq
    nbytes = SIZE_IDS[size]
    committed = put_range(q, 0, range(10), nbytes)
    child = kids("consume", crash=f"{point}:{nth}", log=tmp_path / "c1.log",
                 queue=name, count=10, batch=5, timeout=5)
    died_by_sigkill(child)
    assert received_in(child.log) == []          # get_many never returned
    lost = {(0, s) for s in range(gone)}         # at-most-once: released before death
    col = Collector(name)
    try:
        committed |= put_range(q, 2, range(3 * CAP), nbytes)
        assert col.wait_for(committed - lost, MOVE_BOUND), \
            f"missing: {sorted(committed - lost - col.keys())}"
    finally:
        received = col.finish()
    assert_delivery(received, committed - lost, inflight_absent=lost)
    after = final_stats(q)
    assert after["abandoned"] == 0


# ========================================================= reapers killed

@pytest.mark.parametrize("size", ["inline", "block"])
def test_reaper_killed_before_skip_next_waiter_finishes(cq, kids, tmp_path, size):
    """A producer dies holding WRITING; the consumer that reaps it (a waiter
    blocked behind the slot) dies at recover.before_skip; the next waiting
    consumer finishes the job: the slot is skipped once (abandoned == 1) and
    every committed message arrives exactly once.

    The reaper opens the queue *before* anybody dies, so that it reaps as a
    waiter and not during its own open (open-time recovery is covered by
    test_opener_killed_during_open_time_recovery_leaves_queue_openable)."""
    name, q = cq
    nbytes = SIZE_IDS[size]
    before = q.stats()
    reaper = kids("consume", crash="recover.before_skip", log=tmp_path / "c1.log",
                  queue=name, count=10, timeout=10)
    reaper.expect("ready")
    prod = kids("produce", crash="ring.reserve.claimed:3", log=tmp_path / "p1.log",
                queue=name, producer=1, count=6, size=nbytes)
    died_by_sigkill(prod)
    committed = committed_in(prod.log)
    assert committed == {(1, 0), (1, 1)}
    committed |= put_range(q, 0, range(4), nbytes)        # queued behind the dead slot
    died_by_sigkill(reaper, timeout=30)                   # ~0.2 s behind the slot
    by_reaper = received_in(reaper.log)
    assert [(p, s) for p, s, _ in by_reaper] == [(1, 0), (1, 1)]
    # the next waiter: our own (already open) handle, blocked in get()
    t0 = time.monotonic()
    got = [W.check_msg(q.get(timeout=RECOVERY_BOUND + 3))]
    took = time.monotonic() - t0
    got += [W.check_msg(q.get(timeout=RECOVERY_BOUND + 3)) for _ in range(3)]
    col = Collector(name)
    try:
        committed |= put_range(q, 2, range(3 * CAP), nbytes)
        assert col.wait_for({k for k in committed if k[0] == 2}, MOVE_BOUND)
    finally:
        received = col.finish()
    assert_delivery(by_reaper + got + received, committed, inflight_absent={(1, 2)})
    assert took < RECOVERY_BOUND, f"recovery after the dead reaper took {took:.2f}s"
    after = final_stats(q)
    assert delta(after, before, "abandoned") == 1
    assert delta(after, before, "reclaimed_blocks") == (1 if size == "block" else 0)


@pytest.mark.parametrize("size", ["inline", "block"])
def test_reaper_killed_before_unclaim_next_waiter_finishes(cq, kids, tmp_path, size):
    """A consumer dies between claim and release (block: after taking the
    block's reader share); the reaper (Ring.recover(), opened before the
    death) dies at recover.before_unclaim (block: after giving that share
    back); whoever reaps next finishes the job: the message is delivered
    exactly once, the block is neither leaked nor freed twice."""
    name, q = cq
    nbytes = SIZE_IDS[size]
    before = q.stats()
    reaper = kids("reap", crash="recover.before_unclaim", queue=name, wait=True)
    reaper.expect("ready")
    committed = put_range(q, 0, range(6), nbytes)
    cons = kids("consume", crash="ring.release.before_free:2", log=tmp_path / "c1.log",
                queue=name, count=6, timeout=5)
    died_by_sigkill(cons)
    by_cons = received_in(cons.log)
    assert [(p, s) for p, s, _ in by_cons] == [(0, 0)]
    reaper.send("go")
    died_by_sigkill(reaper, timeout=30)
    col = Collector(name)
    try:
        committed |= put_range(q, 2, range(3 * CAP), nbytes)
        assert col.wait_for(committed - {(0, 0)}, MOVE_BOUND), \
            f"missing: {sorted(committed - {(0, 0)} - col.keys())}"
    finally:
        received = col.finish()
    assert_delivery(by_cons + received, committed)
    after = final_stats(q)
    assert delta(after, before, "abandoned") == 0
    assert delta(after, before, "reclaimed_blocks") == 0
    # every block is back: the pool still takes a full lap of block messages
    put_range(q, 3, range(CAP), nbytes, timeout=5)
    for _ in range(CAP):
        q.get(timeout=5)


# ========================================================= the bug reproducer

def test_dead_consumers_message_comes_back_without_lapping(cq, kids, tmp_path):
    """Minimal: a consumer killed between claim and release (before the
    hand-over) while the queue is NOT full. Nothing lost / the auto-ack contract:
    the message goes back and another consumer gets it. Another consumer that
    keeps calling get() must receive it within a few seconds -- without
    anyone calling Ring.recover() and without producers lapping the ring."""
    import fastmq
    name, q = cq
    committed = put_range(q, 0, range(3), INLINE)
    child = kids("consume", crash="ring.claim.claimed:2", log=tmp_path / "c1.log",
                 queue=name, count=3, timeout=5)
    died_by_sigkill(child)
    got = [(p, s) for p, s, _ in received_in(child.log)]
    assert got == [(0, 0)]
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            p, s, ok = W.check_msg(q.get(timeout=0.5))
        except fastmq.Empty:
            continue
        got.append((p, s))
        if set(got) >= committed:
            break
    depth = q.stats()["depth"]
    assert (0, 1) in got, (
        f"message (0, 1), claimed by a consumer that was SIGKILLed before the "
        f"release, was not redelivered within 5 s to a consumer blocked in get() "
        f"(received {got}, stats depth={depth}); only Ring.recover() or producers "
        f"lapping the ring bring it back")


def test_opener_killed_during_open_time_recovery_leaves_queue_openable(cq, kids, tmp_path):
    """Minimal: a dead producer leaves something to reap; the next process to
    open the queue reaps it during open (the lone-opener audit switches
    init_state to AUDITING and runs recovery) and is SIGKILLed there
    (recover.before_skip). Nothing wedges: no process death wedges a queue -- a
    later Queue.open() must succeed, and the queue must still work."""
    import fastmq
    name, q = cq
    prod = kids("produce", crash="ring.reserve.claimed:2", log=tmp_path / "p1.log",
                queue=name, producer=1, count=3)
    died_by_sigkill(prod)
    assert committed_in(prod.log) == {(1, 0)}
    opener = kids("reap", crash="recover.before_skip", queue=name)
    died_by_sigkill(opener, timeout=30)
    later = kids("open", queue=name)
    assert later.wait(30) == 0, later.stderr()
    line = later.expect("", timeout=5)
    assert line.startswith("opened"), (
        f"Queue.open() after an opener was killed during open-time recovery: {line!r}")
    assert W.check_msg(q.get(timeout=5))[:2] == (1, 0)


# ========================================================= creator death

def test_creator_killed_during_init_leaves_the_name_free(kids):
    """A creator killed before its segment is READY never linked it into
    place: open() says there is no such queue (at once, never a hang), and
    create() just works."""
    import fastmq
    name = unique_name("init")
    try:
        creator = kids("create", crash="init.before_ready", queue=name)
        died_by_sigkill(creator)
        t0 = time.monotonic()
        opener = kids("open", queue=name)
        rc = opener.wait(timeout=30)          # must not hang ...
        took = time.monotonic() - t0
        assert rc == 0, f"opener died (rc={rc}) instead of raising: {opener.stderr()}"
        line = opener.expect("", timeout=5)
        assert line.startswith("QueueNotFound"), line
        assert took < 10, f"open() took {took:.1f}s to give up"
        q = fastmq.Queue.create(name, maxsize=CAP, _backend="native")
        q.put("ok")
        assert q.get(timeout=2) == "ok"
        q.close()
    finally:
        try:
            fastmq.Queue.unlink(name, _backend="native")
        except Exception:
            pass


# ========================================================= anonymous queues

def _anon_group(kids):
    c = kids("anon-users", new_session=True)
    line = c.expect("segment ", timeout=30)
    return c, line.split()[1]


def _killpg(child):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(10)
    # the forked users are in the same session/group: wait until they are gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def test_kill9_every_user_of_anonymous_queue_leaves_nothing(kids):
    """Every user (creator + forked users) SIGKILLed: the segment goes at the
    latest when the next fastmq process starts or calls fastmq.cleanup().
    Only segments this test created are checked (other runs share /dev/shm)."""
    import fastmq
    a, seg_a = _anon_group(kids)
    b, seg_b = _anon_group(kids)
    path_a, path_b = (os.path.join("/dev/shm", s) for s in (seg_a, seg_b))
    assert os.path.exists(path_a) and os.path.exists(path_b)
    _killpg(a)
    # Nobody closed A, so only a cleanup removes it; any fastmq process that
    # starts on this host meanwhile (another test's child) may already have.
    # 1. the next fastmq process to start removes A; B is still in use: kept
    res = subprocess.run([sys.executable, "-c", "import fastmq"], timeout=60,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(path_a), f"{seg_a} survived the next fastmq import"
    assert os.path.exists(path_b), f"{seg_b} was removed while its users were alive"
    # 2. kill every user of B; fastmq.cleanup() removes it
    _killpg(b)
    fastmq.cleanup()
    assert not os.path.exists(path_b), f"{seg_b} survived fastmq.cleanup()"


# ========================================================= frozen processes

def _proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _wait_stopped(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _proc_state(pid) == "T":
            return True
        time.sleep(0.01)
    return False


def test_frozen_consumer_holding_a_slot_is_reported_never_reaped(cq, kids, tmp_path):
    """A consumer SIGSTOPped between claim and release (inside get_many's
    hand-over) blocks a producer one lap later: it must show in
    stats()["stalled"] (its pid, phase "reading") and must NOT be reaped; after
    SIGCONT it completes, and nothing is lost or duplicated."""
    import fastmq
    name, q = cq
    before = q.stats()
    committed = put_range(q, 0, [0], BLOCK)
    frozen = kids("freeze-holding", log=tmp_path / "c1.log", queue=name, timeout=30)
    frozen.expect("claimed")
    assert _wait_stopped(frozen.pid), "the consumer did not stop itself"
    try:
        # fill the rest of the lap and take it out again (the frozen slot is skipped)
        committed |= put_range(q, 0, range(1, CAP), BLOCK)
        got = [W.check_msg(q.get(timeout=5)) for _ in range(CAP - 1)]
        t0 = time.monotonic()
        with pytest.raises(fastmq.Full):             # ticket CAP meets the frozen slot
            q.put(W.make_msg(0, CAP, BLOCK), timeout=1.5)
        blocked = time.monotonic() - t0
        st = q.stats()
        assert st["stalled"] is not None, "a frozen holder blocking a producer is not reported"
        assert st["stalled"]["pid"] == frozen.pid, st["stalled"]
        assert st["stalled"]["phase"] == "reading", st["stalled"]
        assert 0 < st["stalled"]["since_seconds"] < 60, st["stalled"]
        assert blocked >= 1.4
        assert _proc_state(frozen.pid) == "T"
        assert delta(st, before, "recoveries") == 0, "a frozen (live) process was reaped"
        assert delta(st, before, "abandoned") == 0
        # SIGCONT: the consumer finishes its get_many, the producer gets through
        done = threading.Event()

        def producer():
            q2 = fastmq.Queue.open(name, _backend="native")
            q2.put(W.make_msg(0, CAP, BLOCK), timeout=10)
            q2.close()
            done.set()
        t = threading.Thread(target=producer, daemon=True)
        t.start()
        time.sleep(0.3)
        assert not done.is_set(), "producer got past a frozen holder's slot (reaped?)"
        os.kill(frozen.pid, signal.SIGCONT)
        exited_ok(frozen, timeout=30)
        t.join(15)
        assert done.is_set(), "producer still blocked after SIGCONT"
        committed.add((0, CAP))
        got.append(W.check_msg(q.get(timeout=5)))
    finally:
        try:
            os.kill(frozen.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert_delivery(received_in(frozen.log) + got, committed)
    assert [(p, s) for p, s, _ in received_in(frozen.log)] == [(0, 0)]
    after = q.stats()
    assert delta(after, before, "recoveries") == 0
    assert delta(after, before, "reclaimed_blocks") == 0


def test_stall_report_clears_once_the_frozen_process_resumes(cq, kids, tmp_path):
    """stats()["stalled"] reports a frozen holder *while* it blocks someone;
    once it has resumed and the queue moves again the report must go away
    (or at least stop naming that process), not linger forever."""
    name, q = cq
    put_range(q, 0, [0], INLINE)
    frozen = kids("freeze-holding", log=tmp_path / "c1.log", queue=name, timeout=30)
    frozen.expect("claimed")
    assert _wait_stopped(frozen.pid)
    import fastmq
    put_range(q, 0, range(1, CAP), INLINE)
    for _ in range(CAP - 1):
        q.get(timeout=5)
    with pytest.raises(fastmq.Full):
        q.put(W.make_msg(0, CAP, INLINE), timeout=1.0)
    assert q.stats()["stalled"]["pid"] == frozen.pid
    os.kill(frozen.pid, signal.SIGCONT)
    exited_ok(frozen, timeout=30)
    q.put(W.make_msg(0, CAP, INLINE), timeout=5)
    q.get(timeout=5)
    for i in range(3 * CAP):                      # the queue moves, laps several times
        q.put(W.make_msg(1, i, INLINE), timeout=5)
        q.get(timeout=5)
    time.sleep(0.5)
    st = q.stats()["stalled"]
    assert st is None or st["pid"] != frozen.pid, (
        f"stats()['stalled'] still names pid {frozen.pid}, which resumed and exited, "
        f"after the queue moved {3 * CAP} messages: {st}")


def test_frozen_blocked_consumer_is_not_reaped(cq, kids, tmp_path):
    """A consumer SIGSTOPped while blocked in get() on an empty queue holds
    nothing: others keep going, nothing is reaped, and after SIGCONT it
    receives normally."""
    name, q = cq
    before = q.stats()
    c = kids("consume", log=tmp_path / "c1.log", queue=name, count=1, timeout=30)
    c.expect("ready")
    time.sleep(0.3)                                # inside get(), sleeping
    os.kill(c.pid, signal.SIGSTOP)
    assert _wait_stopped(c.pid)
    try:
        committed, got = set(), []
        for s in range(2 * CAP):
            committed |= put_range(q, 0, [s], INLINE)
            got.append(W.check_msg(q.get(timeout=2)))
        st = q.stats()
        assert delta(st, before, "recoveries") == 0
        assert st["consumers"] >= 1
        time.sleep(0.5)
        assert _proc_state(c.pid) == "T"
        os.kill(c.pid, signal.SIGCONT)
        committed |= put_range(q, 1, [0], INLINE)
        exited_ok(c, timeout=30)
    finally:
        try:
            os.kill(c.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert_delivery(got + received_in(c.log), committed)
    assert [(p, s) for p, s, _ in received_in(c.log)] == [(1, 0)]
    assert delta(q.stats(), before, "recoveries") == 0


# ========================================================= soak (short)

def test_soak_short_on_a_durable_queue(tmp_path):
    """The same soak (random SIGKILL/SIGSTOP of producers and consumers) on a
    file:// queue: kills, not power loss, so the shared-memory promises hold."""
    import soak
    pytest.importorskip("fastmq._core")
    from conftest import durable_dir
    d = os.path.join(durable_dir(), f"soak-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(d)
    try:
        res = soak.run(seconds=float(os.environ.get("FASTMQ_SOAK_SECONDS", "12")),
                       producers=2, consumers=2, workdir=str(tmp_path), seed=None,
                       verbose=False, url="file://" + d)
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)
    print(soak.format_summary(res))
    assert res["kills"] >= 2, res
    assert res["torn"] == 0 and res["duplicated"] == 0 and res["wedged"] == 0, res
    assert res["lost"] == 0, res                         # beyond the at-most-once bound
    assert res["lost_after_handover"] <= res["lost_after_handover_bound"], res
    assert res["bad_inflight"] == 0, res
    assert res["hung"] == 0 and not res["errors"], res["errors"]
    assert res["delivered"] > 0 and res["committed"] > 0


def test_soak_short(tmp_path):
    # 61 slots, no power of two: tickets map to slots and laps by the
    # reciprocal multiply (fmq_ticket_lap) through every kill and recovery;
    # the durable soak above keeps the default power-of-two ring.
    import soak
    res = soak.run(seconds=float(os.environ.get("FASTMQ_SOAK_SECONDS", "18")),
                   producers=2, consumers=2, workdir=str(tmp_path), seed=None,
                   verbose=False, maxsize=61)
    print(soak.format_summary(res))
    assert res["kills"] >= 3, res
    assert res["torn"] == 0, res
    assert res["duplicated"] == 0, res
    assert res["wedged"] == 0, res
    assert res["lost"] == 0, res                         # beyond the at-most-once bound
    assert res["lost_after_handover"] <= res["lost_after_handover_bound"], res
    assert res["bad_inflight"] == 0, res
    assert res["hung"] == 0 and not res["errors"], res["errors"]
    assert res["delivered"] > 0 and res["committed"] > 0
