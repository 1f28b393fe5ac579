"""Zero-copy leased messages: ``Message.data`` of a payload
that lives in a pool block views shared memory in place, pinned like
``recv()``: the bytes stay valid while a view lives -- past ``ack()``, past an
expiry and a redelivery taken by another process -- and the block is given
back once the message is settled and its last view is gone, or when the
holder is killed.

The pure backend always copies (it has no shared mapping), so its half of
these tests checks only what both promise: the bytes, and that settling
releases nothing a view still sees.
"""
from __future__ import annotations

import gc
import os
import signal
import time

import pytest

import fastmq
from conftest import SHM_DIR, native_only, pool_room, unique_name, wait_until

pytestmark = pytest.mark.timeout(120)

KiB, MiB = 1024, 1024 * 1024
BIG = 200 * KiB
POOL = {"maxsize": 64, "max_message_size": 1 * MiB, "capacity_bytes": 4 * MiB}


def pattern(n, seed):
    """n deterministic bytes that differ for every seed."""
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def room(q):
    return pool_room(q, BIG)


def churn(q, rounds, size=BIG):
    """Fill the queue until Full, check and drain it, ``rounds`` times: every
    free block is written with fresh bytes (the pool is LIFO, so a
    one-at-a-time churn would keep reusing one block)."""
    for r in range(rounds):
        sent = []
        while True:
            data = pattern(size, 1000 + 64 * r + len(sent))
            try:
                q.put_bytes(data, block=False)
            except fastmq.Full:
                break
            sent.append(data)
        assert sent, "churn: the queue took nothing"
        assert [q.get_bytes(timeout=10) for _ in sent] == sent


def address(view):
    """Where a buffer's bytes are (to tell a view of shared memory from a copy)."""
    np = pytest.importorskip("numpy")
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]


def in_mapping(addr, q):
    """Is ``addr`` inside this process's mapping of the queue's segment? The
    mapping is found by the segment's inode: it was mapped under the
    temporary name it was built under, which maps still show."""
    ino = os.stat(os.path.join(SHM_DIR, q._live_ring().name)).st_ino
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[4] == str(ino):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= addr < hi:
                    return True
    return False


# ------------------------------------------------------------------ views

def _leased_big(mq, tag, seed, lease=30.0):
    """A queue (named if ``tag``), its free room, and one big message of it
    leased by us: (name, queue, room, payload, message)."""
    name = unique_name(tag) if tag else None
    q = mq.create(name, **POOL) if tag else mq.Queue(**POOL)
    before = room(q)
    data = pattern(BIG, seed)
    q.put_bytes(data)
    return name, q, before, data, q.get_message(timeout=5, lease=lease)


def test_big_payload_is_viewed_in_place(mq, backend):
    native_only(backend, "the pure backend has no shared mapping to view")
    q = mq.Queue(**POOL)
    data = pattern(BIG, 1)
    q.put_bytes(data)
    m = q.get_message(timeout=5)
    a, b = m.data, m.data
    assert a.readonly and bytes(a) == data
    assert address(a) == address(b)
    assert in_mapping(address(a), q)     # the queue's shared memory, not a copy
    m.ack()


def test_view_outlives_ack_and_block_comes_back_after(mq):
    _, q, before, data, m = _leased_big(mq, None, 2)
    view = m.data[10:]                    # a derived view keeps the pin
    m.ack()
    assert q.pending() == []
    churn(q, 3)                  # every free block is reused meanwhile
    assert bytes(view) == data[10:]
    del view, m
    gc.collect()
    assert room(q) == before              # the pinned block was given back


def test_acked_messages_stay_readable_and_give_memory_back_when_dropped(mq, backend):
    q = mq.Queue(**POOL)
    before = room(q)
    for i in range(before):
        q.put_bytes(pattern(BIG, i))
    msgs = q.get_messages(before, timeout=5)
    assert q.ack_many(msgs) == before
    churn_rounds = 0
    if backend == "pure":                    # copies: the pool is free at once
        churn(q, 3)
        churn_rounds = 3
    # still readable after the ack (and after any churn)
    assert [bytes(m.data) for m in msgs] == [pattern(BIG, i) for i in range(before)]
    if backend == "native":                  # pinned by the live Messages
        assert room(q) == 0
    del msgs
    gc.collect()
    assert room(q) == before, churn_rounds


def test_value_of_big_numpy_payload_is_decoded_from_the_block(mq):
    np = pytest.importorskip("numpy")
    q = mq.Queue(**POOL)
    arr = np.arange(60_000, dtype=np.float32)
    q.put(arr)
    m = q.get_message(timeout=5)
    got = m.value
    m.ack()
    churn(q, 3)
    np.testing.assert_array_equal(got, arr)     # a copy: independent of the block
    assert got.flags.writeable


def test_custom_serializer_gets_bytes_from_a_pinned_payload(mq):
    seen = []

    def loads(b):
        seen.append(type(b))
        return b[:4]
    q = mq.Queue(**POOL, serializer=(lambda o: o, loads))
    q.put(b"abcd" + bytes(BIG))
    m = q.get_message(timeout=5)
    assert m.value == b"abcd" and seen == [bytes]
    m.ack()


