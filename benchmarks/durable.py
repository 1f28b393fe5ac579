"""Durable queue throughput: fastmq ``file://`` queues per sync mode, next to
persist-queue (``SQLiteAckQueue``) and litequeue at comparable durability,
and fastmq's shared-memory queue as the ceiling.

    python benchmarks/durable.py [--seconds 2] [--dir /var/tmp/x] [--quick]

Durability pairs (both sides keep the same thing after a power loss):

  fastmq sync="commit"    <->  SQLite synchronous=FULL   (each put on disk
                                before it returns)
  fastmq sync="interval"  <->  SQLite synchronous=NORMAL (WAL: the last
                                commits may be lost, the file stays valid)
  fastmq sync="none"      <->  (fastmq shm: the ceiling)

Method. Each cell starts its processes first; they meet at a barrier, then
P producer processes and one consumer run at once for a fixed time
(``--seconds``): put throughput is the messages whose put returned, per
second; get throughput the messages the consumer took and acked (fastmq:
``get``, which consumes; persist-queue: ``get`` + ``ack``; litequeue:
``pop`` + ``done``), per second. A producer that finds a fastmq queue full
waits for the consumer, as it would in use. Payloads
are bytes of 64 B or 4 KiB (strings of that length for litequeue, which
stores TEXT). The directory must be on a real filesystem (it is checked).
One run per cell; the machine's load is printed with the table.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))


# ------------------------------------------------------------------ queues

class FastmqFile:
    def __init__(self, d, sync):
        self.url, self.sync = "file://" + d, sync

    def create(self):
        import fastmq
        fastmq.Queue.create("bench", url=self.url, sync=self.sync, sync_interval=1.0,
                            maxsize=1 << 20, max_message_size=1 << 16,
                            capacity_bytes=8 << 30).close()

    def producer(self):
        import fastmq
        q = fastmq.Queue.open("bench", url=self.url)
        return (lambda data: q.put_bytes(data, timeout=0.05)), q.close

    def consumer(self):
        import fastmq
        q = fastmq.Queue.open("bench", url=self.url)

        def take():
            try:
                q.get_bytes(timeout=0.05)
                return True
            except fastmq.Empty:
                return False
        return take, q.close


class FastmqShm:
    def __init__(self, d):
        self.name = f"durable-bench-{os.getpid()}"

    def create(self):
        import fastmq
        fastmq.Queue.create(self.name, maxsize=1 << 20, max_message_size=1 << 16,
                            capacity_bytes=8 << 30).close()

    def producer(self):
        import fastmq
        q = fastmq.Queue.open(self.name)
        return (lambda data: q.put_bytes(data, timeout=0.05)), q.close

    def consumer(self):
        import fastmq
        q = fastmq.Queue.open(self.name)

        def take():
            try:
                q.get_bytes(timeout=0.05)
                return True
            except fastmq.Empty:
                return False

        def done():
            q.close()
            fastmq.Queue.unlink(self.name)
        return take, done


def _pragma(conns, level):
    for c in conns:
        c.execute(f"PRAGMA synchronous={level};")


class PersistQueue:
    def __init__(self, d, level):
        self.path, self.level = os.path.join(d, "pq"), level

    def _open(self):
        from persistqueue import SQLiteAckQueue
        q = SQLiteAckQueue(self.path, multithreading=True, auto_commit=True)
        _pragma({id(c): c for c in (q._conn, q._putter)}.values(), self.level)
        return q

    def create(self):
        self._open()

    def producer(self):
        q = self._open()
        return q.put, lambda: None

    def consumer(self):
        q = self._open()

        def take():
            from persistqueue.exceptions import Empty
            try:
                item = q.get(block=True, timeout=0.05)
            except Empty:
                return False
            q.ack(item)
            return True
        return take, lambda: None


class LiteQueue:
    def __init__(self, d, level):
        self.path, self.level = os.path.join(d, "lq.sqlite3"), level

    def _open(self):
        from litequeue import LiteQueue as LQ
        q = LQ(self.path, timeout=30)
        _pragma([q.conn], self.level)
        return q

    def create(self):
        self._open().close()

    def producer(self):
        q = self._open()
        return (lambda data: q.put(data.decode("latin-1"))), q.close

    def consumer(self):
        q = self._open()

        def take():
            m = q.pop()
            if m is None:
                time.sleep(0.0005)
                return False
            q.done(m.message_id)
            return True
        return take, q.close


# ------------------------------------------------------------------ running

def _produce(kind, size, seconds, barrier, counts, k):
    put, close = kind.producer()
    data = b"x" * size
    barrier.wait()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        try:
            put(data)
        except Exception as exc:          # fastmq.Full: the consumer is behind
            if type(exc).__name__ != "Full":
                raise
            continue
        n += 1
    counts[k] = n
    close()


def _consume(kind, seconds, barrier, counts, k):
    take, close = kind.consumer()
    barrier.wait()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        if take():
            n += 1
    counts[k] = n
    close()


def run_cell(kind, producers, size, seconds):
    """P producers and one consumer, all at once for ``seconds``: messages
    put per second, messages taken (and acked) per second."""
    kind.create()
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(producers + 1)
    counts = ctx.Array("q", producers + 1)
    procs = [ctx.Process(target=_produce, args=(kind, size, seconds, barrier, counts, k))
             for k in range(producers)]
    procs.append(ctx.Process(target=_consume, args=(kind, seconds, barrier, counts, producers)))
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(seconds + 120)
            if p.exitcode != 0:
                raise RuntimeError(f"a process failed (exit {p.exitcode})")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    put = sum(counts[:producers])
    return put / seconds, counts[producers] / seconds, put


def _fs_type(path):
    path, best, kind = os.path.realpath(path), "", None
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="put phase per cell")
    ap.add_argument("--dir", default=None, help="a directory on a real filesystem")
    ap.add_argument("--quick", action="store_true", help="1 producer, 64 B only")
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="fastmq-durable-bench-", dir="/var/tmp")
    os.makedirs(root, exist_ok=True)
    if _fs_type(root) in ("tmpfs", "ramfs"):
        sys.exit(f"{root} is on tmpfs: durable numbers need a disk filesystem (--dir)")
    kinds = [
        ("fastmq file commit", lambda d: FastmqFile(d, "commit")),
        ("persist-queue FULL", lambda d: PersistQueue(d, "FULL")),
        ("litequeue FULL", lambda d: LiteQueue(d, "FULL")),
        ("fastmq file interval", lambda d: FastmqFile(d, "interval")),
        ("persist-queue NORMAL", lambda d: PersistQueue(d, "NORMAL")),
        ("litequeue NORMAL", lambda d: LiteQueue(d, "NORMAL")),
        ("fastmq file none", lambda d: FastmqFile(d, "none")),
        ("fastmq shm", lambda d: FastmqShm(d)),
    ]
    cells = [(1, 64)] if args.quick else [(1, 64), (4, 64), (1, 4096), (4, 4096)]
    print(f"# durable queues, {args.seconds:g} s put phase per cell, dir {root} "
          f"({_fs_type(root)}), load {os.getloadavg()[0]:.2f}, {os.cpu_count()} cpus")
    print(f"{'queue':<22} {'P':>2} {'size':>5} {'put msg/s':>11} {'get msg/s':>11} {'put':>9}")
    for producers, size in cells:
        for label, make in kinds:
            d = tempfile.mkdtemp(dir=root)
            try:
                put_rate, get_rate, total = run_cell(make(d), producers, size, args.seconds)
                print(f"{label:<22} {producers:>2} {size:>5} {put_rate:>11,.0f} "
                      f"{get_rate:>11,.0f} {total:>9,}", flush=True)
            except Exception as exc:     # a peer that is not installed, etc.
                print(f"{label:<22} {producers:>2} {size:>5}   n/a ({type(exc).__name__}: "
                      f"{exc})", flush=True)
            finally:
                shutil.rmtree(d, ignore_errors=True)
        print()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
