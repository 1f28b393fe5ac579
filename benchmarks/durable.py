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
One run per cell per round (``--repeat N``: N interleaved rounds, then the
median put rate per cell, and each bar's ratio -- the median of the rounds'
own ratios -- and verdict); the machine's load is printed with each round.
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


# The bars: (label, numerator kind, denominator kind, cells, ratio,
# "ge": numerator/denominator >= ratio; "le": denominator/numerator <= ratio).
BARS = [
    ("interval >= 10x persist-queue NORMAL", "fastmq file interval", "persist-queue NORMAL",
     None, 10.0, "ge"),
    ("commit 1P >= 1x persist-queue FULL", "fastmq file commit", "persist-queue FULL",
     {(1, 64), (1, 4096)}, 1.0, "ge"),
    ("commit 4P >= 2x persist-queue FULL", "fastmq file commit", "persist-queue FULL",
     {(4, 64), (4, 4096)}, 2.0, "ge"),
    ("none within 1.5x of shm", "fastmq file none", "fastmq shm", None, 1.5, "le"),
]


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="put phase per cell")
    ap.add_argument("--dir", default=None, help="a directory on a real filesystem")
    ap.add_argument("--quick", action="store_true", help="1 producer, 64 B only")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds; each round runs every cell once (interleaved), the "
                         "summary gives the median put rate per cell and the bars' verdicts")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: run only the queues whose label "
                         "contains one of them (e.g. 'commit,FULL')")
    ap.add_argument("--cells", default=None,
                    help="comma-separated PxSIZE cells, e.g. '1x64,1x4096'")
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
    if args.only:
        want = [w.strip() for w in args.only.split(",") if w.strip()]
        kinds = [k for k in kinds if any(w in k[0] for w in want)]
    cells = [(1, 64)] if args.quick else [(1, 64), (4, 64), (1, 4096), (4, 4096)]
    if args.cells:
        cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    rates = {}                          # (label, P, size) -> [put msg/s per round]
    loads = []
    for rnd in range(max(1, args.repeat)):
        loads.append(os.getloadavg()[0])
        print(f"# durable queues, round {rnd + 1}/{max(1, args.repeat)}, {args.seconds:g} s "
              f"put phase per cell, dir {root} ({_fs_type(root)}), load {loads[-1]:.2f}, "
              f"{os.cpu_count()} cpus")
        print(f"{'queue':<22} {'P':>2} {'size':>5} {'put msg/s':>11} {'get msg/s':>11} "
              f"{'put':>9}")
        for producers, size in cells:
            for label, make in kinds:
                d = tempfile.mkdtemp(dir=root)
                try:
                    put_rate, get_rate, total = run_cell(make(d), producers, size,
                                                         args.seconds)
                    rates.setdefault((label, producers, size), []).append(put_rate)
                    print(f"{label:<22} {producers:>2} {size:>5} {put_rate:>11,.0f} "
                          f"{get_rate:>11,.0f} {total:>9,}", flush=True)
                except Exception as exc:     # a peer that is not installed, etc.
                    print(f"{label:<22} {producers:>2} {size:>5}   n/a ({type(exc).__name__}: "
                          f"{exc})", flush=True)
                finally:
                    shutil.rmtree(d, ignore_errors=True)
            print()
    if args.repeat > 1:
        print(f"# median put msg/s of {args.repeat} rounds (load at round starts: "
              f"{', '.join(f'{x:.2f}' for x in loads)}; now {os.getloadavg()[0]:.2f})")
        labels = [k[0] for k in kinds]
        print(f"{'cell':<9}" + "".join(f" {lb[-20:]:>20}" for lb in labels))
        for producers, size in cells:
            row = [rates.get((lb, producers, size)) for lb in labels]
            print(f"{producers}P {size:>5} " + "".join(
                f" {_median(v):>20,.0f}" if v else f" {'n/a':>20}" for v in row))
        print()
    print("# bars (median of the rounds' own ratios)" if args.repeat > 1 else "# bars")
    for name, num, den, only_cells, ratio, how in BARS:
        for producers, size in cells:
            if only_cells is not None and (producers, size) not in only_cells:
                continue
            a, b = rates.get((num, producers, size)), rates.get((den, producers, size))
            if not a or not b or len(a) != len(b):
                continue
            # Each round's own ratio (its two runs shared that round's disk
            # and load), then the median of those: a slow minute of the
            # disk in one round moves one ratio, not both medians apart.
            per_round = [(x / y) if how == "ge" else (y / x) for x, y in zip(a, b)]
            got = _median(per_round)
            ok = got >= ratio if how == "ge" else got <= ratio
            txt = (f"{got:.2f}x (bar >= {ratio:g}x)" if how == "ge"
                   else f"shm/none {got:.2f}x (bar <= {ratio:g}x)")
            spread = (f"  rounds {min(per_round):.2f}-{max(per_round):.2f}x"
                      if len(per_round) > 1 else "")
            print(f"{name:<38} {producers}P {size:>5}: {txt:<28} "
                  f"{'met' if ok else 'MISSED'}{spread}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
