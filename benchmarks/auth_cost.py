"""What ``authkey=`` costs: put/get throughput with and without a key.

One queue per configuration, in the same run, alternating keyed and unkeyed
rounds so that machine noise hits both alike; the median round is reported,
and the cost between the fastest rounds of each (the least disturbed).

* ``same`` (64 B and 1 MiB): one process; each round puts N messages and
  then gets them back (put, get and put+get rates).
* ``cross`` (64 B): a producer process puts N messages while this process
  gets them, through a queue of 1024 slots, so both sides run at once and
  each message is sealed in one process and checked in the other; the
  rate is N over the time from the start signal to the last get.

    python benchmarks/auth_cost.py [--mode same|cross|both] [--backend native|pure]
                                   [--rounds 7] [--clock cpu]

``--clock cpu`` times each ``same`` phase with this thread's CPU time instead
of the wall clock: on a loaded machine the wall clock also counts the time
the process waited for a CPU, which hits the two configurations unevenly.
(``cross`` is timed by the wall clock: two processes run.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import fastmq  # noqa: E402

SIZES = {"64 B": (64, 20_000), "1 MiB": (1 << 20, 200)}
CROSS_N = 50_000
CROSS_SLOTS = 1024


CLOCK = time.perf_counter


def one_round(q, payload, n):
    t0 = CLOCK()
    for _ in range(n):
        q.put(payload)
    t1 = CLOCK()
    for _ in range(n):
        q.get()
    t2 = CLOCK()
    return n / (t1 - t0), n / (t2 - t1), n / (t2 - t0)


def _produce(q, payload, n, go):
    go.wait()
    for _ in range(n):
        q.put(payload)
    os._exit(0)                  # no atexit, no flush: the parent owns the queue


def cross_round(q, payload, n):
    """One producer process -> this process: messages per second."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")     # the child inherits q (and its key) as it is
    go = ctx.Event()
    child = ctx.Process(target=_produce, args=(q, payload, n, go))
    child.start()
    try:
        get = q.get
        t0 = time.perf_counter()
        go.set()
        for _ in range(n):
            get()
        t1 = time.perf_counter()
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
    return n / (t1 - t0)


def run_same(args):
    for label, (size, n) in SIZES.items():
        payload = os.urandom(size)          # bytes: pickled in-band, one copy
        kw = dict(maxsize=n, max_message_size=max(2 * size, 4096),
                  capacity_bytes=max(4 * size * n, 64 << 20), _backend=args.backend)
        plain = fastmq.Queue(**kw)
        keyed = fastmq.Queue(authkey=os.urandom(32), **kw)
        results = {"no key": [], "authkey": []}
        one_round(plain, payload, min(n, 1000))   # warm up both
        one_round(keyed, payload, min(n, 1000))
        for _ in range(args.rounds):
            results["no key"].append(one_round(plain, payload, n))
            results["authkey"].append(one_round(keyed, payload, n))
        med = {k: [statistics.median(r[i] for r in v) for i in range(3)]
               for k, v in results.items()}
        for k, (p, g, pg) in med.items():
            print(f"  {label:6} {k:8} put {p:12,.0f}  get {g:12,.0f}  put+get {pg:12,.0f}")
        cost = [100 * (1 - med["authkey"][i] / med["no key"][i]) for i in range(3)]
        print(f"  {label:6} cost     put {cost[0]:11.1f}%  get {cost[1]:11.1f}%  "
              f"put+get {cost[2]:11.1f}%")
        # The fastest round of each: the least disturbed by other processes.
        best = {k: [max(r[i] for r in v) for i in range(3)] for k, v in results.items()}
        cost = [100 * (1 - best["authkey"][i] / best["no key"][i]) for i in range(3)]
        print(f"  {label:6} (best rounds) put {cost[0]:5.1f}%  get {cost[1]:11.1f}%  "
              f"put+get {cost[2]:11.1f}%")
        plain.close()
        keyed.close()


def run_cross(args):
    payload = os.urandom(64)
    kw = dict(maxsize=CROSS_SLOTS, _backend=args.backend)
    plain = fastmq.Queue(**kw)
    keyed = fastmq.Queue(authkey=os.urandom(32), **kw)
    results = {"no key": [], "authkey": []}
    cross_round(plain, payload, 2000)               # warm up both
    cross_round(keyed, payload, 2000)
    for _ in range(args.rounds):
        results["no key"].append(cross_round(plain, payload, CROSS_N))
        results["authkey"].append(cross_round(keyed, payload, CROSS_N))
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, rate in med.items():
        print(f"  64 B   {k:8} producer process -> consumer process {rate:12,.0f}")
    print(f"  64 B   cost     cross-process {100 * (1 - med['authkey'] / med['no key']):11.1f}%")
    best = {k: max(v) for k, v in results.items()}
    print(f"  64 B   (best rounds) cross-process "
          f"{100 * (1 - best['authkey'] / best['no key']):5.1f}%")
    plain.close()
    keyed.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="both", choices=["same", "cross", "both"])
    ap.add_argument("--backend", default=fastmq.backend, choices=["native", "pure"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.mode in ("same", "both"):
        print(f"same process: backend={args.backend} rounds={args.rounds} clock={args.clock} "
              f"(median msgs/s; put, get, put+get)")
        run_same(args)
    if args.mode in ("cross", "both"):
        print(f"cross-process: backend={args.backend} rounds={args.rounds} clock=wall "
              f"(median msgs/s; {CROSS_N:,} messages, {CROSS_SLOTS} slots)")
        run_cross(args)


if __name__ == "__main__":
    main()
