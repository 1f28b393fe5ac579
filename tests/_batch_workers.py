"""Child-process roles for tests/test_atomic_batches.py.

Every role runs in a fresh interpreter (``python _batch_workers.py ROLE ...``)
so that ``FASTMQ_CRASH_AT`` (read when ``fastmq._core`` is imported) is armed in
the child only. Messages are tuples
``(producer, batch, index, size_of_batch, payload, crc32(payload))``: a
consumer can tell which batch and which place in it each message has, and a
torn one fails its checksum.

Logs are line files written after the call they record returned, flushed at
once (a SIGKILL cannot lose what ``write()`` handed to the kernel):

* producer: ``C <producer> <batch> <n>`` -- the atomic put of batch returned
* consumer: ``R <producer> <batch> <index> <n> <ok>`` -- a message received
  (``ok`` 0: torn), ``T`` for one that did not unpickle.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

from _worker_child import Log


def payload_for(producer, batch, index, size):
    seed = (producer * 1_000_003 + batch * 7919 + index * 104_729) & 0xFFFFFFFF
    unit = seed.to_bytes(4, "little") + batch.to_bytes(4, "little") + index.to_bytes(4, "little")
    return (unit * (size // len(unit) + 1))[:size]


def make_batch(producer, batch, n, size):
    out = []
    for i in range(n):
        data = payload_for(producer, batch, i, size)
        out.append((producer, batch, i, n, data, zlib.crc32(data)))
    return out


def check(m):
    """(producer, batch, index, n, ok)."""
    try:
        producer, batch, index, n, data, crc = m
    except Exception:
        return (None, None, None, None, False)
    ok = isinstance(data, bytes) and zlib.crc32(data) == crc
    return (producer, batch, index, n, ok)

def role_produce(a):
    import fastmq
    q = fastmq.Queue.open(a.queue)
    log = Log(a.log)
    print("ready", flush=True)
    for b in range(a.start, a.start + a.count):
        items = make_batch(a.producer, b, a.n, a.size)
        if a.mode == "transaction":
            with q.transaction(timeout=a.timeout) as tx:
                for m in items:
                    tx.put(m)
        else:
            q.put_many(items, timeout=a.timeout, atomic=True)
        log.write(f"C {a.producer} {b} {a.n}")
    q.close()
    print("done", flush=True)


def role_consume(a):
    import fastmq
    q = fastmq.Queue.open(a.queue)
    log = Log(a.log)
    print("ready", flush=True)
    got = 0
    idle_until = None
    while a.count <= 0 or got < a.count:
        try:
            if a.mode == "get_many":
                items = q.get_many(a.max, timeout=a.timeout)
                held = None
            elif a.mode == "get_message":
                held = q.get_messages(a.max, timeout=a.timeout, lease=a.lease)
                items = [m.value for m in held]
            else:
                items = [q.get(timeout=a.timeout)]
                held = None
        except fastmq.Empty:
            if a.count <= 0:
                if idle_until is None:
                    idle_until = time.monotonic() + a.idle
                if time.monotonic() >= idle_until:
                    break
                continue
            break
        except fastmq.BadMessage as exc:
            log.write(f"T {exc!r}".replace("\n", " ")[:200])
            got += 1
            continue
        idle_until = None
        for m in items:
            p, b, i, n, ok = check(m)
            log.write(f"R {p} {b} {i} {n} {int(ok)}")
        if held:
            for m in held:
                m.ack()
        got += len(items)
    q.close()
    print("done", flush=True)


def role_reap(a):
    """Run crash recovery once (``Ring.recover()``): with a recover.* crash point."""
    import fastmq
    q = fastmq.Queue.open(a.queue)
    print("ready", flush=True)
    n = q._ring.recover()
    print(f"reaped {n}", flush=True)
    q.close()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("role")
    ap.add_argument("--queue", required=True)
    ap.add_argument("--log")
    ap.add_argument("--producer", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--max", type=int, default=64)
    ap.add_argument("--mode", default="get")
    ap.add_argument("--lease", type=float, default=30.0)
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args(argv)
    {"produce": role_produce, "consume": role_consume, "reap": role_reap}[a.role](a)


if __name__ == "__main__":
    try:
        import fastmq  # noqa: F401  -- the installed one, or the tree on PYTHONPATH
    except ImportError:     # a source checkout that was not installed (as conftest does)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    main()
