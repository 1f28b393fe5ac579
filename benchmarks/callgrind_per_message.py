"""Instructions per message of fastmq's single-message paths, counted by callgrind.

Wall-clock timings on a shared machine swing by 2x; instruction counts do not.
For each case this runs ``valgrind --tool=callgrind`` twice on this same script,
once moving N messages and once moving none (same imports, same queue, same
warm-up), and reports ``(Ir(N) - Ir(0)) / N``: the instructions one message
costs, everything else cancelled out.

Cases (all in one process, native backend unless FASTMQ_BACKEND says otherwise):

  bytes64     q.put_bytes(b) + q.get_bytes()          64 B bytes
  ring64      the same through the queue's ring object (no Python-level wrapper: what
              put_bytes/get_bytes would cost if they were the compiled methods)
  dict        q.put(d) + q.get()                      a small dict
  obj64       q.put(b) + q.get()                      64 B bytes, pickled (auth_cost.py's 64 B case)
  numpy16     q.put(a) + q.get()                      a 16-element float64 numpy array (out of band)
  auth64      the same on a queue with authkey=       (their difference: what the MAC costs)
  pickle      pickle.dumps(d, 5) + pickle.loads(...)  the same dict, no queue (floor of ``dict``)
  call        f(b) for a trivial Python function       the cost of any Python-level call
  lease64     q.put_bytes(b) + q.get_message() + m.ack()   64 B, at-least-once
  batch64     q.put_many_bytes(32 x b) + q.get_messages(32) + q.ack_many(...), per message
  many64      q.put_many_bytes(256 x b) + q.get_many_bytes(256), per message
  manydict    q.put_many(256 x d) + q.get_many(256), per message

Run from the repository root, after an in-place build::

    python setup.py -q build_ext --inplace
    PYTHONPATH=src python benchmarks/callgrind_per_message.py            # all cases
    PYTHONPATH=src python benchmarks/callgrind_per_message.py bytes64 -n 20000

``--child CASE N`` is what valgrind runs (one measured process).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

CASES = ("bytes64", "ring64", "dict", "obj64", "numpy16", "auth64", "pickle", "call", "lease64",
         "batch64", "many64", "manydict")
BATCH = 256
WARMUP = 2000
SMALL_DICT = {"id": 12345, "name": "sensor-7", "value": 3.25, "tags": ["a", "b"]}


def _child(case: str, n: int) -> None:
    import pickle
    payload = bytes(range(64))
    d = dict(SMALL_DICT)
    q = None
    if case in ("bytes64", "ring64", "dict", "obj64", "numpy16", "auth64", "lease64", "batch64",
                "many64", "manydict"):
        import fastmq
        q = fastmq.Queue(maxsize=1024, authkey=bytes(32) if case == "auth64" else None)
    if case == "bytes64":
        put, get = q.put_bytes, q.get_bytes

        def loop(k):
            for _ in range(k):
                put(payload)
                get()
    elif case == "ring64":
        ring = q._ring                 # internal: the compiled ring behind the Queue
        put, get = ring.put, ring.get

        def loop(k):
            for _ in range(k):
                put(payload, None)
                get(None)
    elif case == "dict":
        put, get = q.put, q.get

        def loop(k):
            for _ in range(k):
                put(d)
                get()
    elif case in ("obj64", "auth64"):
        put, get = q.put, q.get

        def loop(k):
            for _ in range(k):
                put(payload)
                get()
    elif case == "numpy16":
        import numpy
        arr = numpy.arange(16, dtype=numpy.float64)
        put, get = q.put, q.get

        def loop(k):
            for _ in range(k):
                put(arr)
                get()
    elif case == "pickle":
        dumps, loads = pickle.dumps, pickle.loads

        def loop(k):
            for _ in range(k):
                loads(dumps(d, 5))
    elif case == "lease64":
        put, get_message = q.put_bytes, q.get_message

        def loop(k):
            for _ in range(k):
                put(payload)
                get_message().ack()
    elif case == "batch64":
        batch = [payload] * 32
        put_many, get_messages, ack_many = q.put_many_bytes, q.get_messages, q.ack_many

        def loop(k):
            for _ in range(k // 32):
                put_many(batch)
                ack_many(get_messages(32))
    elif case in ("many64", "manydict"):
        if case == "many64":
            put, get, items = q.put_many_bytes, q.get_many_bytes, [payload] * BATCH
        else:
            put, get, items = q.put_many, q.get_many, [d] * BATCH

        def loop(k):
            for _ in range(k // BATCH):
                put(items)
                get(BATCH)
    elif case == "call":
        def f(x):
            return x

        def loop(k):
            for _ in range(k):
                f(payload)
    else:
        raise SystemExit(f"unknown case {case!r}; known: {', '.join(CASES)}")
    loop(WARMUP)                 # the same warm-up in the N run and the 0 run
    loop(n)
    if q is not None:
        q.close()


def _instructions(case: str, n: int, workdir: str) -> int:
    return callgrind_total([os.path.abspath(__file__), "--child", case, str(n)],
                           os.path.join(workdir, f"callgrind.{case}.{n}.out"))


def callgrind_total(script_args: list, out: str) -> int:
    """The instructions callgrind counts in ``python *script_args`` (its
    output file: ``out``); benchmarks/zero_copy_1m.py uses it too."""
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           sys.executable, *script_args]
    # A fixed hash seed: string hashes (and so dict probe lengths) are the
    # same in every run, which keeps the counts repeatable to a few instructions.
    env = dict(os.environ, PYTHONHASHSEED="0")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"valgrind failed ({res.returncode}):\n{res.stderr[-2000:]}")
    with open(out) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no instruction total in {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", default=list(CASES), help=f"some of {', '.join(CASES)}")
    ap.add_argument("-n", type=int, default=20000, help="messages in the measured run")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return 0
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"unknown case {bad[0]!r}; known: {', '.join(CASES)}")
    try:
        import fastmq
        backend = getattr(fastmq, "backend", "?")
    except Exception as exc:  # noqa: BLE001
        backend = f"unavailable ({exc})"
    print(f"callgrind instructions per message (N = {args.n}, minus a run of 0; "
          f"fastmq backend {backend}, Python {sys.version.split()[0]})")
    with tempfile.TemporaryDirectory(prefix="fastmq-callgrind-") as work:
        for case in args.cases:
            full = _instructions(case, args.n, work)
            base = _instructions(case, 0, work)
            print(f"  {case:<8} {(full - base) / args.n:10.0f} instructions/message "
                  f"({full:,} - {base:,})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
