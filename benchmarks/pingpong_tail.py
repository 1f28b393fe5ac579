"""Where a ping-pong's slow round trips come from, next to the machine's floor.

Runs the same timed loop (one 64 B message out, the answer back; the cyclic
GC counted, samples appended to an ``array``) over several channels between
two processes, so the differences are the channels':

    fastmq   two fastmq queues, put_bytes / get_bytes (blocking waits)
    pipe     two os.pipe()s, os.write / os.read
    pyspin   two counters in shared memory, each side busy-polling in Python
    cspin    the same in C (compiled with ``cc`` on the fly): the machine's floor

and prints p50 / p99 / p99.9 / p99.99 (µs), a histogram, how many GC
collections ran and both processes' context switches. ``--diag`` also reads
both sides' context-switch counts (getrusage, outside the timed window) for
every round trip and tells, for the slowest 0.1%, how often the waiting side
had gone to sleep (voluntary switch: a futex or pipe wait) or been preempted
(involuntary: another process took its CPU; a yield that ran someone else
counts here too). ``PIN=a,b`` pins the pinger to CPU a and the echo to CPU b
(``PIN=0,0``: both on one CPU, as a loaded 2-core machine often places them).

    python benchmarks/pingpong_tail.py [--rounds 3] [--n 100000] [--diag] [--nogc] [peers...]

Load matters more than anything on a shared machine: the load average is
printed with every line. Speed is not asserted anywhere.
"""
from __future__ import annotations

import bisect
import gc
import mmap
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
if not os.environ.get("PYTHONPATH"):   # PYTHONPATH names the tree to test (A/B runs)
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

CTX = mp.get_context("fork")
RT = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
PIN = os.environ.get("PIN")
EDGES = [1, 2, 3, 5, 10, 15, 20, 30, 50, 100, 1000, 10**9]   # µs

CSPIN = r"""
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static uint64_t now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                            return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec; }
static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
static void pin(const char *s, int k) {
#ifdef __linux__
    if (!s) return;
    int a = -1, b = -1;
    if (sscanf(s, "%d,%d", &a, &b) != 2) return;
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(k ? b : a, &set);
    sched_setaffinity(0, sizeof set, &set);
#endif
}
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000, warm = 2000;
    _Atomic uint64_t *sh = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    _Atomic uint64_t *ping = sh, *pong = sh + 16;
    pid_t p = fork();
    if (p == 0) {
        pin(getenv("PIN"), 1);
        for (uint64_t i = 1; i <= (uint64_t)(n + warm); i++) {
            while (atomic_load(ping) != i) relax();
            atomic_store(pong, i);
        }
        _exit(0);
    }
    pin(getenv("PIN"), 0);
    for (uint64_t i = 1; i <= (uint64_t)(n + warm); i++) {
        uint64_t t0 = now();
        atomic_store(ping, i);
        while (atomic_load(pong) != i) relax();
        uint64_t t1 = now();
        if (i > (uint64_t)warm) printf("%llu\n", (unsigned long long)(t1 - t0));
    }
    waitpid(p, 0, 0);
    return 0;
}
"""


def make(peer):
    """(send_a, recv_a, send_b, recv_b, to_close): a carries pings, b pongs."""
    if peer == "fastmq":
        import fastmq
        a = fastmq.Queue(maxsize=16, max_message_size=65 * 1024, capacity_bytes=1 << 21)
        b = fastmq.Queue(maxsize=16, max_message_size=65 * 1024, capacity_bytes=1 << 21)
        return a.put_bytes, a.get_bytes, b.put_bytes, b.get_bytes, (a, b)
    if peer == "pipe":
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        return (lambda m: os.write(w1, m), lambda: os.read(r1, 64),
                lambda m: os.write(w2, m), lambda: os.read(r2, 64), ())
    if peer == "pyspin":
        mm = mmap.mmap(-1, 4096)
        v = memoryview(mm).cast("q")

        def mk(k):
            seen = [0]

            def send(m, v=v, k=k):
                v[k] = v[k] + 1

            def recv(v=v, k=k, seen=seen):
                want = seen[0] + 1
                while v[k] != want:
                    pass
                seen[0] = want
                return b"x" * 64
            return send, recv
        sa, ra = mk(0)
        sb, rb = mk(16)          # another cache line
        return sa, ra, sb, rb, ()
    raise SystemExit(f"unknown peer {peer!r}")


def pin(k):
    if PIN:
        os.sched_setaffinity(0, {int(PIN.split(",")[k])})


def ctxsw():
    r = resource.getrusage(RT)
    return r.ru_nvcsw, r.ru_nivcsw


def echoer(ch, n, diag, nogc, conn):
    pin(1)
    _, recv_a, send_b, _, _ = ch
    if nogc:
        gc.disable()
    vs, ivs = array("q"), array("q")
    for _ in range(n):
        if diag:
            v0, iv0 = ctxsw()
        send_b(recv_a())
        if diag:
            v1, iv1 = ctxsw()
            vs.append(v1 - v0)
            ivs.append(iv1 - iv0)
    conn.send((vs.tobytes(), ivs.tobytes()))


