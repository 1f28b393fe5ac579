"""``fastmq bench``: fastmq side by side with the queues people use today.

Scenarios (``--scenarios``, ids or shell patterns; ``fastmq bench --list``):
P x C producer/consumer processes, raw bytes from 64 B to 64 MiB (the
message-size sweep, ``1x1-bytes-*``), 64 B from 1x2 to 8x8 processes (the
scaling sweep), small pickled objects, batches, 1 MiB numpy arrays (``put`` +
``get(zero_copy=True)``), a 64 B ping-pong latency test over two queues with
blocking waits, and the memory one queue costs.

Peers (``--peers``): fastmq, multiprocessing.Queue, SimpleQueue, Pipe (1x1 only),
and, when they are installed (``pip install 'fastmq[bench]'``), faster-fifo,
pyzmq, posix_ipc message queues and iceoryx2 (one consumer only); a peer that is
not installed is skipped with a note, and a message a peer cannot carry (posix
mq above the kernel's size limit) is shown as n/a with the reason.

Method (what makes the numbers honest, see ``fastmq._bench.runner``): processes
start first and meet at a barrier, so start-up is not timed; one clock
(CLOCK_MONOTONIC) across processes, read by consumers every 64 messages and
at the last one; every message is verified by its consumer (per-producer order,
no loss, no duplicate, payload; cheaply in the timed loop and the rest after
it, see ``fastmq._bench.payloads`` and ``runner.consume_compare``) and any
problem fails the run with exit status 1; each cell is sized by time from a short calibration run;
the median of ``--repeat`` runs is shown with the spread (min..max); each
scenario's harness ceiling (the same loops with a no-op channel) is measured and
shown, and a cell within 2x of it is marked; a ping-pong also runs its loops
over no queue at all (a shared mailbox polled in Python) in the same rounds;
reference limits (single-core memcpy, bare Python call, how often each CPU
stops running a busy process) are measured on the spot; ratios are against
multiprocessing.Queue and against the best other peer of the table.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from ._bench import report
from ._bench.payloads import KEEP_MAX, SAMPLE_EVERY
from ._bench.peers import PEERS
from ._bench.progress import Progress
from ._bench.reference import measure as measure_reference
from ._bench.runner import (CellFailed, SpinMailbox, harness_ceiling, pingpong_ceiling,
                             run_memory, run_pingpong, run_throughput)

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    id: str
    kind: str            # "throughput" | "pingpong"
    producers: int
    consumers: int
    mode: str            # bytes | pickle | batch | numpy
    size: int            # bytes per message (0 for pickled objects)
    title: str

    @property
    def depth(self) -> int:
        """Queue bound in messages, the same for every peer: 1024, fewer for
        messages over 8 KiB (about 8 MiB in flight), at least 2."""
        if self.kind == "memory":
            return 1024
        return max(2, min(1024, (8 * MiB) // max(self.size, 1)))

    @property
    def sweep(self):
        """Which chart of sweeps the scenario belongs to ("size", "scaling" or None)."""
        if self.kind == "throughput" and self.mode == "bytes":
            if self.producers == self.consumers == 1:
                return "size"
            if self.size == 64:
                return "scaling"
        return None


def _size_tag(size):
    return f"{size // MiB}m" if size >= MiB else f"{size // KiB}k" if size >= KiB else str(size)


def _size_text(size):
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB" if size >= KiB else f"{size} B"


def _tp(p, c, mode, size=0):
    what = {"bytes": f"{_size_text(size)} raw bytes (put_bytes/get_bytes)",
            "pickle": "small pickled objects (put/get)",
            "batch": f"{_size_text(size)} bytes in batches (put_many/get_many)",
            "numpy": f"{_size_text(size)} numpy arrays (put/get(zero_copy=True))",
            "reserve": f"{_size_text(size)} numpy arrays filled in place "
                       "(reserve_array/commit, get(zero_copy=True))",
            "acks": f"{_size_text(size)} raw bytes: auto-ack get_bytes vs at-least-once "
                    "get_message+ack and get_messages+ack_many (fastmq only)"}[mode]
    sid = f"{p}x{c}-{mode}" + (f"-{_size_tag(size)}" if mode != "pickle" else "")
    return Scenario(sid, "throughput", p, c, mode, size, f"{p} producer(s) x {c} consumer(s), {what}")


SIZES = [64, 256, KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB]
SCALING = [(1, 2), (2, 1), (2, 2), (4, 4), (8, 8), (1, 8), (8, 1)]

SCENARIOS = [
    *(_tp(1, 1, "bytes", size) for size in SIZES),
    *(_tp(p, c, "bytes", 64) for p, c in SCALING),
    _tp(2, 2, "bytes", 4 * KiB),
    _tp(1, 1, "pickle"), _tp(2, 2, "pickle"),
    _tp(1, 1, "batch", 64), _tp(2, 2, "batch", 64),
    _tp(1, 1, "numpy", MiB), _tp(1, 1, "numpy", 64 * MiB), _tp(1, 1, "reserve", MiB),
    _tp(1, 1, "acks", 64), _tp(1, 1, "acks", MiB),
    Scenario("pingpong-64", "pingpong", 1, 1, "bytes", 64,
             "round trip of 64 B over two queues, blocking waits"),
    Scenario("memory", "memory", 1, 1, "bytes", 64,
             "memory of one queue (64 B messages, bound 1024): RSS and /dev/shm mapped "
             "by its process, after creating it and after 4096 messages went through"),
]
BY_ID = {s.id: s for s in SCENARIOS}
DEFAULT_IDS = ["1x1-bytes-64", "1x1-bytes-4k", "1x1-bytes-1m", "2x2-bytes-64", "2x2-bytes-4k",
               "4x4-bytes-64", "1x1-pickle", "1x1-batch-64", "1x1-numpy-1m",
               "1x1-reserve-1m", "pingpong-64"]
SWEEP_IDS = [f"1x1-bytes-{_size_tag(size)}" for size in SIZES] + \
    [f"{p}x{c}-bytes-64" for p, c in [(1, 1), *SCALING]]
DETAIL_IDS = DEFAULT_IDS + ["memory"]     # a table of their own in the text report
DEFAULT_IDS = list(dict.fromkeys(DEFAULT_IDS + SWEEP_IDS + ["memory"]))
QUICK_IDS = ["1x1-bytes-64", "1x1-bytes-4k", "2x2-bytes-64", "1x1-pickle", "1x1-batch-64",
             "1x1-numpy-1m", "pingpong-64"]


def _first_count(size):
    """First (calibration) message count per producer, before sizing runs by time."""
    return 2000 if size == 0 else max(4, min(3000, (24 * MiB) // size))


def _min_count(size):
    return 200 if size < 64 * KiB else max(4, min(200, (16 * MiB) // size))


def select_scenarios(spec):
    if not spec:
        return None
    chosen = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            hits = [s.id for s in SCENARIOS]
        else:
            hits = [s.id for s in SCENARIOS if fnmatch.fnmatchcase(s.id, part)]
        if not hits:
            raise ValueError(f"unknown scenario {part!r}; known: {', '.join(BY_ID)}")
        chosen += [h for h in hits if h not in chosen]
    return [BY_ID[i] for i in chosen]


def select_peers(spec):
    if not spec:
        return list(PEERS)
    names = [p.strip() for p in spec.split(",") if p.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"unknown peer {bad[0]!r}; known: {', '.join(PEERS)}")
    return names


# --------------------------------------------------------------- measuring --

def _summarise(runs, keys):
    med = {k: statistics.median(r[k] for r in runs) if runs[0].get(k) is not None else None
           for k in keys}
    lo = {k: min(r[k] for r in runs) if runs[0].get(k) is not None else None for k in keys}
    hi = {k: max(r[k] for r in runs) if runs[0].get(k) is not None else None for k in keys}
    return med, lo, hi


class _Cell:
    """One (scenario, peer) pair being measured: calibration, then its runs.

    The runs of all peers of a scenario are interleaved (peer A run 1, peer B run
    1, ..., peer A run 2, ...), so a burst of other load on the machine hits every
    peer alike instead of all the repeats of one peer.
    """

    def __init__(self, scen, name, cls, label, progress):
        self.scen, self.cls, self.label, self.progress = scen, cls, label, progress
        self.runs, self.verified, self.count = [], 0, 0
        self.failure = None
        self.doc = {"scenario": scen.id, "kind": scen.kind, "peer": name, "label": label,
                    "one_by_one": scen.mode == "batch" and not cls.native_batch}

    def _attempt(self, what, fn):
        if self.failure is not None:
            self.progress.advance()
            return
        self.progress.step(f"{self.scen.id} | {self.label} | {what}")
        try:
            fn()
        except CellFailed as exc:
            self.failure = ("failed" if exc.kind == "verification" else exc.kind, str(exc))
            self.progress.warn(f"!!! {self.scen.id} / {self.label}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one broken peer must not end the run
            self.failure = ("error", f"{type(exc).__name__}: {exc}")
            self.progress.warn(f"!!! {self.scen.id} / {self.label}: {self.failure[1]}")
        self.progress.advance()

    def calibrate(self, target, timeout):
        scen = self.scen
        if scen.kind in ("pingpong", "memory"):
            return

        def first_run():
            count = max(_min_count(scen.size), int(_first_count(scen.size) * target / 0.3))
            r = run_throughput(self.cls, scen.producers, scen.consumers, scen.mode, scen.size,
                               count, scen.depth, timeout)
            self.verified += r["messages"]
            if 0.5 * target <= r["seconds"] <= 2 * target:
                self.runs.append(r)          # already the right length: it counts
            self.count = max(_min_count(scen.size),
                             min(20_000_000, int(r["msgs_per_s"] / scen.producers * target)))
        self._attempt("calibrating", first_run)

    def run_once(self, i, repeat, target, timeout):
        scen = self.scen
        if len(self.runs) >= (1 if scen.kind == "memory" else repeat):
            self.progress.advance()
            return

        def one():
            if scen.kind == "memory":
                self.runs.append(run_memory(self.cls, scen.size, scen.depth, timeout=timeout))
                return
            if scen.kind == "pingpong":
                r = run_pingpong(self.cls, scen.size, seconds=target, timeout=timeout)
                self.verified += r["round_trips"]
            else:
                r = run_throughput(self.cls, scen.producers, scen.consumers, scen.mode,
                                   scen.size, self.count, scen.depth, timeout)
                self.verified += r["messages"]
            self.runs.append(r)
        extra = f" ({self.count * scen.producers:,} msgs)" if self.count else ""
        self._attempt(f"run {len(self.runs) + 1}/{repeat}{extra}", one)

    def result(self) -> dict:
        if self.failure is not None:
            self.doc.update(status=self.failure[0], error=self.failure[1])
            return self.doc
        keys = {"pingpong": ("p50_us", "p99_us", "p999_us", "msgs_per_s"),
                "memory": ("rss_created", "shm_created", "rss_used", "shm_used")}.get(
                    self.scen.kind, ("msgs_per_s", "bytes_per_s", "seconds"))
        med, lo, hi = _summarise(self.runs, keys)
        self.doc.update(status="ok", runs=self.runs, median=med, min=lo, max=hi,
                        verified_messages=self.verified)
        return self.doc


def _machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import fastmq
        version, backend = fastmq.__version__, getattr(fastmq, "backend", "?")
    except Exception:  # noqa: BLE001
        version, backend = "?", "unavailable"
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "fastmq": version, "backend": backend,
            "loadavg_1min_at_start": load}


def _scenario_doc(s):
    return dict(asdict(s), depth=s.depth, sweep=s.sweep,
                detail=s.id in DETAIL_IDS or s.sweep is None)


def run_bench(scenarios, peer_names, repeat, target, timeout=30.0, quiet=False,
              command="fastmq bench", peer_classes=None):
    """Run the benchmark; return the result document (see ``report``)."""
    classes = dict(PEERS)
    classes.update(peer_classes or {})
    progress = Progress(total=0, quiet=quiet)
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": command, "machine": _machine(), "repeat": repeat,
           "target_seconds": target, "scenarios": [_scenario_doc(s) for s in scenarios],
           "cells": [], "skipped": [], "notes": [], "unavailable": {}}
    usable = []
    for name in peer_names:
        ok, why = classes[name].available()
        if ok:
            usable.append(name)
            note = classes[name].note()
            if note:
                doc["notes"].append(f"{classes[name].label}: {note}")
        else:
            doc["unavailable"][name] = why
            doc["skipped"].append(f"{name}: {why}")
            if not quiet:
                print(f"fastmq bench: skipping {name}: {why}", file=sys.stderr)
    if {"numpy", "reserve"} & {s.mode for s in scenarios}:
        try:
            import numpy  # noqa: F401
        except ImportError:
            doc["skipped"].append("numpy scenarios: numpy is not installed")
            scenarios = [s for s in scenarios if s.mode not in ("numpy", "reserve")]
            doc["scenarios"] = [_scenario_doc(s) for s in scenarios]
    plan, not_carried = {}, {}
    for s in scenarios:
        plan[s.id] = []
        for n in usable:
            if not classes[n].supports(s.producers, s.consumers, s.mode):
                continue
            why = classes[n].cannot_carry(s.producers, s.consumers, s.mode, s.size, s.depth)
            if why:
                not_carried[(s.id, n)] = why
            else:
                plan[s.id].append(n)
    progress.total = sum((len(plan[s.id]) + (s.kind == "pingpong")) *
                         (repeat + (s.kind == "throughput")) + 1 for s in scenarios)
    progress.step("measuring reference limits (memcpy, Python call, CPU stops)")
    doc["reference"] = measure_reference()
    doc["ceilings"] = {}
    doc["notes"].append(
        f"verification: a lone consumer compares every message <= {KEEP_MAX} B byte for "
        "byte, as it arrives, with the one expected next from its producer (built before "
        "the timed window); with several consumers, such messages and pickled objects are "
        "kept and compared byte for byte after the window; up to 64 KiB, the sequence numbers at head "
        f"and tail of every message are kept and checked after it, and one message in "
        f"{SAMPLE_EVERY} is compared whole; larger ones are checked at header, trailer and "
        "8 sampled 64-byte windows as they arrive")
    doc["notes"].append(
        "harness ceiling: the same producer and consumer loops with a no-op channel, "
        "measured on the spot; a cell marked ~ runs within 2x of it and may be bound by "
        "the harness rather than the queue")
    try:
        for scen in scenarios:
            progress.step(f"{scen.id} | harness ceiling")
            if scen.kind == "throughput":
                doc["ceilings"][scen.id] = harness_ceiling(scen.producers, scen.consumers,
                                                           scen.mode, scen.size)
            elif scen.kind == "pingpong":
                doc["ceilings"][scen.id] = {"round_trip_us": pingpong_ceiling(scen.size)}
            progress.advance()
            cells = []
            for name in plan[scen.id]:
                cls = classes[name]
                label = cls.label
                if name == "fastmq":
                    label = f"fastmq ({doc['machine']['backend']})"
                cells.append(_Cell(scen, name, cls, label, progress))
            for cell in cells:
                cell.calibrate(target, timeout)
            # a ping-pong's reference: the same loops with no queue, in the same rounds
            mailbox = (_Cell(scen, "no-queue", SpinMailbox, SpinMailbox.label, progress)
                       if scen.kind == "pingpong" else None)
            for i in range(repeat):
                for cell in ([mailbox] if mailbox else []) + cells:
                    cell.run_once(i, repeat, target, timeout)
            doc["cells"] += [cell.result() for cell in cells]
            if mailbox:
                ref = mailbox.result()
                doc["ceilings"][scen.id]["mailbox"] = {
                    k: ref[k] for k in ("label", "status", "error", "median", "min", "max")
                    if k in ref}
            for name in usable:
                if (scen.id, name) in not_carried:
                    doc["cells"].append({"scenario": scen.id, "kind": scen.kind, "peer": name,
                                         "label": classes[name].label, "status": "n/a",
                                         "error": not_carried[(scen.id, name)]})
    finally:
        progress.close()
    for scen in scenarios:
        cells = [c for c in doc["cells"] if c["scenario"] == scen.id]
        report.add_ratios(cells)
        report.flag_harness_bound(cells, doc["ceilings"].get(scen.id))
    return doc


# --------------------------------------------------------------------- CLI --

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer, shorter scenarios (< 30 s), ratios indicative only; "
                             "still verifies every message")
    parser.add_argument("--scenarios", metavar="IDS",
                        help="comma-separated scenario ids or patterns (e.g. '1x1-*', 'all'); "
                             "see --list")
    parser.add_argument("--peers", metavar="NAMES",
                        help=f"comma-separated peers (default: all installed): {', '.join(PEERS)}")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="runs per cell; the median is shown (default 3, --quick 1)")
    parser.add_argument("--seconds", type=float, metavar="S",
                        help="target duration of one run (default 0.2, --quick 0.1)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="a run that takes longer is killed and reported (default 30)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw a chart (needs matplotlib)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and peers, then exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def run_from_args(args, parser=None) -> int:
    def usage(msg):
        if parser is not None:
            parser.error(msg)          # exits with status 2
        raise SystemExit(2)
    if args.list:
        for s in SCENARIOS:
            sets = [n for n, ids in (("default", DEFAULT_IDS), ("quick", QUICK_IDS)) if s.id in ids]
            print(f"{s.id:<16} {s.title}" + (f"  [{', '.join(sets)}]" if sets else ""))
        print()
        for name, cls in PEERS.items():
            ok, why = cls.available()
            print(f"{name:<12} {cls.label}" + ("" if ok else f"  (unavailable: {why})"))
        return 0
    try:
        scenarios = select_scenarios(args.scenarios)
        peers = select_peers(args.peers)
    except ValueError as exc:
        usage(str(exc))
    if scenarios is None:
        scenarios = [BY_ID[i] for i in (QUICK_IDS if args.quick else DEFAULT_IDS)]
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    target = args.seconds if args.seconds is not None else (0.1 if args.quick else 0.2)
    if repeat < 1 or target <= 0 or args.timeout <= 0:
        usage("--repeat must be >= 1 and --seconds/--timeout > 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fastmq bench: error: --plot needs matplotlib (pip install matplotlib)",
                  file=sys.stderr)
            return 1
    rest = sys.argv[1:]
    if rest[:1] == ["bench"]:          # fastmq bench ... / python -m fastmq bench ...
        rest = rest[1:]
    command = " ".join(["fastmq bench", *rest])
    t0 = time.monotonic()
    try:
        doc = run_bench(scenarios, peers, repeat, target, args.timeout, args.quiet,
                        command=command.strip())
    except KeyboardInterrupt:
        print("fastmq bench: interrupted", file=sys.stderr)
        return 130
    doc["wall_seconds"] = time.monotonic() - t0
    try:
        doc["machine"]["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if args.quick:
        doc["notes"].insert(0, "--quick: one short run per cell, so the ratios are indicative "
                               "only (they can swing 2x or more on a busy machine); run "
                               "`fastmq bench` for figures to quote")
    print(report.format_table(doc))
    print(f"(wall time {doc['wall_seconds']:.1f} s)")
    status = 0
    if args.json:
        report.write_json(doc, args.json)
    if args.plot:
        try:
            report.plot(doc, args.plot)
        except Exception as exc:  # noqa: BLE001 - a chart problem is not a crash
            print(f"fastmq bench: error: could not draw {args.plot}: {exc}", file=sys.stderr)
            status = 1
    failed = [c for c in doc["cells"] if c["status"] not in ("ok", "n/a")]
    if failed:
        print(f"fastmq bench: FAILED: {len(failed)} cell(s) lost, duplicated or corrupted "
              "messages, crashed or hung (see above)", file=sys.stderr)
        status = 1
    if "fastmq" in doc["unavailable"]:
        print(f"fastmq bench: error: fastmq itself is not usable: {doc['unavailable']['fastmq']}",
              file=sys.stderr)
        status = 1
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastmq bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
