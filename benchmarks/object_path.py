"""What ``q.put(obj)`` + ``q.get()`` costs on top of pickle, in one process.

For each payload this prints the best-of-N nanoseconds of one round trip of:

  pickle     ``pickle.loads(pickle.dumps(obj, 5))``           -- the floor
  put+get    ``q.put(obj)`` + ``q.get()`` on a default ``fastmq.Queue()``
  bytes      ``q.put_bytes(p)`` + ``q.get_bytes()`` of ``p``, the object's pickle
             (the same number of bytes through the queue, no codec)
  layer      put+get - pickle: what the queue adds to serializing

Payloads: a small dict (the one of ``callgrind_per_message.py``), 64 B bytes,
a list of 32 ints, a 40-character str, and a 16-element float64 numpy array
(if numpy is installed; it travels out of band, so its ``pickle`` row is the
in-band pickle, the nearest floor there is).

Timings on a shared machine are noisy: each figure is the best of ``-r``
repeats of ``-n`` round trips, with the cases interleaved inside each repeat
(many short windows: the best of them is the one least disturbed by other
load). ``--compare SRC`` runs the same measurement, ``--rounds`` times in
alternation, against a second source tree (``SRC`` is put first on ``sys.path`` of a child process, e.g. a
copy of ``src/`` with its built extension) and prints both side by side, so
a before/after comparison shares one run. For instruction counts, which do
not depend on the machine's load, see ``callgrind_per_message.py``.

Run from the repository root, after an in-place build::

    PYTHONPATH=src python benchmarks/object_path.py
    PYTHONPATH=src python benchmarks/object_path.py --compare /tmp/old/src
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time

SMALL_DICT = {"id": 12345, "name": "sensor-7", "value": 3.25, "tags": ["a", "b"]}


def _payloads():
    out = {"dict": dict(SMALL_DICT), "bytes64": bytes(range(64)),
           "ints32": list(range(1000, 1032)), "str40": "fastmq-" * 5 + "abcde"}
    try:
        import numpy
    except ImportError:
        return out
    out["np16"] = numpy.arange(16, dtype=numpy.float64)
    return out


def _best(fn, n, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn(n)
        best = min(best, time.perf_counter_ns() - t0)
    return best / n


def measure(n: int, repeats: int) -> dict:
    """{payload: {"pickle": ns, "put+get": ns, "bytes": ns}} of this process's fastmq."""
    import fastmq
    q = fastmq.Queue(maxsize=1024)
    put, get, put_bytes, get_bytes = q.put, q.get, q.put_bytes, q.get_bytes
    dumps, loads = pickle.dumps, pickle.loads
    loops = {}
    for name, obj in _payloads().items():
        raw = dumps(obj, 5)

        def bare(k, obj=obj):
            for _ in range(k):
                loads(dumps(obj, 5))

        def objects(k, obj=obj):
            for _ in range(k):
                put(obj)
                get()

        def plain(k, raw=raw):
            for _ in range(k):
                put_bytes(raw)
                get_bytes()
        loops[name] = {"pickle": bare, "put+get": objects, "bytes": plain}
        got = (put(obj), get())[1]                     # a correct round trip first
        if name != "np16":
            assert got == obj, (name, got)
        else:
            assert (got == obj).all()
    for cases in loops.values():            # warm-up
        for fn in cases.values():
            fn(n // 4 + 1)
    result = {name: {case: float("inf") for case in cases} for name, cases in loops.items()}
    for _ in range(repeats):                # interleaved: a load spike hits every case alike
        for name, cases in loops.items():
            for case, fn in cases.items():
                result[name][case] = min(result[name][case], _best(fn, n, 1))
    q.close()
    return result


def _table(results: dict) -> None:
    labels = list(results)
    head = f"{'payload':<8} " + " ".join(
        f"{label + ' ' + col:>{max(14, len(label) + 9)}}"
        for label in labels for col in ("pickle", "put+get", "bytes", "layer"))
    print(head)
    first = results[labels[0]]
    for name in first:
        cells = []
        for label in labels:
            r = results[label][name]
            width = max(14, len(label) + 9)
            for v in (r["pickle"], r["put+get"], r["bytes"], r["put+get"] - r["pickle"]):
                cells.append(f"{v:>{width}.0f}")
        print(f"{name:<8} " + " ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="round trips per timed loop")
    ap.add_argument("-r", type=int, default=60, help="repeats (best of)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="with --compare: child processes per tree, alternated")
    ap.add_argument("--compare", metavar="SRC", help="a second source tree to measure alternately")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # child mode
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(measure(args.n, args.r)))
        return 0
    import fastmq
    print(f"ns per round trip, best of {args.r * (args.rounds if args.compare else 1)} x {args.n} (fastmq backend {fastmq.backend}, "
          f"Python {sys.version.split()[0]}); layer = put+get - pickle")
    if not args.compare:
        _table({"": measure(args.n, args.r)})
        return 0
    here = os.path.dirname(os.path.abspath(fastmq.__file__ + "/.."))
    trees = {"this": here, "other": os.path.abspath(args.compare)}
    best: dict = {}
    for _ in range(args.rounds):            # alternate the trees
        for label, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--json",
                                  "-n", str(args.n), "-r", str(args.r)],
                                 capture_output=True, text=True, env=env, check=True).stdout
            got = json.loads(out)
            mine = best.setdefault(label, got)
            for name, cases in got.items():
                for case, v in cases.items():
                    mine[name][case] = min(mine[name][case], v)
    print(f"this = {trees['this']}, other = {trees['other']}")
    _table(best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
