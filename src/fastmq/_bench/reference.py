"""Limits measured on the spot, printed above the table so numbers have a scale.

* ``memcpy_bandwidth()`` -- single-core copy bandwidth of a buffer much larger than
  the caches (numpy ``copyto`` when numpy is there, else a bytes copy); moving a
  1 MiB message costs at least one such copy.
* ``python_call_ns()``  -- cost of one bare Python function call per message in a
  loop, i.e. the ceiling any Python-level ``put``+``get`` pair stays below.
* ``verify_ns()``       -- the harness's own per-message check in every consumer, so
  the reader knows the ceiling it puts on every peer alike.
* ``cpu_stops()``       -- how often, and for how long, each CPU stops running a
  process that never blocks (interrupts; on a virtual machine, the hypervisor
  taking the CPU as well). A round trip that one of them lands in is that much
  slower whatever the queue, so they set the floor of a ping-pong's tail.
"""
from __future__ import annotations

import os
import time

_BIG = 64 << 20


def memcpy_bandwidth(nbytes: int = _BIG, rounds: int = 5) -> float:
    """Best-of-``rounds`` single-core copy bandwidth in bytes per second."""
    try:
        import numpy as np
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)

        def copy():
            np.copyto(dst, src)
    except ImportError:
        src = bytearray(b"\1") * nbytes
        dst = bytearray(nbytes)

        def copy():
            dst[:] = src
    copy()                          # fault the pages in
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _nothing(x):
    return x


def python_call_ns(n: int = 200_000) -> float:
    """Nanoseconds per iteration of ``for i in range(n): f(i)`` with a trivial ``f``."""
    f = _nothing
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for i in range(n):
            f(i)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def verify_ns(n: int = 20_000) -> float:
    """What the consumer-side check of one 64 B message costs (``Tally.check`` plus
    the clock read): every consumer in every cell pays it, for every peer alike."""
    from .payloads import Builder, Tally
    build = Builder(0, 64, "bytes").build
    msgs = [build(i) for i in range(n)]
    check, now = Tally(1, n, 64, "bytes").check, time.monotonic_ns
    t0 = time.perf_counter_ns()
    for m in msgs:
        check(m)
        now()
    return (time.perf_counter_ns() - t0) / n


STOP_NS = 5000      # a gap between two clock reads this long is a stop, not the loop


def _stops_here(seconds):
    """(stops per second, their durations in ns) on this CPU: a loop that only
    reads the clock (~50 ns a turn) sees every stop as a gap between two reads."""
    clock = time.perf_counter_ns
    gaps = []
    prev = clock()
    end = prev + int(seconds * 1e9)
    while prev < end:
        t = clock()
        if t - prev >= STOP_NS:
            gaps.append(t - prev)
        prev = t
    return len(gaps) / seconds, gaps


def cpu_stops(seconds: float = 0.5, max_cpus: int = 8) -> dict:
    """Stops of at least ``STOP_NS`` on up to ``max_cpus`` of this process's CPUs,
    all measured at once, one forked process pinned to each (where the system
    can pin): the median CPU's
    stops per second, the median stop and the 99th percentile stop (µs)."""
    pin = getattr(os, "sched_setaffinity", None)       # Linux; elsewhere the CPUs are not pinned
    cpus = (sorted(os.sched_getaffinity(0)) if pin else range(os.cpu_count() or 1))[:max_cpus]
    kids = []
    try:
        for cpu in cpus:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                        # the child: measure, write, leave
                code = 1
                try:
                    os.close(r)
                    if pin:
                        pin(0, {cpu})
                    rate, gaps = _stops_here(seconds)
                    os.write(w, (" ".join(map(str, [rate, *gaps]))).encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            kids.append((pid, r))
        rates, gaps = [], []
        for _, r in kids:
            with os.fdopen(r, "rb") as f:
                words = f.read().split()
            if words:
                rates.append(float(words[0]))
                gaps += [int(x) for x in words[1:]]
    finally:
        for pid, _ in kids:
            os.waitpid(pid, 0)
    rates.sort()
    gaps.sort()

    def at(q):
        return gaps[min(len(gaps) - 1, int(q * len(gaps)))] / 1e3 if gaps else 0.0
    return {"cpus": len(rates), "per_cpu_per_s": rates[len(rates) // 2] if rates else 0.0,
            "median_us": at(0.5), "p99_us": at(0.99)}


def measure() -> dict:
    bw = memcpy_bandwidth()
    call = python_call_ns()
    return {"memcpy_bytes_per_s": bw, "python_call_ns": call,
            "python_call_msgs_per_s": 1e9 / call, "verify_ns": verify_ns(),
            "cpu_stops": cpu_stops()}
