"""Limits measured on the spot, printed above the table so numbers have a scale.

* ``memcpy_bandwidth()`` -- single-core copy bandwidth of a buffer much larger than
  the caches (numpy ``copyto`` when numpy is there, else a bytes copy); moving a
  1 MiB message costs at least one such copy.
* ``python_call_ns()``  -- cost of one bare Python function call per message in a
  loop, i.e. the ceiling any Python-level ``put``+``get`` pair stays below.
* ``verify_ns()``       -- the harness's own per-message check in every consumer, so
  the reader knows the ceiling it puts on every peer alike.
"""
from __future__ import annotations

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


def measure() -> dict:
    bw = memcpy_bandwidth()
    call = python_call_ns()
    return {"memcpy_bytes_per_s": bw, "python_call_ns": call,
            "python_call_msgs_per_s": 1e9 / call, "verify_ns": verify_ns()}
