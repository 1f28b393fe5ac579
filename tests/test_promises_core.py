"""Promises of the ring and the in-flight table under misuse, damage and
death: waits that let the process run, bounds that raise instead of
deadlocking, handles that give back what they hold when they close, damaged
records that are consumed instead of wedging the queue or being delivered
as someone else's bytes, and crash recovery against every state a message
can be in while a dead producer still names its block.

Damage is done the way a buggy or hostile co-process would do it: by writing
into the live segment file (``/dev/shm/<segment>``), at the offsets the
segment's own header gives (see ``csrc/fmq_layout.h``). Most of those tests
are native-only by nature (the pure backend's file has another layout); the
damaged-record family at the end damages either backend's file at its own
offsets.
"""
from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastmq
from conftest import native_only, unique_name

BLOCK = 10_000            # bytes: a block message (more than a slot holds)


# ---------------------------------------------------------------- segment access

class Segment:
    """Read/write fields of a live native segment at the header's offsets."""

    def __init__(self, q):
        self.path = "/dev/shm/" + q._ring.name
        self.fd = os.open(self.path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        (self.slot_count, self.slot_stride, self.nclasses, _mms, _cap, _np, _md, self.ctl,
         _parts, self.ring, self.lease) = struct.unpack_from("<QIIQQIIQQQQ", self.map, 32)
        self.lease_stride = self.slot_stride + 64

    def close(self):
        self.map.close()
        os.close(self.fd)

    def u64(self, off, value=None):
        if value is None:
            return struct.unpack_from("<Q", self.map, off)[0]
        struct.pack_into("<Q", self.map, off, value)

    def u32(self, off, value=None):
        if value is None:
            return struct.unpack_from("<I", self.map, off)[0]
        struct.pack_into("<I", self.map, off, value)

    # hints (fmq_ctl: tail, then head, each on its own 128-byte line)
    @property
    def tail_off(self):
        return self.ctl

    @property
    def head_off(self):
        return self.ctl + 128

    def slot(self, ticket):
        return self.ring + (ticket % self.slot_count) * self.slot_stride

    def entry(self, index):
        return self.lease + index * self.lease_stride


@pytest.fixture
def seg_of():
    made = []

    def make(q):
        s = Segment(q)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


# ---------------------------------------------------------------- waits

def test_waiting_for_a_full_in_flight_table_lets_other_threads_run_and_close_ends_it(mq):
    q = mq.Queue(maxsize=2)
    other = pickle.loads(pickle.dumps(q))
    mq.handles.append(other)
    q.put_many([1, 2])
    held = other.get_messages(2, timeout=5, lease=60)   # the whole table, elsewhere
    q.put(3)
    outcome = {}

    def waiter():
        t0 = time.monotonic()
        try:
            q.get_message(timeout=4)
            outcome["r"] = "got"
        except fastmq.QueueClosed:
            outcome["r"] = "closed"
        except fastmq.Empty:
            outcome["r"] = "empty"
        outcome["t"] = time.monotonic() - t0

    t = threading.Thread(target=waiter)
    t.start()
    try:
        time.sleep(0.2)
        ticks, t_end = 0, time.monotonic() + 0.5
        while time.monotonic() < t_end:            # this thread needs the GIL
            ticks += 1
            time.sleep(0.001)
        assert ticks > 50, f"the waiting get_message held the GIL ({ticks} ticks in 0.5 s)"
        closed_at = time.monotonic()
        q.close()
        t.join(5)
        assert not t.is_alive()
        assert outcome["r"] == "closed", outcome
        assert time.monotonic() - closed_at < 1.5
    finally:
        t.join(10)
        for m in held:
            m.ack()


# ---------------------------------------------------------------- bounds

def test_a_handle_holding_the_whole_in_flight_table_gets_too_many_in_flight(mq):
    q = mq.Queue(maxsize=4)
    q.put_many(range(4), timeout=5)
    held = q.get_messages(4, timeout=5, lease=60)
    assert len(held) == 4
    q.put_many(range(4, 6), timeout=5)
    t0 = time.monotonic()
    with pytest.raises(fastmq.TooManyInFlight, match="maxsize=4"):
        q.get_message(timeout=2)
    assert time.monotonic() - t0 < 1.0            # raised, never waited
    held[0].ack()
    assert q.get_message(timeout=5).value == 4    # room again: the next message


def test_a_ring_refuses_a_max_message_size_its_32_bit_lengths_cannot_record(backend):
    # Queue.create caps max_message_size lower; the ring itself must refuse
    # what a slot's 32-bit length field cannot carry (both backends alike).
    from fastmq import _backend
    ring_cls = _backend.ring_module(backend).Ring
    name = "fastmq-q-" + unique_name("big")
    try:
        with pytest.raises(ValueError, match="max_message_size"):
            ring = ring_cls.create(name, maxsize=4, max_message_size=2 ** 32,
                                   capacity_bytes=2 ** 32 + 2 ** 20)
            ring.close()
    finally:
        try:
            ring_cls.unlink(name)
        except Exception:
            pass


# ---------------------------------------------------------------- close hands back

def test_closing_a_handle_gives_its_unacked_leases_back_at_once(mq, backend):
    q = mq.Queue(maxsize=8)
    other = pickle.loads(pickle.dumps(q))
    mq.handles.append(other)
    q.put_bytes(b"a" * BLOCK)
    q.put_bytes(b"b" * 16)
    held = q.get_messages(2, timeout=5, lease=60)
    views = [m.data for m in held]                # still referenced, views alive
    q.close()
    got = sorted((bytes(m.data), m.delivery_count) for m in
                 (other.get_message(timeout=0.5, lease=60) for _ in range(2)))
    assert got == [(b"a" * BLOCK, 2), (b"b" * 16, 2)]
    assert bytes(views[0]) == b"a" * BLOCK        # the old views still read their bytes


def test_dead_letters_taken_by_a_handle_that_closed_are_forwarded_later(mq, qname):
    dlq_name = qname + "-dlq"
    dlq = mq.create(dlq_name, maxsize=1)
    mq.names.append(dlq_name)
    dlq.put("filler")                              # the dead-letter queue is full
    q = mq.create(qname, maxsize=8, dead_letter=dlq_name)
    q.put("doomed")
    q.get_message(timeout=5).nack(requeue=False)   # parked for the dead-letter queue
    q.redeliver_expired()                          # takes it; the DLQ has no room
    q.close()
    assert dlq.get(timeout=5) == "filler"
    q2 = mq.open(qname)
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        q2.redeliver_expired()
        try:
            got = dlq.get(timeout=0.2)
        except fastmq.Empty:
            pass
    assert got == "doomed"


# ---------------------------------------------------------------- damaged records

def test_requeue_of_a_leased_block_message_with_a_corrupt_length_never_copies_past_its_block(
        mq, backend, seg_of):
    native_only(backend, "writes into the native in-flight table")
    q = mq.Queue(maxsize=8)
    seg = seg_of(q)
    q.put_bytes(b"m" * BLOCK)
    m = q.get_message(timeout=5, lease=60)
    seg.u32(seg.entry(m.id) + 32, 1 << 20)        # len: 1 MiB, the block holds 16 KiB
    m.nack()
    delivered = []
    for _ in range(3):
        try:
            delivered.append(q.get_bytes(timeout=0.3))
        except (fastmq.Empty, fastmq.CorruptQueue):
            pass
    assert all(d == b"m" * BLOCK for d in delivered), [len(d) for d in delivered]
    assert q.stats()["abandoned"] >= 1 or delivered
    # the queue still works for block messages
    q.put_bytes(b"z" * BLOCK)
    assert q.get_bytes(timeout=5) == b"z" * BLOCK


def test_a_damaged_message_is_consumed_and_the_ring_keeps_moving(mq, backend, seg_of):
    native_only(backend, "writes into the native ring")
    q = mq.Queue(maxsize=4)
    seg = seg_of(q)
    q.put_bytes(b"x" * 8)
    seg.u32(seg.slot(0) + 8, 1 << 20)              # inline message claiming 1 MiB
    with pytest.raises(fastmq.CorruptQueue):
        q.get_bytes(timeout=1)
    assert q.stats()["abandoned"] == 1
    for lap in range(3):                           # whole laps through the same slots
        for i in range(4):
            q.put_bytes(b"%d-%d" % (lap, i), timeout=1)
        assert [q.get_bytes(timeout=1) for _ in range(4)] == [b"%d-%d" % (lap, i)
                                                              for i in range(4)]


def test_a_damaged_message_inside_a_batch_gives_the_batch_back(mq, backend, seg_of):
    native_only(backend, "writes into the native ring")
    q = mq.Queue(maxsize=8)
    seg = seg_of(q)
    for i in range(3):
        q.put_bytes(b"%d" % i)
    seg.u32(seg.slot(1) + 8, 1 << 20)
    with pytest.raises(fastmq.CorruptQueue):
        q.get_many(3, timeout=1)
    rest = []
    while True:
        try:
            rest.append(q.get_bytes(timeout=0.3))
        except fastmq.Empty:
            break
    assert rest == [b"0", b"2"]


@pytest.mark.parametrize("which", ["head", "tail"])
@pytest.mark.parametrize("shift", [1, 3, 5 * 8, 1000 * 8 + 3, -3 * 8, 2 ** 40])
def test_a_scribbled_hint_is_repaired_instead_of_wedging_the_queue(mq, backend, seg_of,
                                                                  which, shift):
    native_only(backend, "writes into the native control block")
    q = mq.Queue(maxsize=8)
    seg = seg_of(q)
    for i in range(3):                             # move off ticket 0 first
        q.put_bytes(b"warm")
        q.get_bytes(timeout=1)
    q.put_bytes(b"first")
    q.put_bytes(b"second")
    off = seg.head_off if which == "head" else seg.tail_off
    seg.u64(off, (seg.u64(off) + shift) % 2 ** 64)
    q.put_bytes(b"third", timeout=5)
    got = [q.get_bytes(timeout=5) for _ in range(3)]
    # Nothing lost or repeated. A hint moved within a lap onto a READY slot
    # looks legitimate where it stands; the message it skipped is found by
    # the next scan, so only the order may differ then.
    assert sorted(got) == sorted([b"first", b"second", b"third"])
    if shift % 8 == 0:                             # whole laps: detected at once
        assert got == [b"first", b"second", b"third"]
    for i in range(20):                            # and it keeps going, laps on
        q.put_bytes(b"%d" % i, timeout=5)
        assert q.get_bytes(timeout=5) == b"%d" % i


# ---------------------------------------------------------------- recovery x in-flight state

PAYLOAD = bytes(range(251)) * (BLOCK // 251 + 1)
PAYLOAD = PAYLOAD[:BLOCK]

_PRODUCER = textwrap.dedent("""
    import sys, time
    import fastmq
    q = fastmq.Queue.open(sys.argv[1], _backend=sys.argv[2])
    payload = bytes(range(251)) * (int(sys.argv[3]) // 251 + 1)
    res = q._ring.reserve(int(sys.argv[3]), 10)
    view = res.view
    view[:] = payload[:len(view)]
    res.commit()                     # published; our view keeps the block
    print("committed", flush=True)
    time.sleep(60)                   # SIGKILLed here, view still alive
""")

_CONSUMER = textwrap.dedent("""
    import sys, time
    import fastmq
    q = fastmq.Queue.open(sys.argv[1], _backend=sys.argv[2])
    m = q.get_message(timeout=10, lease=60)
    print("leased", len(m.data), flush=True)
    time.sleep(60)                   # SIGKILLed holding the lease
""")

STATES = ["ready", "leased", "pinned", "parked", "orphaned", "dead_letter", "dead_taking"]


class _Kids:
    def __init__(self):
        self.procs = []

    def start(self, code, *args):
        p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    @staticmethod
    def expect(p, word, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if line.startswith(word):
                return line
            if not line and p.poll() is not None:
                break
        raise AssertionError(f"child did not say {word!r}: rc={p.poll()} "
                             f"stderr={p.stderr.read() if p.poll() is not None else ''}")

    @staticmethod
    def kill(p):
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        assert p.returncode == -signal.SIGKILL

    def reap(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for f in (p.stdout, p.stderr):
                f.close()


@pytest.fixture
def kids():
    k = _Kids()
    try:
        yield k
    finally:
        k.reap()


def _recover(q):
    rec = getattr(q._ring, "recover", None)   # native: reap the dead now
    if rec is not None:
        rec()


@pytest.mark.parametrize("state", STATES)
def test_recovery_of_a_dead_producer_that_kept_its_view_against_every_in_flight_state(
        mq, qname, kids, backend, state):
    """A producer commits a block message and is SIGKILLed while its
    reservation view is still alive; the message meanwhile sits in the given
    state. Recovery must take only the producer's own share: the message
    comes out intact (never another message's bytes), exactly once."""
    dlq_name = qname + "-dlq"
    dlq = None
    if state in ("dead_letter", "dead_taking"):
        dlq = mq.create(dlq_name, maxsize=1)
        mq.names.append(dlq_name)
    q = mq.create(qname, maxsize=2 if state == "parked" else 8,
                  dead_letter=dlq_name if dlq is not None else None)
    producer = kids.start(_PRODUCER, qname, backend, BLOCK)
    kids.expect(producer, "committed")
    m = view = None
    if state in ("leased", "pinned"):
        m = q.get_message(timeout=5, lease=60)
        if state == "pinned":
            view = m.data
    elif state == "parked":
        m = q.get_message(timeout=5, lease=0.2)
        q.put_bytes(b"f1", timeout=5)
        q.put_bytes(b"f2", timeout=5)             # the ring is full again
        time.sleep(0.3)
        q.redeliver_expired()                     # no room: parked, orphaned
        assert [e["pid"] for e in q.pending()] == [0]
    elif state == "orphaned":
        consumer = kids.start(_CONSUMER, qname, backend)
        kids.expect(consumer, "leased")
        kids.kill(consumer)
        _recover(q)                               # its lease: orphaned, due
    elif state in ("dead_letter", "dead_taking"):
        dlq.put_bytes(b"filler", timeout=5)       # the dead-letter queue is full
        q.get_message(timeout=5, lease=60).nack(requeue=False)
        if state == "dead_taking":
            q.redeliver_expired()                 # taken; no room in the DLQ
    kids.kill(producer)
    _recover(q)
    other = mq.open(qname)
    # Churn: take every free block of that size and scribble it. A block that
    # recovery freed although the message still needs it is handed out here.
    junk = []
    try:
        while len(junk) < 64:
            res = other._ring.reserve(BLOCK, 0)
            res.view[:] = b"J" * BLOCK
            junk.append(res)
    except fastmq.Full:
        pass
    try:
        if state == "ready":
            got = [q.get_bytes(timeout=5)]
        elif state in ("leased", "pinned"):
            got = [bytes(view if view is not None else m.data)]
            m.ack()
        elif state == "parked":
            for res in junk:
                res.abort()
            junk = []
            assert sorted(q.get_bytes(timeout=5) for _ in range(2)) == [b"f1", b"f2"]
            got = [bytes(q.get_message(timeout=5).data)]
        elif state == "orphaned":
            got = [bytes(q.get_message(timeout=5).data)]
        else:
            if state == "dead_taking":
                q.close()                         # taken ones are parked again
            assert dlq.get_bytes(timeout=5) == b"filler"
            got = None
            deadline = time.monotonic() + 5
            while got is None and time.monotonic() < deadline:
                other.redeliver_expired()
                try:
                    got = [dlq.get_bytes(timeout=0.2)]
                except fastmq.Empty:
                    pass
        assert got is not None and [g == PAYLOAD for g in got] == [True], \
            [g[:8] for g in got or []]
        for res in junk:                          # nobody wrote into their blocks
            assert bytes(res.view) == b"J" * BLOCK
    finally:
        for res in junk:
            res.abort()
    with pytest.raises(fastmq.Empty):             # exactly once
        (q if not q.closed else other).get_bytes(timeout=0.2)


# ---------------------------------------------------------------- crash points in flight

_ACTOR = textwrap.dedent("""
    import sys, time
    import fastmq
    name, action = sys.argv[1], sys.argv[2]
    q = fastmq.Queue.open(name, _backend="native")
    if action == "reap":
        print("ready", flush=True)
        q._ring.recover()              # killed inside by the crash point
    else:
        m = q.get_message(timeout=10, lease=60)
        if action == "nack":
            m.nack()
        elif action == "close":
            q.close()                  # hands the lease back
        elif action == "dead":
            m.nack(requeue=False)
            q.redeliver_expired()      # forwards it: take, put, ack_dead
        elif action == "hold":
            print("leased", flush=True)
            time.sleep(60)
    print("survived", flush=True)
""")

CRASHES = [
    ("nack", "lease.share.co_owned"),
    ("nack", "lease.requeue.before_commit"),
    ("nack", "lease.requeue.committed"),
    ("nack", "lease.requeue.settling"),
    ("nack", "lease.requeue.dropped"),
    ("close", "lease.requeue.dropped"),
    ("close", "lease.release.requeuing"),
    ("close", "lease.requeue.before_commit"),
    ("dead", "lease.ackdead.claimed"),
    ("reap", "lease.reap.claimed"),
]


def _scribble_free_blocks(q, most=64):
    """Reserve every free block (up to ``most``) and fill it with b"J": a block
    wrongly freed under a message then shows foreign bytes. The caller aborts
    the reservations."""
    junk = []
    try:
        while len(junk) < most:
            res = q._ring.reserve(BLOCK, 0)
            res.view[:] = b"J" * BLOCK
            junk.append(res)
    except fastmq.Full:
        pass
    return junk


@pytest.mark.parametrize("action,point", CRASHES)
def test_a_process_killed_at_an_in_flight_crash_point_loses_nothing_and_delivers_nothing_foreign(
        mq, qname, kids, backend, action, point):
    native_only(backend, "crash points are compiled into the C core")
    dlq_name = qname + "-dlq"
    dlq = mq.create(dlq_name, maxsize=4)
    mq.names.append(dlq_name)
    q = mq.create(qname, maxsize=8, dead_letter=dlq_name)
    q.put_bytes(PAYLOAD)
    env = dict(os.environ, FASTMQ_CRASH_AT=point)
    if action == "reap":
        holder = kids.start(_ACTOR, qname, "hold")
        kids.expect(holder, "leased")
        kids.kill(holder)                          # a dead holder to reap
    p = subprocess.Popen([sys.executable, "-c", _ACTOR, qname, action], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids.procs.append(p)
    p.wait(30)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr.read())
    _recover(q)
    junk = _scribble_free_blocks(q)
    seen = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not (seen and time.monotonic() > deadline - 5):
        q.redeliver_expired()
        for src in (q, dlq):
            try:
                if src is q:
                    m = q.get_message(timeout=0.1, lease=60)
                    seen.append(bytes(m.data))
                    m.ack()
                else:
                    seen.append(dlq.get_bytes(timeout=0.1))
            except fastmq.Empty:
                pass
    try:
        assert seen, "the message was lost"
        assert all(s == PAYLOAD for s in seen), [s[:8] for s in seen]
        for res in junk:
            assert bytes(res.view) == b"J" * BLOCK
    finally:
        for res in junk:
            res.abort()


# ---------------------------------------------------------------- double fetch

_FLIPPER = textwrap.dedent("""
    import mmap, os, struct, sys, time
    path, lease, stride, n, seconds = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    offs = [lease + i * stride + 32 for i in range(n)]      # in-flight entry lengths
    good, bad = struct.pack("<I", 8), struct.pack("<I", 0x7FFFFFF0)
    end = time.monotonic() + seconds
    print("flipping", flush=True)
    while time.monotonic() < end:
        for _ in range(2000):
            for off in offs:
                m[off:off + 4] = bad
                m[off:off + 4] = good
""")

_LEASER = textwrap.dedent("""
    import sys, time
    import fastmq
    q = fastmq.Queue.open(sys.argv[1], _backend="native")
    end = time.monotonic() + float(sys.argv[2])
    got = corrupt = 0
    while time.monotonic() < end:
        try:
            q.put_bytes(b"x" * 8, timeout=1)
        except fastmq.Full:
            pass
        try:
            for m in q.get_messages(4, timeout=0.2, lease=0.05):
                assert bytes(m.data) == b"x" * 8, bytes(m.data)[:16]
                got += 1
                try:
                    m.ack()
                except fastmq.LeaseLost:
                    pass
        except (fastmq.Empty, fastmq.CorruptQueue, fastmq.TooManyInFlight):
            corrupt += 1
    print("got", got, "corrupt", corrupt, flush=True)
""")


def test_an_in_flight_length_changed_under_the_reader_is_checked_and_used_from_one_read(
        mq, qname, kids, backend, seg_of):
    native_only(backend, "writes into the native in-flight table")
    q = mq.create(qname, maxsize=4)
    seg = seg_of(q)
    seconds = 4
    flipper = kids.start(_FLIPPER, seg.path, seg.lease, seg.lease_stride, seg.slot_count,
                         seconds)
    kids.expect(flipper, "flipping")
    leaser = kids.start(_LEASER, qname, seconds)
    out, err = leaser.communicate(timeout=seconds + 30)
    assert leaser.returncode >= 0, (f"the consumer died by signal "
                                    f"{signal.Signals(-leaser.returncode).name}\n{err[-2000:]}")
    assert leaser.returncode == 0, err[-2000:]
    assert out.startswith("got") and int(out.split()[1]) > 0, out


@pytest.mark.parametrize("how", ["get", "recv", "get_many", "get_message"])
def test_a_slot_flipped_back_to_ready_over_a_consumed_block_message_is_skipped(
        mq, backend, seg_of, how):
    native_only(backend, "writes into the native ring")
    q = mq.Queue(maxsize=1)
    seg = seg_of(q)
    q.put_bytes(b"o" * BLOCK)
    assert q.get_bytes(timeout=1) == b"o" * BLOCK  # its block is free again
    off = seg.slot(0)
    seg.u64(off, seg.u64(off) + (2 << 24))         # EMPTY -> READY, same lap: stale record
    with pytest.raises(fastmq.CorruptQueue):
        if how == "get":
            q.get_bytes(timeout=1)
        elif how == "recv":
            q._ring.recv(1)
        elif how == "get_many":
            q._ring.get_many(4, 1, None)
        else:
            q.get_message(timeout=1)
    assert q.stats()["abandoned"] == 1
    for i in range(3):                             # the ring keeps moving, lap after lap
        q.put_bytes(b"n%d" % i, timeout=1)
        assert q.get_bytes(timeout=1) == b"n%d" % i


# ------------------------------------------------- a lease that runs out mid-take

_MIDTAKE = textwrap.dedent("""
    import sys
    import fastmq
    q = fastmq.Queue.open(sys.argv[1], _backend="native")
    q.get_message(timeout=10, lease=0.2)   # frozen inside, after the LEASED store
""")


def _wait_stopped(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop at its crash point")


def test_a_lease_that_runs_out_before_its_take_freed_the_slot_is_not_requeued_under_it(
        mq, qname, kids, backend):
    """The holder is frozen between the LEASED store and freeing the ring slot
    its message came from; its lease runs out there and a redelivery pass
    runs; then the holder is SIGKILLed. The message must come back exactly
    once and intact: a redeliverer that requeued it under the unfinished take
    would free its block, and recovery would put the slot's copy back too,
    naming that freed block (found by the protocol model, model/README.md)."""
    native_only(backend, "crash points are compiled into the C core")
    q = mq.create(qname, maxsize=8)
    q.put_bytes(PAYLOAD)
    env = dict(os.environ, FASTMQ_CRASH_AT="lease.take.leased", FASTMQ_CRASH_SIGNAL="STOP")
    p = subprocess.Popen([sys.executable, "-c", _MIDTAKE, qname], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids.procs.append(p)
    _wait_stopped(p.pid)
    time.sleep(0.4)                                # its lease has run out
    q.redeliver_expired()
    kids.kill(p)
    _recover(q)
    junk = _scribble_free_blocks(q)
    seen = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            q.redeliver_expired()
            try:
                m = q.get_message(timeout=0.1, lease=60)
            except fastmq.Empty:
                continue
            seen.append(bytes(m.data))
            m.ack()
        assert [s[:8] for s in seen] == [PAYLOAD[:8]], [s[:8] for s in seen]
        assert seen == [PAYLOAD]
        for res in junk:
            assert bytes(res.view) == b"J" * BLOCK
    finally:
        for res in junk:
            res.abort()


# ------------------------------------------- damaged records, on both backends

def _damage_length(q, backend, index, length):
    """Write ``length`` as the stored length of the ``index``-th queued
    message (counting from the head), in the live segment file."""
    if backend == "native":
        s = Segment(q)
        try:
            head = s.u64(s.head_off)
            s.u32(s.slot(head + index) + 8, length)
        finally:
            s.close()
        return
    from fastmq._pure import ring as pure
    path = q._ring._h.path
    fd = os.open(path, os.O_RDWR)
    try:
        head = struct.unpack("<Q", os.pread(fd, 8, pure.STATE_OFFSET))[0]
        area = q._ring._area
        pos = head
        for _ in range(index):
            (n,) = struct.unpack("<I", os.pread(fd, 4, pure.DATA_OFFSET + pos % area))
            pos += pure.RECORD_HEADER.size + n
        os.pwrite(fd, struct.pack("<I", length), pure.DATA_OFFSET + pos % area)
    finally:
        os.close(fd)


def _drain(q, tries=10):
    """Every message left, tolerating CorruptQueue for the damaged ones."""
    got, errors = [], 0
    for _ in range(tries):
        try:
            got.extend(q.get_many_bytes(8, timeout=0.3))
        except fastmq.CorruptQueue:
            errors += 1
        except fastmq.Empty:
            break
    return got, errors


@pytest.mark.parametrize("where", ["only", "first", "middle", "last"])
def test_a_record_with_an_impossible_length_is_skipped_on_both_backends(mq, backend, where):
    """A stored length that cannot be right (past max_message_size): that
    message is consumed, never delivered, counted once in ``abandoned``; the
    ones around it come out in order and the queue keeps working for whole
    laps (the pure ring's byte ring has to find where the next record
    starts; the native ring's slots are independent)."""
    q = mq.create(unique_name("dmg"), maxsize=4, max_message_size=4096)
    bodies = [b"only-one"] if where == "only" else [b"zero", b"one--", b"two---"]
    for b in bodies:
        q.put_bytes(b)
    index = {"only": 0, "first": 0, "middle": 1, "last": 2}[where]
    _damage_length(q, backend, index, 1 << 20)
    got, errors = _drain(q)
    assert got == bodies[:index] + bodies[index + 1:]
    assert errors == 1
    assert q.stats()["abandoned"] == 1
    assert q.qsize() == 0
    for lap in range(3):                            # whole laps through the same space
        for i in range(4):
            q.put_bytes(b"%d-%d" % (lap, i), timeout=1)
        assert [q.get_bytes(timeout=1) for _ in range(4)] == [b"%d-%d" % (lap, i)
                                                              for i in range(4)]


def test_a_damaged_record_met_by_a_lease_is_skipped_on_both_backends(mq, backend):
    q = mq.create(unique_name("dmg"), maxsize=4, max_message_size=4096)
    for b in (b"zero", b"one"):
        q.put_bytes(b)
    _damage_length(q, backend, 0, 1 << 20)
    with pytest.raises(fastmq.CorruptQueue):
        q.get_message(timeout=1)
    m = q.get_message(timeout=1)
    assert m.data == b"one"
    m.ack()
    assert q.stats()["abandoned"] == 1 and q.qsize() == 0 and q.pending() == []


# ------------------------------------------- exporters in reference cycles

LEASE_CYCLES = r'''
import gc, itertools, sys
import fastmq
try:
    import numpy as np
except ImportError:
    np = None

STEPS = ("close", "release", "qclose", "ringclose", "dellease", "gc", "read")

def scenario(size, with_lease, steps):
    q = fastmq.Queue(maxsize=8, max_message_size=1 << 20)
    ring = q._ring
    ring.put(b"x" * size, None)
    n = {"lease": ring.recv(None)}      # the core's own Lease
    lease = n["lease"]
    cyc = [lease.view[2:], lease.view[1:].cast("B"), memoryview(lease.view)[3:]]
    if np is not None:
        cyc.append(np.frombuffer(lease.view[4:], dtype=np.uint8))
    if with_lease:
        cyc.append(lease)
    cyc.append(cyc)                      # a reference cycle of slices of the view
    del lease, cyc
    for st in steps:
        try:
            if st == "close": n["lease"].close()
            elif st == "release": n["lease"].release()
            elif st == "qclose": q.close()
            elif st == "ringclose": ring.close()
            elif st == "dellease": del n["lease"]
            elif st == "gc": gc.collect()
            elif st == "read": bytes(n["lease"].view[:2])
        except (KeyError, BufferError, ValueError):
            pass
    for st in ("release", "close"):
        try:
            getattr(n["lease"], st)()
        except (KeyError, BufferError, ValueError):
            pass
    n.clear()
    gc.collect()
    q.close()

count = 0
for size in (100, 20000):                # inline (a private copy) and a pool block
    for with_lease in (False, True):
        for steps in itertools.permutations(STEPS, 3):
            scenario(size, with_lease, steps)
            count += 1
print("SURVIVED", count)
'''


def test_a_leases_view_sliced_into_a_reference_cycle_never_crashes(backend):
    """The core's own ``Lease``: its view sliced (and cast, and viewed by
    numpy) into a reference cycle, then ``close()``/``release()``, the
    queue's and the ring's ``close()``, dropping the lease and
    ``gc.collect()`` in every order of three. Each run must end normally
    (a crash would kill the child), with nothing left mapped."""
    native_only(backend, "the core's Lease lives in the native extension")
    from conftest import run_python
    res = run_python(LEASE_CYCLES, timeout=300)
    assert res.returncode == 0 and "SURVIVED" in res.stdout, res.stderr[-3000:]
