"""Inspection changes nothing; errors name what really happened.

* ``stats()``, ``fastmq stat`` and ``fastmq ls`` are read-only: they never
  forward parked dead letters and never create the dead-letter queue.
* A plain ``get_bytes``/``commit`` -- no lease involved -- whose slot or block
  was changed under it reports ``CorruptQueue``, never ``LeaseLost``.
* ``pending()`` lists every in-flight entry, with the ones no live consumer
  holds marked orphaned, and a SIGKILLed consumer's leases come back promptly
  while any live participant uses the queue.
"""
from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

import fastmq

from conftest import native_only, unique_name, wait_until

pytestmark = pytest.mark.timeout(120)

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastmq.__file__)))


def _cli(*args, backend):
    env = dict(os.environ, FASTMQ_BACKEND=backend)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "fastmq", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def _exists(name, backend):
    try:
        fastmq.Queue.open(name, _backend=backend).close()
        return True
    except fastmq.QueueNotFound:
        return False


# ------------------------------------------------- stats is read-only

def _park_a_dead_letter(mq, backend):
    """A queue with a dead-letter name and one dead letter parked in it (a
    lease past max_deliveries that expired), not forwarded yet."""
    dlq = unique_name("dlq")
    mq.names.append(dlq)                  # unlinked at teardown if it appears
    name = unique_name("insp")
    q = mq.create(name, maxsize=8, max_deliveries=1, dead_letter=dlq)
    q.put({"poison": 1})
    # Leasing through a Consumer of the ring, not the queue: no forwarding
    # opportunity at all.
    consumer = q._ring.consumer(q._acks, fastmq.Message)
    got = consumer.lease(1, 5.0, 0.05)
    assert len(got) == 1
    time.sleep(0.15)                      # the lease expires
    q._ring.redeliver_due()               # past max_deliveries: parked
    return name, dlq, q


def test_stats_does_not_forward_dead_letters_or_create_the_queue(mq, backend):
    name, dlq, q = _park_a_dead_letter(mq, backend)
    before = q.stats()
    again = mq.open(name).stats()
    assert not _exists(dlq, backend), "stats() created the dead-letter queue"
    assert again["dead_lettered"] == before["dead_lettered"]
    # The parked letter is not lost: the next consumer call forwards it.
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.2)
    d = mq.open(dlq)
    assert d.get(timeout=5) == {"poison": 1}


@pytest.mark.parametrize("command", ["stat", "ls"])
def test_cli_inspection_does_not_forward_dead_letters(mq, backend, command):
    name, dlq, q = _park_a_dead_letter(mq, backend)
    res = _cli(*((command, name) if command == "stat" else (command,)), backend=backend)
    assert res.returncode == 0, res.stderr
    assert not _exists(dlq, backend), f"`fastmq {command}` created the dead-letter queue"
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.2)
    assert mq.open(dlq).get(timeout=5) == {"poison": 1}


def test_nack_to_dead_letter_is_forwarded_without_any_inspection(mq, backend):
    """With stats() read-only, the consumer's own next call must forward --
    even one that finds the queue empty."""
    dlq = unique_name("dlq")
    mq.names.append(dlq)
    q = mq.create(unique_name("insp"), maxsize=8, dead_letter=dlq)
    q.put("bad")
    q.get_message(timeout=5).nack(requeue=False)
    q.stats()
    assert not _exists(dlq, backend)
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.1)
    assert mq.open(dlq).get(timeout=5) == "bad"


# -------------------------------- plain get/commit: CorruptQueue, not LeaseLost

_HDR = struct.Struct("<8sIIII QQ II QQ II QQQQ Q")   # fmq_header up to created_realtime_ns
_CLASS = struct.Struct("<QQQQ")                      # block_size, nblocks, meta, data
_CLASSES_OFFSET = _HDR.size
_IN_RING = 1 << 48


def _block_states(path):
    """[(offset of the state word, state)] of every block of a native segment."""
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    try:
        hdr = _HDR.unpack_from(mm, 0)
        nclasses = hdr[8]
        out = []
        for c in range(nclasses):
            _, nblocks, meta, _ = _CLASS.unpack_from(mm, _CLASSES_OFFSET + c * _CLASS.size)
            for i in range(nblocks):
                off = meta + 16 * i
                out.append((off, struct.unpack_from("<Q", mm, off)[0]))
        return out
    finally:
        mm.close()


def _poke(path, off, value):
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            struct.pack_into("<Q", mm, off, value)
        finally:
            mm.close()


