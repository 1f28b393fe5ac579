"""Child processes and image tools for tests/test_durable.py.

Run as ``python _durable_workers.py ROLE ARGS...``: every role is its own
process, so FASTMQ_CRASH_AT / FASTMQ_FLUSH_IMAGES apply to it alone and a
SIGKILL takes exactly it.

Messages are self-describing: ``payload(i)`` is a deterministic function of
the id, so a reader can tell an intact message from a torn or corrupted one
without any other state.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import sys

PAGE = 4096
#: sizes around the inline limit (a slot holds 224 bytes) and well past it
SIZES = (40, 100, 224, 225, 300, 1000, 5000, 20000)


def payload(i: int) -> bytes:
    size = SIZES[(i * 7) % len(SIZES)]
    head = struct.pack("<QI", i, size)
    body = hashlib.blake2b(head, digest_size=64).digest()
    body = (body * (size // len(body) + 1))[:max(0, size - len(head))]
    return head + body


def parse(data) -> int:
    """The id of an intact message; ValueError for anything else."""
    data = bytes(data)
    if len(data) < 12:
        raise ValueError(f"short message {data!r}")
    i, size = struct.unpack_from("<QI", data)
    if size != len(data) or payload(i) != data:
        raise ValueError(f"torn or corrupt message (claims id {i}, {len(data)} bytes)")
    return i


# ------------------------------------------------------------------ roles

def producer(url, name, log, start, count):
    import fastmq
    q = fastmq.Queue.open(name, url=url)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for i in range(int(start), int(start) + int(count)):
        q.put_bytes(payload(i), timeout=30)
        os.write(fd, b"%d\n" % i)         # after put returned: "committed"
    os.write(fd, b"done\n")


def consumer(url, name, log, seed):
    """Leases, records the id (before the ack: a kill between the two leaves
    an id recorded that may come back, never one missing), then acks; some
    messages are nacked back. Anything torn is recorded as BAD."""
    import fastmq
    q = fastmq.Queue.open(name, url=url)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    rng = random.Random(int(seed))
    while True:
        try:
            m = q.get_message(timeout=0.2, lease=60)
        except fastmq.Empty:
            continue
        try:
            i = parse(m.data)
        except ValueError as exc:
            os.write(fd, f"BAD {exc}\n".encode())
            m.ack()
            continue
        if rng.random() < 0.1:
            m.nack()
            continue
        os.write(fd, b"%d\n" % i)
        m.ack()


# ------------------------------------------------------------------ images

def data_pages(path):
    """{page index: bytes} of the pages of a (sparse) file that hold data."""
    pages = {}
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        at = 0
        while at < size:
            try:
                d = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            d0 = d // PAGE * PAGE
            os.lseek(fd, d0, os.SEEK_SET)
            blob = os.read(fd, h - d0)
            for k in range(0, len(blob), PAGE):
                chunk = blob[k:k + PAGE]
                if chunk.count(0) != len(chunk):
                    pages[(d0 + k) // PAGE] = chunk.ljust(PAGE, b"\0")
            at = h
    return pages, size


def write_image(path, size, pages):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for idx in sorted(pages):
            os.pwrite(fd, pages[idx], idx * PAGE)
    finally:
        os.close(fd)


def drain(url, name):
    """Open (the first opener: a rebuild) and take everything; returns
    (ids in delivery order, bad messages, the recovery figures)."""
    import fastmq
    q = fastmq.Queue.open(name, url=url)
    try:
        st = q.stats()
        ids, bad, empties = [], [], 0
        while empties < 3:
            try:
                data = q.get_bytes(timeout=0.05)
            except fastmq.Empty:
                empties += 1
                continue
            empties = 0
            try:
                ids.append(parse(data))
            except ValueError as exc:
                bad.append(str(exc))
        left = len(q.pending())
        return ids, bad, {"kept": st["recovered_kept"], "dropped": st["recovered_dropped"],
                          "pending_left": left}
    finally:
        q.close()


def check_images(spec_path):
    """Build each power-loss image described in the spec, recover it, drain
    it; print one JSON line of results. Spec: {"current": path, "flushed":
    path, "name": queue name, "workdir": dir, "subsets": [[page, ...], ...]}
    -- each subset lists the pages reverted to their content in "flushed"."""
    with open(spec_path) as f:
        spec = json.load(f)
    cur, size = data_pages(spec["current"])
    old, _ = data_pages(spec["flushed"])
    name, work = spec["name"], spec["workdir"]
    results = []
    for n, subset in enumerate(spec["subsets"]):
        d = os.path.join(work, f"img{n}")
        os.makedirs(d, exist_ok=True)
        pages = dict(cur)
        for p in subset:
            if p in old:
                pages[p] = old[p]
            else:
                pages.pop(p, None)        # a hole at the flush: zeros
        path = os.path.join(d, name + ".fmq")
        write_image(path, size, pages)
        try:
            ids, bad, fig = drain("file://" + d, name)
            results.append({"ids": ids, "bad": bad, **fig})
        except Exception as exc:          # CorruptQueue etc.: recorded, judged by the test
            results.append({"error": f"{type(exc).__name__}: {exc}"})
        for leftover in os.listdir(d):
            os.unlink(os.path.join(d, leftover))
        os.rmdir(d)
    print(json.dumps(results))


def check_one(url, name):
    ids, bad, fig = drain(url, name)
    print(json.dumps({"ids": ids, "bad": bad, **fig}))


if __name__ == "__main__":
    role = sys.argv[1]
    {"producer": producer, "consumer": consumer,
     "check_images": check_images, "check_one": check_one}[role](*sys.argv[2:])
