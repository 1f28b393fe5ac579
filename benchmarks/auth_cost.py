"""What ``authkey=`` costs: put/get throughput with and without a key.

One process, one queue per configuration, in the same run: each round puts
N messages and then gets them back, alternating keyed and unkeyed queues so
that machine noise hits both alike; the median round is reported.

    python benchmarks/auth_cost.py [--backend native|pure] [--rounds 7] [--clock cpu]

``--clock cpu`` times each phase with this thread's CPU time instead of the
wall clock: on a loaded machine the wall clock also counts the time the
process waited for a CPU, which hits the two configurations unevenly.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default=fastmq.backend, choices=["native", "pure"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.thread_time
    print(f"backend={args.backend} rounds={args.rounds} clock={args.clock} "
          f"(median msgs/s; put, get, put+get)")
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
        plain.close()
        keyed.close()


if __name__ == "__main__":
    main()
