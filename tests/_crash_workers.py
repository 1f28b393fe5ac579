"""Child-process roles for the crash tests (tests/test_crash.py) and the soak
(tests/soak.py).

Every role runs in a *fresh* interpreter (``python _crash_workers.py ROLE ...``)
because ``FASTMQ_CRASH_AT`` is read once, when ``fastmq._core`` is imported:
the crash point must be armed in the child's environment only, never in the
test process.

Messages are tuples ``(producer, seq, payload, crc32(payload))`` sent with
``Queue.put``/``put_many`` (pickled); a message whose checksum or length does
not match, or that does not unpickle, is *torn*.

Logs are line files written *after* the call that they record returned, and
flushed at once (a SIGKILL cannot lose what ``write()`` already handed to the
kernel):

* producer: ``C <producer> <seq>``   -- committed (put/put_many returned)
* consumer: ``R <producer> <seq> <ok>`` -- received (get/get_many returned);
  ``ok`` is 1, or 0 for a torn message (``T <repr>`` for one that did not
  even unpickle).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

from _worker_child import Log

SIZES = {"inline": 16, "block": 100 * 1024}


def payload_for(producer: int, seq: int, size: int) -> bytes:
    """Deterministic but seq-dependent bytes, so a torn copy cannot pass."""
    if size <= 0:
        return b""
    seed = (producer * 1_000_003 + seq * 7919) & 0xFFFFFFFF
    unit = seed.to_bytes(4, "little") + seq.to_bytes(8, "little")
    return (unit * (size // len(unit) + 1))[:size]


def make_msg(producer: int, seq: int, size: int):
    data = payload_for(producer, seq, size)
    return (producer, seq, data, zlib.crc32(data))


def check_msg(m):
    """(producer, seq, ok) for a received message; ok False means torn."""
    try:
        producer, seq, data, crc = m
    except Exception:
        return (None, None, False)
    ok = isinstance(data, bytes) and zlib.crc32(data) == crc
    return (producer, seq, ok)

# ------------------------------------------------------------------ roles

def role_produce(a):
    import fastmq
    q = fastmq.Queue.open(a.queue)
    log = Log(a.log)
    print("ready", flush=True)
    seq, end = a.start, a.start + a.count
    while seq < end:
        k = min(a.batch, end - seq)
        if a.batch > 1:
            items = [make_msg(a.producer, seq + i, a.size) for i in range(k)]
            n = q.put_many(items, timeout=a.timeout)
            for i in range(n):
                log.write(f"C {a.producer} {seq + i}")
            seq += n
        else:
            q.put(make_msg(a.producer, seq, a.size), timeout=a.timeout)
            log.write(f"C {a.producer} {seq}")
            seq += 1
    q.close()
    print("done", flush=True)


def role_consume(a):
    import fastmq
    q = fastmq.Queue.open(a.queue)
    log = Log(a.log)
    print("ready", flush=True)
    got = 0
    while got < a.count:
        try:
            if a.batch > 1:
                items = q.get_many(min(a.batch, a.count - got), timeout=a.timeout)
            else:
                items = [q.get(timeout=a.timeout)]
        except fastmq.Empty:
            break
        except fastmq.BadMessage as exc:
            log.write(f"T {exc!r}".replace("\n", " ")[:200])
            got += 1
            continue
        for m in items:
            p, s, ok = check_msg(m)
            log.write(f"R {p} {s} {int(ok)}")
        got += len(items)
    q.close()
    print("done", flush=True)


def role_freeze_holding(a):
    """Claim one message and SIGSTOP ourselves while it is still claimed.

    ``Ring.get_many(decode=...)`` calls ``decode`` between the claim and the
    release (the hand-over), so stopping inside it freezes a consumer that
    provably holds a READING slot. After SIGCONT the call completes normally.
    """
    import signal

    import fastmq
    q = fastmq.Queue.open(a.queue)
    log = Log(a.log)
    ring = q._ring

    def decode(raw):
        print("claimed", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)      # frozen right here, slot held
        return q._decode(raw)

    print("ready", flush=True)
    items = ring.get_many(1, a.timeout, decode)
    for m in items:
        p, s, ok = check_msg(m)
        log.write(f"R {p} {s} {int(ok)}")
    q.close()
    print("done", flush=True)


def role_reap(a):
    """Recover on demand (``Ring.recover()``) -- used with recover.* crash points."""
    import fastmq
    q = fastmq.Queue.open(a.queue)
    print("ready", flush=True)
    if a.wait:
        sys.stdin.readline()                  # the test says when
    n = q._ring.recover()
    print(f"reaped {n}", flush=True)
    q.close()


def role_create(a):
    import fastmq
    q = fastmq.Queue.create(a.queue, maxsize=16)
    print("created", flush=True)
    q.close()


def role_open(a):
    """Open a queue and report how that went (never hangs: open() is bounded)."""
    import fastmq
    t0 = time.monotonic()
    try:
        q = fastmq.Queue.open(a.queue)
    except fastmq.CorruptQueue as exc:
        print(f"CorruptQueue {time.monotonic() - t0:.3f} {exc}", flush=True)
        return
    except Exception as exc:  # pragma: no cover - reported to the test
        print(f"{type(exc).__name__} {time.monotonic() - t0:.3f} {exc}", flush=True)
        return
    print(f"opened {time.monotonic() - t0:.3f}", flush=True)
    q.close()


def role_anon_users(a):
    """Make an anonymous queue, fork users of it, print the segment, then wait
    to be SIGKILLed (the test kills this whole process group)."""
    import multiprocessing as mp

    import fastmq
    q = fastmq.Queue(maxsize=64)
    ctx = mp.get_context("fork")
    users = [ctx.Process(target=_anon_user, args=(q, i)) for i in range(2)]
    for p in users:
        p.start()
    q.put(make_msg(0, 0, SIZES["block"]))
    # the users have attached once their messages arrive (ours comes first)
    got = sorted(q.get(timeout=30)[0] for _ in range(3))
    assert got == [0, 1, 2], got
    line = f"segment {q._ring.name} " + " ".join(str(p.pid) for p in users) + "\n"
    os.write(1, line.encode())            # one write: never interleaved
    time.sleep(120)


def _anon_user(q, i):
    try:                                  # never outlive the group leader
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)     # PR_SET_PDEATHSIG, SIGKILL
    except Exception:
        pass
    q.put(make_msg(i + 1, 0, SIZES["inline"]))
    time.sleep(120)


ROLES = {
    "produce": role_produce, "consume": role_consume, "freeze-holding": role_freeze_holding,
    "reap": role_reap, "create": role_create, "open": role_open, "anon-users": role_anon_users,
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=sorted(ROLES))
    ap.add_argument("--queue", default="")
    ap.add_argument("--producer", type=int, default=1)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--size", type=int, default=SIZES["inline"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--log", default=None)
    ap.add_argument("--wait", action="store_true", help="reap: wait for a stdin line")
    a = ap.parse_args(argv)
    ROLES[a.role](a)


if __name__ == "__main__":
    sys.exit(main())