# ------------------------------------------------ other processes meanwhile

def _take_redelivered(backend, name, size, seed, done):
    q = fastmq.Queue.open(name, _backend=backend)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            m = q.get_message(timeout=0.5, lease=30)
        except fastmq.Empty:
            continue
        ok = m.delivery_count == 2 and bytes(m.data) == pattern(size, seed)
        m.ack()
        with open(done, "w") as f:
            f.write("ok" if ok else f"bad: count {m.delivery_count}")
        # churn the pool from this process too, while the parent's view lives
        churn(q, 3, size)
        with open(done, "a") as f:
            f.write(" churned")
        return
    raise SystemExit("nothing redelivered")


def test_view_outlives_expiry_and_redelivery_to_another_process(mq, backend, children,
                                                                tmp_path):
    name, q, before, data, m = _leased_big(mq, "pinx", 3, lease=0.3)
    view = m.data
    done = tmp_path / "done"
    child = children.start(_take_redelivered, backend, name, BIG, 3, str(done))
    assert wait_until(lambda: done.exists() and "churned" in done.read_text(), 30), \
        "the other consumer never took the expired message"
    children.join(10, [child])
    assert done.read_text() == "ok churned"
    assert bytes(view) == data                    # untouched by the redelivery and churn
    with pytest.raises(fastmq.LeaseLost):
        m.ack()
    assert bytes(m.data) == data                  # the message still pins it too
    del view
    gc.collect()
    assert room(q) == (before - 1 if backend == "native" else before)
    del m
    gc.collect()
    assert room(q) == before
    assert q.pending() == []


def _lease_view_and_hang(backend, name, ready):
    q = fastmq.Queue.open(name, _backend=backend)
    m = q.get_message(timeout=5, lease=120)
    view = m.data                                  # noqa: F841 - held until killed
    with open(ready, "w") as f:
        f.write(str(len(view)))
    time.sleep(60)


def test_killed_holder_with_live_view_loses_nothing_and_leaks_nothing(mq, backend,
                                                                       children, tmp_path):
    name = unique_name("pink")
    q = mq.create(name, **POOL)
    before = room(q)
    data = pattern(BIG, 4)
    q.put_bytes(data)
    ready = tmp_path / "ready"
    child = children.start(_lease_view_and_hang, backend, name, str(ready))
    assert wait_until(lambda: ready.exists() and ready.read_text(), 20)
    assert ready.read_text() == str(BIG)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    m = q.get_message(timeout=10, lease=30)
    assert m.delivery_count == 2 and bytes(m.data) == data
    m.ack()
    del m
    gc.collect()
    assert wait_until(lambda: room(q) == before, 10), (room(q), before)


def test_nack_with_live_view_requeues_a_copy(mq):
    _, q, before, data, m = _leased_big(mq, None, 5)
    view = m.data
    m.nack()
    again = q.get_message(timeout=5)
    assert again.delivery_count == 2 and bytes(again.data) == data
    again.ack()
    churn(q, 3)
    assert bytes(view) == data
    del view, m, again
    gc.collect()
    assert room(q) == before


# --------------------------------------------- a redeliverer killed half-way

_REDELIVER = """
import sys, fastmq
q = fastmq.Queue.open(sys.argv[1], _backend="native")
q.redeliver_expired()
print("survived")
"""


@pytest.mark.parametrize("point", ["lease.share.co_owned", "lease.requeue.before_commit",
                                   "lease.requeue.committed"])
def test_redeliverer_killed_while_holder_views_the_payload(mq, backend, point):
    """Another process ends the holder's expired lease and is SIGKILLed at
    each step of the hand-over (queue co-owns the block / copy made, not
    committed / committed, entry not freed): the holder's view never changes,
    the message comes back -- once, or twice when the redeliverer died after
    committing the copy (re-enqueue before free: a duplicate, never a loss)
    -- and every block comes back."""
    copies = 2 if point == "lease.requeue.committed" else 1
    native_only(backend, "crash points are compiled into the C core")
    import subprocess
    import sys
    name, q, before, data, m = _leased_big(mq, "pinr", 6, lease=0.2)
    view = m.data
    time.sleep(0.3)                                   # expired, nobody noticed yet
    env = dict(os.environ, FASTMQ_BACKEND="native", FASTMQ_CRASH_AT=point)
    res = subprocess.run([sys.executable, "-c", _REDELIVER, name], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stdout, res.stderr)
    assert bytes(view) == data
    back = []
    deadline = time.monotonic() + 5                   # recovery: ~1 s
    while time.monotonic() < deadline:
        try:
            back += q.get_messages(4, timeout=0.3, lease=30)
        except fastmq.Empty:
            if len(back) >= copies:
                break
    assert [bytes(b.data) for b in back] == [data] * copies, \
        [b.delivery_count for b in back]
    assert all(b.delivery_count == 2 for b in back)
    assert q.ack_many(back) == copies
    churn(q, 3)
    assert bytes(view) == data
    with pytest.raises(fastmq.LeaseLost):
        m.ack()
    del view, m, back
    gc.collect()
    assert wait_until(lambda: room(q) == before, 10), (room(q), before)
    assert q.pending() == [] and q.qsize() == 0


