"""CPU time of a consumer blocked in get() on an idle queue for 5 s.

Three cases: a fresh consumer; one that first echoed a 3000-message
ping-pong (every get a short wait, which makes a waiter spin longer); the
same with the pair pinned to CPUs 0 and 1 (where those waits are shortest).
The CPU time is the blocked process's own (``time.process_time``) around the
one blocked call.

    python benchmarks/idle_cpu.py          # PYTHONPATH, when set, names the tree
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import fastmq  # noqa: E402

CTX = mp.get_context("fork")
BLOCK = 5.0


def child(ping, pong, burst, cpu, conn):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    for _ in range(burst):
        pong.put_bytes(ping.get_bytes(timeout=30))
    c0, w0 = time.process_time(), time.monotonic()
    try:
        ping.get_bytes(timeout=BLOCK)
    except fastmq.Empty:
        pass
    conn.send((time.process_time() - c0, time.monotonic() - w0))


def main():
    print("fastmq from", os.path.dirname(fastmq.__file__))
    pinnable = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    for burst, pin in ((0, False), (3000, False), (3000, pinnable)):
        ping, pong = fastmq.Queue(maxsize=4), fastmq.Queue(maxsize=4)
        r, w = CTX.Pipe(False)
        p = CTX.Process(target=child, args=(ping, pong, burst, 1 if pin else None, w))
        p.start()
        mask = os.sched_getaffinity(0) if pin else None
        try:
            if pin:
                os.sched_setaffinity(0, {0})
            for _ in range(burst):
                ping.put_bytes(b"x" * 64)
                pong.get_bytes(timeout=30)
        finally:
            if pin:
                os.sched_setaffinity(0, mask)
        cpu, wall = r.recv()
        p.join(10)
        ping.close()
        pong.close()
        print(f"burst={burst:4d} pinned={pin!s:5s}: blocked {wall:.2f} s, CPU {cpu * 1e3:.2f} ms "
              f"({cpu / wall * 100:.3f}%)  load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
