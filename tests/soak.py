"""Randomized crash soak for fastmq (native backend): producers and consumers
under load on one named queue while a chaos loop SIGKILLs random processes
(respawning the killed role) and freezes others with SIGSTOP/SIGCONT.

    python tests/soak.py --seconds 300            # the long mode
    python tests/soak.py --seconds 20 --producers 2 --consumers 2

``run(...)`` is the importable entry point (tests/test_crash.py runs it for
~18 s in CI) and returns a dict; ``format_summary(result)`` renders the table.

Accounting (all from per-process line logs, written *after* the call they
record returned and flushed at once, so a SIGKILL cannot lose a line that
describes a finished call):

* committed  -- ``put``/``put_many`` returned for it (producer logs);
* delivered  -- returned by ``get``/``get_many`` to a consumer (consumer logs),
  or by the final drain;
* lost_after_handover -- committed, never delivered, attributable to a
  consumer killed after the hand-over (at-most-once, README "Crash safety"): at most
  ``consumer_kills * MAX_BATCH`` messages (a consumer holds at most one
  call's worth when it dies). ``lost`` is what exceeds that bound;
* torn -- checksum/length mismatch or undecodable; duplicated -- delivered
  more than once (auto-ack must never duplicate);
* inflight_delivered -- delivered but not logged as committed: the message
  of a producer killed after the publish but before it could log; each must
  be one of the at most MAX_BATCH seqs after that producer's last logged one
  (otherwise ``bad_inflight``);
* stranded -- messages the final drain only got after an explicit
  ``Ring.recover()`` (a dead consumer's claim nobody had reaped);
* time to recover -- for each kill, from the SIGKILL until the queue has
  moved a full lap past it: ``enqueued`` and ``dequeued`` (stats) both grew
  by ``maxsize + MAX_BATCH * (producers + consumers)`` since the kill, so
  producers and consumers have both passed every slot the dead process could
  have held. ``wedged`` counts kills after which that took over 10 s.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib

MAX_BATCH = 8
SIZES = [16, 64, 150, 200, 1000, 4000, 30_000, 100_000]      # inline and block
SIZE_WEIGHTS = [30, 20, 15, 10, 8, 7, 6, 4]
WEDGED_AFTER = 10.0


# ==================================================================== workers

def _payload(pid, seq, size):
    unit = ((pid * 1_000_003 + seq * 7919) & 0xFFFFFFFF).to_bytes(4, "little") + \
        seq.to_bytes(8, "little")
    return (unit * (size // len(unit) + 1))[:size]


def _msg(pid, seq, size):
    data = _payload(pid, seq, size)
    return (pid, seq, data, zlib.crc32(data))


def _producer(a):
    import fastmq
    q = fastmq.Queue.open(a.queue, url=a.url)
    rng = random.Random(a.seed)
    log = open(a.log, "a", buffering=1)
    seq = 0
    while time.time() < a.until:
        if rng.random() < 0.25:
            k = rng.randint(2, MAX_BATCH)
            items = [_msg(a.id, seq + i, rng.choices(SIZES, SIZE_WEIGHTS)[0])
                     for i in range(k)]
            n = q.put_many(items, timeout=0.5)
            if n:
                log.write("".join(f"C {seq + i}\n" for i in range(n)))
                log.flush()
            seq += n
        else:
            try:
                q.put(_msg(a.id, seq, rng.choices(SIZES, SIZE_WEIGHTS)[0]), timeout=0.5)
            except fastmq.Full:
                continue
            log.write(f"C {seq}\n")
            log.flush()
            seq += 1
    q.close()


def _consumer(a):
    import fastmq
    q = fastmq.Queue.open(a.queue, url=a.url)
    rng = random.Random(a.seed)
    log = open(a.log, "a", buffering=1)
    while time.time() < a.until:
        try:
            if rng.random() < 0.3:
                items = q.get_many(rng.randint(2, MAX_BATCH), timeout=0.3)
            else:
                items = [q.get(timeout=0.3)]
        except fastmq.Empty:
            continue
        except fastmq.BadMessage:
            log.write("T\n")
            log.flush()
            continue
        now = time.time()
        lines = []
        for m in items:
            try:
                p, s, data, crc = m
                ok = isinstance(data, bytes) and zlib.crc32(data) == crc
            except Exception:
                lines.append("T\n")
                continue
            lines.append(f"R {p} {s} {int(ok)} {now:.6f}\n")
        log.write("".join(lines))
        log.flush()
    q.close()


# ================================================================= orchestrator

class _Role:
    def __init__(self, kind, ident, proc, log):
        self.kind, self.id, self.proc, self.log = kind, ident, proc, log


def _read_lines(path):
    try:
        with open(path) as f:
            return [ln.split() for ln in f.read().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def _pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def run(seconds=60.0, producers=3, consumers=3, workdir=None, seed=None, verbose=True,
        maxsize=64, pause_prob=0.3, keep_logs=False, url=None):
    """Run the soak; return the figures (see the module docstring). The logs
    go to ``workdir`` (kept), or to a temporary directory that is removed
    afterwards unless ``keep_logs``."""
    import fastmq
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    scratch = workdir is None and not keep_logs
    workdir = workdir or tempfile.mkdtemp(prefix="fastmq-soak-")
    os.makedirs(workdir, exist_ok=True)
    name = f"fmqsoak-{os.getpid()}-{rng.randrange(1 << 32):08x}"
    # url: a location for the queue (e.g. file:///dir for a durable one, in
    # sync="interval": the soak kills processes, it does not cut the power).
    extra = {"url": url, "sync": "interval"} if url else {"_backend": "native"}
    q = fastmq.Queue.create(name, maxsize=maxsize, max_message_size=1 << 20,
                            capacity_bytes=32 << 20, **extra)
    start = time.time()
    until = start + seconds
    env = dict(os.environ)
    env.pop("FASTMQ_CRASH_AT", None)
    env["FASTMQ_BACKEND"] = "native"
    roles, dead = [], []
    next_id = [1]
    res = collections.Counter()
    ttr, errors, events = [], [], []

    def log(msg):
        events.append(f"{time.time() - start:7.2f}s {msg}")
        if verbose:
            print(events[-1], flush=True)

    def spawn(kind):
        ident = next_id[0]
        next_id[0] += 1
        path = os.path.join(workdir, f"{kind[0]}-{ident}.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--role", kind, "--queue", name,
               "--id", str(ident), "--until", repr(until), "--log", path,
               "--seed", str(rng.randrange(1 << 30))] + (["--url", url] if url else [])
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        r = _Role(kind, ident, proc, path)
        roles.append(r)
        return r

    def stats():
        return q.stats()

    try:
        for _ in range(producers):
            spawn("producer")
        for _ in range(consumers):
            spawn("consumer")
        need = maxsize + MAX_BATCH * (producers + consumers)
        while time.time() < until - 1.0:
            time.sleep(rng.uniform(0.2, 0.7))
            # children that exited on their own before the end are errors
            for r in roles:
                if r.proc.poll() is not None and r.proc.returncode != 0 and r not in dead:
                    dead.append(r)
                    errors.append(f"{r.kind} {r.id} exited rc={r.proc.returncode}: "
                                  f"{(r.proc.stderr.read() or '')[-600:]}")
                    log(f"ERROR {errors[-1]}")
                    roles.remove(r)
                    spawn(r.kind)
                    break
            live = [r for r in roles if r.proc.poll() is None]
            if not live:
                continue
            victim = rng.choice(live)
            if rng.random() < pause_prob:
                os.kill(victim.proc.pid, signal.SIGSTOP)
                res["pauses"] += 1
                hold = rng.uniform(0.1, 1.2)
                time.sleep(hold)
                st = stats()["stalled"]
                if st and st["pid"] == victim.proc.pid:
                    res["stalls_reported"] += 1
                os.kill(victim.proc.pid, signal.SIGCONT)
                log(f"paused {victim.kind} {victim.id} for {hold:.2f}s"
                    f"{' (reported stalled)' if st and st['pid'] == victim.proc.pid else ''}")
                continue
            s0 = stats()
            t0 = time.monotonic()
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait()
            roles.remove(victim)
            dead.append(victim)
            res["kills"] += 1
            res[f"{victim.kind}_kills"] += 1
            spawn(victim.kind)
            took = None
            while True:
                s = stats()
                if (s["enqueued"] - s0["enqueued"] >= need
                        and s["dequeued"] - s0["dequeued"] >= need):
                    took = time.monotonic() - t0
                    ttr.append(took)
                    break
                if time.monotonic() - t0 > WEDGED_AFTER:
                    res["wedged"] += 1
                    log(f"WEDGED? no full lap {WEDGED_AFTER}s after killing "
                        f"{victim.kind} {victim.id}: {s}")
                    break
                if time.time() > until:
                    break            # the run ends; not counted either way
                time.sleep(0.002)
            log(f"killed {victim.kind} {victim.id}"
                + ("" if took is None else f"; a full lap {took * 1000:.0f} ms later"))
        # ---- wind down: children stop by themselves at `until`
        for r in roles:
            try:
                r.proc.wait(max(5.0, until - time.time() + 15))
            except subprocess.TimeoutExpired:
                errors.append(f"{r.kind} {r.id} did not finish (hung): killed")
                log(f"ERROR {errors[-1]}")
                os.kill(r.proc.pid, signal.SIGCONT)
                r.proc.kill()
                r.proc.wait()
                res["hung"] += 1
            if r.proc.returncode not in (0, None) and r.proc.returncode != -9:
                errors.append(f"{r.kind} {r.id} exited rc={r.proc.returncode}: "
                              f"{(r.proc.stderr.read() or '')[-600:]}")
        # ---- final drain: ordinary gets first, then an explicit recover()
        drained = []
        for phase in ("plain", "after_recover"):
            if phase == "after_recover":
                q._ring.recover()
            while True:
                try:
                    items = q.get_many(256, timeout=2.0)
                except fastmq.Empty:
                    break
                except fastmq.BadMessage:
                    res["torn"] += 1
                    continue
                for m in items:
                    try:
                        p, s, data, crc = m
                        ok = isinstance(data, bytes) and zlib.crc32(data) == crc
                    except Exception:
                        p = s = None
                        ok = False
                    drained.append((p, s, ok, phase))
        final = q.stats()
    finally:
        for r in roles:
            if r.proc.poll() is None:
                try:
                    os.kill(r.proc.pid, signal.SIGCONT)
                    r.proc.kill()
                except ProcessLookupError:
                    pass
                r.proc.wait()
        q.close()
        try:
            if url:
                fastmq.Queue.unlink(name, url=url)
            else:
                fastmq.Queue.unlink(name, _backend="native")
        except Exception:
            pass

    # ---- accounting (compact: a producer's committed seqs are 0..n-1, so
    # deliveries are counted in one bytearray per producer)
    last_logged = {}
    dead_ids = {r.id for r in dead}
    for r in roles + dead:
        if r.kind != "producer":
            continue
        n = 0
        with open(r.log) if os.path.exists(r.log) else open(os.devnull) as f:
            for line in f:
                if line.startswith("C "):
                    s_ = int(line[2:])
                    if s_ != n:
                        errors.append(f"producer {r.id} logged seq {s_} after {n - 1}")
                    n = s_ + 1
        last_logged[r.id] = n - 1
    counts = {p: bytearray(n + 1 + MAX_BATCH) for p, n in last_logged.items()}
    bad_inflight = duplicated = 0

    def deliver(p, s_):
        nonlocal bad_inflight, duplicated
        c = counts.get(p)
        if c is None or s_ < 0 or s_ >= len(c):
            bad_inflight += 1            # not a message any producer could have sent
            return
        if c[s_]:
            duplicated += 1
        c[s_] = min(255, c[s_] + 1)

    delivered = 0
    for r in roles + dead:
        if r.kind != "consumer" or not os.path.exists(r.log):
            continue
        with open(r.log) as f:
            for line in f:
                if line.startswith("T"):
                    res["torn"] += 1
                    continue
                parts = line.split(" ", 4)
                if parts[3] != "1":
                    res["torn"] += 1
                deliver(int(parts[1]), int(parts[2]))
                delivered += 1
    stranded = 0
    for p, s_, ok, phase in drained:
        if not ok:
            res["torn"] += 1
        if p is not None:
            deliver(p, s_)
            delivered += 1
        if phase == "after_recover":
            stranded += 1
    committed = sum(n + 1 for n in last_logged.values())
    missing = inflight = 0
    for p, c in counts.items():
        n = last_logged[p] + 1
        missing += c[:n].count(0)
        extra = len(c) - n - c[n:].count(0)
        if extra and p not in dead_ids:
            bad_inflight += extra        # only a killed producer leaves unlogged ones
        inflight += extra
    bound = res["consumer_kills"] * MAX_BATCH
    after_handover = min(missing, bound)
    if scratch:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "seconds": seconds, "seed": seed, "producers": producers, "consumers": consumers,
        "maxsize": maxsize, "kills": res["kills"], "producer_kills": res["producer_kills"],
        "consumer_kills": res["consumer_kills"], "pauses": res["pauses"],
        "stalls_reported": res["stalls_reported"], "committed": committed,
        "delivered": delivered, "inflight_delivered": inflight,
        "bad_inflight": bad_inflight, "lost_after_handover": after_handover,
        "lost_after_handover_bound": bound, "lost": missing - after_handover,
        "torn": res["torn"], "duplicated": duplicated, "stranded": stranded,
        "wedged": res["wedged"], "hung": res["hung"], "errors": errors,
        "ttr_p50_ms": None if not ttr else _pct(ttr, 50) * 1000,
        "ttr_p99_ms": None if not ttr else _pct(ttr, 99) * 1000,
        "ttr_max_ms": None if not ttr else max(ttr) * 1000, "ttr_samples": len(ttr),
        "abandoned": final["abandoned"], "reclaimed_blocks": final["reclaimed_blocks"],
        "recoveries": final["recoveries"], "workdir": workdir, "events": events,
    }


def format_summary(r):
    def ms(v):
        return "-" if v is None else f"{v:.0f} ms"
    rows = [
        ("duration / seed", f"{r['seconds']:.0f} s / {r['seed']}"),
        ("producers x consumers (maxsize)",
         f"{r['producers']} x {r['consumers']} ({r['maxsize']} slots)"),
        ("kills survived (producer/consumer)",
         f"{r['kills']} ({r['producer_kills']}/{r['consumer_kills']})"),
        ("SIGSTOP pauses (reported stalled)", f"{r['pauses']} ({r['stalls_reported']})"),
        ("messages committed", r["committed"]),
        ("messages delivered", r["delivered"]),
        ("  of which in flight at a producer kill", r["inflight_delivered"]),
        ("lost (beyond at-most-once)", r["lost"]),
        ("lost after hand-over (bound)",
         f"{r['lost_after_handover']} (<= {r['lost_after_handover_bound']})"),
        ("torn", r["torn"]),
        ("duplicated", r["duplicated"]),
        ("stranded until explicit recover()", r["stranded"]),
        ("bad in-flight deliveries", r["bad_inflight"]),
        ("wedged (> 10 s) / hung children", f"{r['wedged']} / {r['hung']}"),
        ("time to recover p50 / p99 / max",
         f"{ms(r['ttr_p50_ms'])} / {ms(r['ttr_p99_ms'])} / {ms(r['ttr_max_ms'])}"
         f" (n={r['ttr_samples']})"),
        ("stats: abandoned / reclaimed blocks / recoveries",
         f"{r['abandoned']} / {r['reclaimed_blocks']} / {r['recoveries']}"),
        ("child errors", len(r["errors"])),
    ]
    w = max(len(k) for k, _ in rows)
    out = ["fastmq crash soak", "-" * (w + 24)]
    out += [f"{k:<{w}}  {v}" for k, v in rows]
    out += [f"  ! {e}" for e in r["errors"][:10]]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--consumers", type=int, default=3)
    ap.add_argument("--maxsize", type=int, default=64)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="keep the per-process logs here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temporary logs")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--url", default=None,
                    help="where the queue lives, e.g. file:///var/tmp/soak (default: shared memory)")
    # worker mode (internal)
    ap.add_argument("--role", choices=["producer", "consumer"])
    ap.add_argument("--queue")
    ap.add_argument("--id", type=int)
    ap.add_argument("--until", type=float)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    if a.role:
        (_producer if a.role == "producer" else _consumer)(a)
        return 0
    r = run(a.seconds, a.producers, a.consumers, a.workdir, a.seed, not a.quiet, a.maxsize,
            keep_logs=a.keep_logs, url=a.url)
    print(format_summary(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({k: v for k, v in r.items() if k != "events"}, f, indent=2)
    ok = (r["lost"] == 0 and r["torn"] == 0 and r["duplicated"] == 0 and r["wedged"] == 0
          and r["bad_inflight"] == 0 and not r["errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