# ------------------------------------------------ stress: kills, expiry, churn

STRESS_SIZE = 100 * KiB


def _stress_payload(i):
    return i.to_bytes(8, "little") + pattern(STRESS_SIZE - 8, i % 251)


def _send_what_fits(q, sent, n):
    """Put stress messages sent..n-1 until the queue is full; the new ``sent``."""
    while sent < n:
        try:
            q.put_bytes(_stress_payload(sent), block=False)
        except fastmq.Full:
            break
        sent += 1
    return sent


def _stress_consumer(backend, name, log, seed, seconds):
    """Lease batches with short random leases; check every view twice (at
    once, and again later while other processes churn the pool); ack 60%,
    nack 10%, let 30% expire while still viewing them."""
    import random
    rng = random.Random(seed)
    q = fastmq.Queue.open(name, _backend=backend)
    held = []                                   # (message, view, expected) left to expire
    end = time.monotonic() + seconds
    with open(log, "a", buffering=1) as out:
        while time.monotonic() < end:
            try:
                msgs = q.get_messages(4, timeout=0.2, lease=rng.choice((0.05, 0.2, 0.5)))
            except fastmq.Empty:
                msgs = []
            for m in msgs:
                view = m.data
                i = int.from_bytes(view[:8], "little")
                if bytes(view) != _stress_payload(i):
                    out.write(f"CORRUPT {i} at lease\n")
                    continue
                r = rng.random()
                if r < 0.6:
                    try:
                        m.ack()
                        out.write(f"ACK {i}\n")
                    except fastmq.LeaseLost:
                        pass                      # expired meanwhile: it comes back
                elif r < 0.7:
                    try:
                        m.nack()
                    except fastmq.LeaseLost:
                        pass
                else:
                    held.append((m, view, i))
            if len(held) > 6 or (held and rng.random() < 0.2):
                m, view, i = held.pop(0)
                if bytes(view) != _stress_payload(i):
                    out.write(f"CORRUPT {i} while held\n")
                del m, view


@pytest.mark.timeout(180)
def test_pinned_leases_survive_kills_expiry_and_churn(mq, backend, children, tmp_path):
    """3 consumers view big leased messages in place and ack, nack or let
    them expire at random, while one of them is SIGKILLed every ~0.4 s and
    replaced: no view ever changes under its reader, every message is acked
    in the end, and when everyone is gone every block is back in the pool."""
    import random
    rng = random.Random(20261127)
    name = unique_name("pins")
    q = mq.create(name, maxsize=64, max_message_size=1 * MiB, capacity_bytes=16 * MiB)
    before = pool_room(q, STRESS_SIZE)
    n = 400 if backend == "native" else 60
    seconds = 8.0 if backend == "native" else 6.0
    logs, procs = [], []

    def spawn(k):
        log = tmp_path / f"c{k}.log"
        logs.append(log)
        procs.append(children.start(_stress_consumer, backend, name, str(log), k, seconds))

    for k in range(3):
        spawn(k)
    end = time.monotonic() + seconds
    sent = kills = 0
    while time.monotonic() < end:
        sent = _send_what_fits(q, sent, n)
        time.sleep(0.4)
        live = [p for p in procs if p.is_alive()]
        if live and time.monotonic() < end - 1:
            victim = rng.choice(live)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(5)
            kills += 1
            spawn(len(logs))
    for p in procs:
        p.join(seconds + 10)
        assert p.exitcode in (0, -signal.SIGKILL), p.exitcode
    text = "".join(log.read_text() for log in logs if log.exists())
    assert "CORRUPT" not in text, [ln for ln in text.splitlines() if "CORRUPT" in ln][:5]
    acked = {int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("ACK ")}
    # the parent sends and drains what is left (killed holders' leases come
    # back on recovery)
    deadline = time.monotonic() + 30
    while len(acked) < n and time.monotonic() < deadline:
        sent = _send_what_fits(q, sent, n)
        try:
            got = q.get_messages(16, timeout=0.5, lease=30)
        except fastmq.Empty:
            continue
        for m in got:
            assert bytes(m.data) == _stress_payload(int.from_bytes(m.data[:8], "little"))
            acked.add(int.from_bytes(m.data[:8], "little"))
        q.ack_many(got)
        del got, m
    assert acked == set(range(n)), f"never acked: {sorted(set(range(n)) - acked)[:20]}"
    assert kills >= 5
    assert q.stats()["redelivered"] >= 10      # expiries, nacks and kills did happen
    gc.collect()
    # duplicates (at-least-once) may still be queued or in flight: drain them too
    assert wait_until(lambda: _drain(q) or (not q.pending() and q.qsize() == 0), 20)
    assert wait_until(lambda: pool_room(q, STRESS_SIZE) == before, 10), \
        (pool_room(q, STRESS_SIZE), before)


def _drain(q):
    try:
        got = q.get_messages(64, block=False, lease=30)
    except fastmq.Empty:
        return False
    q.ack_many(got)
    return False
