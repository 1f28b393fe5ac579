"""Per-message costs of fastmq's three ways to move 1 MiB, side by side.

  bytes    producer ``put_bytes(buf)``, consumer ``get_bytes()``        (two copies)
  reserve  producer ``reserve_array`` + fill in place + ``commit``,
           consumer ``get(zero_copy=True)``                            (one copy: the fill)
  numpy    producer ``put(arr)``, consumer ``get(zero_copy=True)``     (one copy: the put)

The queue is made the way ``fastmq bench`` makes it for 1 MiB messages (bound 8,
``max_message_size`` 1 MiB + 64 KiB, twice the bound's bytes of pool), one producer
and one consumer process, forked after the queue exists. Each child counts, over
the measured messages only (after a warm-up): wall time, minor page faults
(``getrusage`` ``ru_minflt``) and, with ``--strace``, system calls (``strace -f -c``
on the whole run, divided by the message count: the warm-up is counted too, so
a run of none subtracted). Faults and syscalls are repeatable on a noisy
machine; the times are not (best of ``--repeat``).

Each message is checked at its head and trailer (producer seq), as the bench
checks large messages, so a lost or torn message is seen.

``--callgrind`` instead counts the CPU instructions one message costs when the
same send and receive run in one process (valgrind's callgrind, a run of
``-n`` messages minus a run of none): repeatable to a few instructions, so two
builds compare on a noisy machine. A 1 MiB copy is a few tens of thousands of
instructions; the rest is what each path adds around it.

Run from the repository root, after an in-place build::

    PYTHONPATH=src python benchmarks/zero_copy_1m.py               # all three, 3 repeats
    PYTHONPATH=src python benchmarks/zero_copy_1m.py -n 2000 --strace reserve
    PYTHONPATH=src python benchmarks/zero_copy_1m.py --callgrind -n 200

``--child MODE N`` is one measured run (what ``--strace`` wraps); ``--inproc MODE N``
is what ``--callgrind`` runs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import time

MODES = ("bytes", "reserve", "numpy")
SIZE = 1 << 20
DEPTH = 8
WARMUP = 64
HEAD = struct.Struct("<Q")


def _queue():
    import fastmq
    room = SIZE + 64 * 1024
    return fastmq.Queue(maxsize=DEPTH, max_message_size=room,
                        capacity_bytes=max(2 * DEPTH * room, 1 << 20))


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_minflt, r.ru_majflt


def _timed(step, n):
    """step(seq) WARMUP times untimed, then n times timed ->
    (seconds, minor faults, major faults) of the timed part."""
    for s in range(WARMUP):
        step(s)
    t0, f0, m0 = _usage()
    for s in range(WARMUP, WARMUP + n):
        step(s)
    t1, f1, m1 = _usage()
    return t1 - t0, f1 - f0, m1 - m0


def _producer(q, mode, n, conn):
    import numpy as np
    pool = [np.full(SIZE, i, np.uint8) for i in range(4)]
    bufs = [bytearray(a.tobytes()) for a in pool]

    send_bytes, send_array = _producer_send(q, np, pool, bufs)

    def send(seq):
        if mode == "bytes":
            send_bytes(seq)
        else:
            send_array(seq, mode)

    conn.send(_timed(send, n))


def _consumer(q, mode, n, conn):
    bad = 0

    def recv(expect):
        nonlocal bad
        if mode == "bytes":
            m = q.get_bytes()
        else:
            m = q.get(zero_copy=True)
        mv = memoryview(m).cast("B")
        if len(mv) != SIZE or HEAD.unpack_from(mv, 0)[0] != expect \
                or HEAD.unpack_from(mv, SIZE - 8)[0] != expect:
            bad += 1
        del mv, m

    conn.send(_timed(recv, n) + (bad,))


def child(mode: str, n: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    q = _queue()
    try:
        pa, pb = ctx.Pipe()
        ca, cb = ctx.Pipe()
        cons = ctx.Process(target=_consumer, args=(q, mode, n, cb))
        prod = ctx.Process(target=_producer, args=(q, mode, n, pb))
        cons.start()
        prod.start()
        try:
            if not pa.poll(120) or not ca.poll(120):
                raise SystemExit(f"{mode}: a child did not finish in 120 s")
            pt, pf, pm = pa.recv()
            ct, cf, cm, bad = ca.recv()
        finally:
            for p in (prod, cons):
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
    finally:
        q.close()
    if bad:
        raise SystemExit(f"{mode}: {bad} messages failed their check")
    secs = max(pt, ct, 1e-9)
    n = max(n, 1)
    return {"mode": mode, "n": n, "gb_per_s": n * SIZE / secs / 1e9,
            "us_per_msg": secs / n * 1e6, "prod_minflt": pf / n, "cons_minflt": cf / n,
            "majflt": (pm + cm) / n}


def _strace_counts(mode: str, n: int) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run(["strace", "-f", "-c", "-o", out.name, sys.executable, __file__,
                        "--child", mode, str(n)], check=True, stdout=subprocess.DEVNULL)
        text = out.read()
    counts = {}
    for line in text.splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(parts) >= 5 and re.match(r"\d+\.\d+$", parts[0]) and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def _strace(mode: str, n: int) -> tuple[float, str]:
    """System calls per measured message: a run of ``n`` messages minus a run of
    none (same start-up, same warm-up), divided by ``n``."""
    full, base = _strace_counts(mode, n), _strace_counts(mode, 0)
    per = {k: (v - base.get(k, 0)) / n for k, v in full.items()}
    top = sorted(((v, k) for k, v in per.items() if v >= 0.005), reverse=True)[:5]
    return sum(per.values()), ", ".join(f"{k} {v:.2f}" for v, k in top)


def _producer_send(q, np, pool, bufs):
    """The producer's send of each mode (the same as ``_producer`` does)."""
    def send_bytes(seq):
        b = bufs[seq & 3]
        HEAD.pack_into(b, 0, seq)
        HEAD.pack_into(b, SIZE - 8, seq)
        q.put_bytes(b)

    def send_array(seq, mode):
        a = pool[seq & 3]
        a[:8] = np.frombuffer(HEAD.pack(seq), np.uint8)
        a[-8:] = a[:8]
        if mode == "numpy":
            q.put(a)
        else:
            arr = q.reserve_array(a.shape, np.uint8)
            arr[...] = a
            q.commit(arr)
    return send_bytes, send_array


