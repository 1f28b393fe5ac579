# pyright: strict
"""What a typical user script looks like, checked with ``mypy --strict`` and
``pyright`` in strict mode against the installed package (.ci/wheels.sh): every
public call below must type-check without a cast or an ignore. It also runs:
``python tests/typing/sample_user.py``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import uuid

import fastmq


def worker(jobs: fastmq.Queue[int], results: fastmq.Queue[tuple[int, int]]) -> None:
    for n in iter(jobs.get, -1):
        results.put((n, n * n))


def main() -> int:
    jobs: fastmq.Queue[int] = fastmq.Queue(maxsize=1024)
    results: fastmq.Queue[tuple[int, int]] = fastmq.Queue()
    procs = [mp.Process(target=worker, args=(jobs, results)) for _ in range(2)]
    for p in procs:
        p.start()
    sent = jobs.put_many(range(100))
    for _ in procs:
        jobs.put(-1)
    squares: dict[int, int] = {}
    while len(squares) < sent:
        for n, sq in results.get_many(64, timeout=30):
            squares[n] = sq
    for p in procs:
        p.join(30)

    name = f"sample-{uuid.uuid4().hex[:8]}"
    with fastmq.Queue[str].create(name, maxsize=8) as named:
        other: fastmq.Queue[str] = fastmq.Queue.open(name)
        other.put("hello")
        greeting: str = named.get(timeout=5)
        other.close()
        fastmq.Queue.unlink(name)
    try:
        results.get_nowait()
    except fastmq.Empty:
        pass
    ready: list[fastmq.Queue[int]] = fastmq.wait([jobs], timeout=0)

    raw: fastmq.Queue[bytes] = fastmq.Queue()
    with raw.reserve(5) as buf:
        buf[:] = b"bytes"
    with raw.recv(timeout=5) as msg:
        first: bytes = bytes(msg.data)
    raw.put_bytes(b"again")
    second: bytes = raw.get_bytes(timeout=5)
    depth: int = raw.qsize()
    stats = raw.stats()
    print(f"{sum(squares.values())} {greeting} {first!r} {second!r} {depth} "
          f"{stats['enqueued']} backend={fastmq.backend} {fastmq.__version__} "
          f"{os.getpid() > 0} {len(ready)}")
    for q in (jobs, results, raw):
        q.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