def pinger(ch, n, diag, nogc, conn):
    pin(0)
    send_a, _, _, recv_b, _ = ch
    gcs = [0]
    gc.callbacks.append(lambda phase, info: phase == "start" and gcs.__setitem__(0, gcs[0] + 1))
    if nogc:
        gc.disable()
    clock = time.perf_counter_ns
    rtts, vs, ivs = array("q"), array("q"), array("q")
    m = b"y" * 64
    for _ in range(n):
        if diag:
            v0, iv0 = ctxsw()
        t0 = clock()
        send_a(m)
        recv_b()
        t1 = clock()
        rtts.append(t1 - t0)
        if diag:
            v1, iv1 = ctxsw()
            vs.append(v1 - v0)
            ivs.append(iv1 - iv0)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    conn.send((rtts.tobytes(), vs.tobytes(), ivs.tobytes(), gcs[0], ru.ru_nvcsw, ru.ru_nivcsw))


def pct(v, q):
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))] / 1e3


def summary(rt):
    v = sorted(rt)
    hist = [0] * len(EDGES)
    for x in rt:
        hist[min(len(EDGES) - 1, bisect.bisect_right(EDGES, x / 1e3))] += 1
    return {"p50": pct(v, 50), "p99": pct(v, 99), "p999": pct(v, 99.9), "p9999": pct(v, 99.99),
            "hist": " ".join(f"<{e}:{h}" for e, h in zip(EDGES, hist) if h)}


def run_cspin(n):
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "cspin.c"), os.path.join(d, "cspin")
        with open(src, "w") as f:
            f.write(CSPIN)
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
        out = subprocess.run([exe, str(n)], check=True, capture_output=True, text=True).stdout
    return summary(array("q", (int(x) for x in out.split())))


def run(peer, n, diag, nogc, warm=2000):
    if peer == "cspin":
        return run_cspin(n)
    ch = make(peer)
    r1, w1 = CTX.Pipe(False)
    r2, w2 = CTX.Pipe(False)
    pe = CTX.Process(target=echoer, args=(ch, n + warm, diag, nogc, w1))
    pp = CTX.Process(target=pinger, args=(ch, n + warm, diag, nogc, w2))
    pe.start()
    pp.start()
    try:
        rtts_b, pv, piv, gcs, nv, niv = r2.recv()
        ev_b, eiv_b = r1.recv()
    finally:
        for p in (pe, pp):
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for o in ch[4]:
            o.close()
    rt = array("q")
    rt.frombytes(rtts_b)
    rt = rt[warm:]
    out = summary(rt)
    out.update(gc=gcs, nvcsw=nv, nivcsw=niv)
    if diag:
        a = [array("q") for _ in range(4)]
        for x, b in zip(a, (pv, piv, ev_b, eiv_b)):
            x.frombytes(b)
        a = [x[warm:] for x in a]
        thr = sorted(rt)[int(len(rt) * 0.999)]
        slow = [i for i in range(len(rt)) if rt[i] >= thr]

        def frac(k):
            return round(sum(1 for i in slow if a[k][i] > 0) / max(1, len(slow)), 2)
        out["slowest 0.1%"] = {
            "n": len(slow), "pinger slept": frac(0), "pinger preempted": frac(1),
            "echo slept": frac(2), "echo preempted": frac(3),
            "no switch": round(sum(1 for i in slow if not any(a[k][i] for k in range(4)))
                               / max(1, len(slow)), 2)}
    return out


def main():
    args = sys.argv[1:]
    diag, nogc = "--diag" in args, "--nogc" in args
    n = int(args[args.index("--n") + 1]) if "--n" in args else 100000
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
    peers = [a for a in args if a in ("fastmq", "pipe", "pyspin", "cspin")] or \
        ["fastmq", "pipe", "pyspin", "cspin"]
    if "fastmq" in peers:
        import fastmq
        print("fastmq from", os.path.dirname(fastmq.__file__), "PIN", PIN)
    for r in range(rounds):
        for p in peers:
            o = run(p, n, diag, nogc)
            extra = (f"  gc={o['gc']} nvcsw={o['nvcsw']} nivcsw={o['nivcsw']}"
                     if "gc" in o else "")
            print(f"r{r} {p:7s} load {os.getloadavg()[0]:5.2f}  p50 {o['p50']:.2f}  "
                  f"p99 {o['p99']:.2f}  p99.9 {o['p999']:.2f}  p99.99 {o['p9999']:.1f} µs{extra}")
            print("      hist", o["hist"])
            if "slowest 0.1%" in o:
                print("     ", o["slowest 0.1%"])
            sys.stdout.flush()


if __name__ == "__main__":
    main()