def inproc(mode: str, n: int) -> None:
    """Send and receive ``WARMUP + n`` messages of ``mode`` in this process."""
    import numpy as np
    q = _queue()
    pool = [np.full(SIZE, i, np.uint8) for i in range(4)]
    bufs = [bytearray(a.tobytes()) for a in pool]
    send_bytes, send_array = _producer_send(q, np, pool, bufs)
    for s in range(WARMUP + n):
        if mode == "bytes":
            send_bytes(s)
            m = q.get_bytes()
        else:
            send_array(s, mode)
            m = q.get(zero_copy=True)
        mv = memoryview(m).cast("B")
        if HEAD.unpack_from(mv, 0)[0] != s or HEAD.unpack_from(mv, SIZE - 8)[0] != s:
            raise SystemExit(f"{mode}: message {s} failed its check")
        del mv, m
    q.close()


def _instructions(mode: str, n: int, workdir: str) -> int:
    from callgrind_per_message import callgrind_total    # this script's own folder
    return callgrind_total([os.path.abspath(__file__), "--inproc", mode, str(n)],
                           os.path.join(workdir, f"callgrind.{mode}.{n}.out"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("modes", nargs="*", metavar="MODE", help=f"some of {', '.join(MODES)} (default: all)")
    ap.add_argument("-n", type=int, default=3000, help="measured messages per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--strace", action="store_true", help="also count syscalls (strace -f -c)")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per message in one process instead (valgrind)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--inproc", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if args.inproc:
        inproc(args.inproc[0], int(args.inproc[1]))
        return
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    if args.callgrind:
        import fastmq
        print(f"fastmq {fastmq.__file__}; instructions per 1 MiB message, one process, "
              f"{args.n} messages minus none (callgrind)")
        with tempfile.TemporaryDirectory() as tmp:
            for mode in args.modes or MODES:
                per = (_instructions(mode, args.n, tmp) - _instructions(mode, 0, tmp)) / args.n
                print(f"{mode:8} {per:12,.0f}", flush=True)
        return
    import fastmq
    print(f"fastmq {fastmq.__file__} backend={fastmq.backend}; 1 MiB messages, "
          f"{args.n} measured per run, best of {args.repeat}")
    print(f"{'mode':8} {'GB/s':>6} {'us/msg':>7} {'prod flt/msg':>12} {'cons flt/msg':>12}"
          + ("  syscalls/msg (top)" if args.strace else ""))
    for mode in args.modes or MODES:
        runs = [child(mode, args.n) for _ in range(args.repeat)]
        best = max(runs, key=lambda r: r["gb_per_s"])
        line = (f"{mode:8} {best['gb_per_s']:6.2f} {best['us_per_msg']:7.1f} "
                f"{best['prod_minflt']:12.2f} {best['cons_minflt']:12.2f}")
        if args.strace:
            per, top = _strace(mode, args.n)
            line += f"  {per:.2f} ({top})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