def test_get_bytes_of_a_changed_block_is_corrupt_queue_not_lease_lost(mq, backend, shm):
    native_only(backend, "scribbles the native segment's block table")
    q = mq.create(unique_name("insp"), maxsize=4, max_message_size=1 << 16,
                  capacity_bytes=1 << 20)
    q.put_bytes(b"m" * 20000)                     # lives in a pool block
    path = shm.segment_of_named(q.name)
    held = [(off, st) for off, st in _block_states(path) if st]
    assert len(held) == 1 and held[0][1] & _IN_RING, held
    _poke(path, held[0][0], 0)                    # someone else changed it
    with pytest.raises(fastmq.CorruptQueue) as info:
        q.get_bytes(timeout=5)
    assert not isinstance(info.value, fastmq.LeaseLost)


def test_commit_of_a_changed_block_is_corrupt_queue_not_lease_lost(mq, backend, shm):
    native_only(backend, "scribbles the native segment's block table")
    q = mq.create(unique_name("insp"), maxsize=4, max_message_size=1 << 16,
                  capacity_bytes=1 << 20)
    path = shm.segment_of_named(q.name)
    res = q._ring.reserve(20000, None)
    res.view[:5] = b"hello"
    held = [(off, st) for off, st in _block_states(path) if st]
    assert len(held) == 1 and not held[0][1] & _IN_RING, held
    _poke(path, held[0][0], held[0][1] | _IN_RING)
    with pytest.raises(fastmq.CorruptQueue, match="changed by another process") as info:
        res.commit()
    assert not isinstance(info.value, fastmq.LeaseLost)


def test_a_lost_lease_is_still_lease_lost(mq):
    q = mq.Queue(maxsize=4)
    q.put("x")
    m = q.get_message(timeout=5, lease=0.05)
    time.sleep(0.15)
    with pytest.raises(fastmq.LeaseLost):
        m.ack()


# ------------------------------------ a dead consumer's leases: listed, then back

def _lease_and_hang(name, backend, n, conn):
    q = fastmq.Queue.open(name, _backend=backend)
    held = q.get_messages(n, timeout=10, lease=600.0)   # would stay out ~10 min
    conn.send(len(held))
    time.sleep(120)


def _start_leaser(children, q, backend, n=3):
    import multiprocessing as mp
    a, b = mp.Pipe()
    p = children.start(_lease_and_hang, q.name, backend, n, b)
    assert a.poll(20), "the leasing child did not start"
    assert a.recv() == n
    return p


def _kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL


def test_pending_lists_a_killed_consumers_leases_as_orphaned(mq, backend, children):
    q = mq.create(unique_name("insp"), maxsize=16)
    q.put_many(["a", "b", "c"])
    p = _start_leaser(children, q, backend)
    rows = q.pending()
    assert len(rows) == 3 and not any(r["orphaned"] for r in rows)
    _kill(p)
    rows = q.pending()
    assert len(rows) == 3, rows                     # listed, not hidden ...
    assert all(r["orphaned"] and r["pid"] == p.pid for r in rows), rows
    assert q.qsize() == 0                           # ... and pending() changed nothing
    res = _cli("pending", q.name, backend=backend)
    assert res.returncode == 0, res.stderr
    assert "no messages in flight" not in res.stdout, res.stdout
    # Each row names the dead holder (marked *) or says "orphan" (the
    # opener already took the entry back from the dead participant).
    rows = [line for line in res.stdout.splitlines()[1:] if line.split()[:1] in
            (["0"], ["1"], ["2"])]
    assert len(rows) == 3, res.stdout
    assert all(f"{p.pid}*" in r or "orphan" in r for r in rows), res.stdout


@pytest.mark.parametrize("call", ["get", "get_many", "get_message"])
def test_a_killed_consumers_leases_come_back_to_a_waiting_consumer(mq, backend, children,
                                                                   call):
    """The consumer is already waiting when the leaser dies: its wait itself
    must notice, within about a second."""
    import threading
    q = mq.create(unique_name("insp"), maxsize=16)
    q.put_many(["a", "b", "c"])
    p = _start_leaser(children, q, backend)
    other = mq.open(q.name)
    got, done = [], threading.Event()

    def consume():
        try:
            while len(got) < 3:
                if call == "get":
                    got.append(other.get(timeout=15))
                elif call == "get_many":
                    got.extend(other.get_many(10, timeout=15))
                else:
                    m = other.get_message(timeout=15)
                    got.append(m.value)
                    m.ack()
        except fastmq.Empty:
            pass
        finally:
            done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.3)                                  # it is waiting now
    _kill(p)
    t0 = time.monotonic()
    assert done.wait(15)
    took = time.monotonic() - t0
    assert sorted(got) == ["a", "b", "c"], got
    assert took < 3.0, f"the dead consumer's leases took {took:.1f}s to come back"
