"""A live scribbler: a helper process overwrites random control words of a
live segment while a producer and consumers run, for a bounded time.

What must hold however the words are damaged: no process dies by a signal
(segfault, SIGBUS), nothing hangs (every child finishes within its bound),
only fastmq's typed exceptions surface, and no torn message is delivered --
every payload carries its own length and checksum, and each one received
must verify. A ``CorruptQueue``, a lost or a repeated message are acceptable
outcomes of the damage; a wrong byte handed to the application is not.

The scribbler writes the words that order the queue -- slot words, the
head/tail hints, in-flight entry words and deadlines, block state words, the
free-stack tops and the wait words -- at the offsets the segment's header
gives (``csrc/fmq_layout.h``). It leaves message lengths, block references
and payload bytes alone: a plausible but wrong length cannot be told from a
right one without a checksum of the payload, which the queue does not keep
(the targeted tests in ``test_promises_core.py`` cover lengths that fail
validation). NATIVE ONLY: the pure backend's file has another layout.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastmq
from conftest import native_only

DURATION = float(os.environ.get("FASTMQ_SCRIBBLE_SECONDS", "6"))

_COMMON = """
import os, random, struct, sys, time, zlib
import fastmq
NAME, BACKEND, DURATION, SEED = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(SEED)
TYPED = (fastmq.Error, fastmq.Full, fastmq.Empty, ValueError)
end = time.monotonic() + DURATION

def pack(seq, size):
    body = rng.randbytes(size)
    return struct.pack("<QI", seq, zlib.crc32(body)) + body

def verify(data):
    data = bytes(data)
    if len(data) < 12:
        return False
    seq, crc = struct.unpack_from("<QI", data)
    return zlib.crc32(data[12:]) == crc
"""

_PRODUCER = _COMMON + """
q = fastmq.Queue.open(NAME, _backend=BACKEND)
sent = errors = 0
kinds = {}
while time.monotonic() < end:
    size = rng.choice([4, 100, 200, 3000, 20000])
    try:
        q.put_bytes(pack(sent, size), timeout=0.05)
        sent += 1
    except TYPED as exc:
        errors += 1
        kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
q.close()
print("sent", sent, "errors", errors, kinds, flush=True)
"""

_CONSUMER = _COMMON + """
q = fastmq.Queue.open(NAME, _backend=BACKEND)
mode = sys.argv[5]
got = torn = errors = 0
while time.monotonic() < end:
    try:
        if mode == "get":
            items = [q.get_bytes(timeout=0.05)]
        elif mode == "many":
            items = q._ring.get_many(8, 0.05, None)
        else:
            msgs = q.get_messages(8, timeout=0.05, lease=0.5)
            items = [bytes(m.data) for m in msgs]
            for m in msgs:
                try:
                    m.ack()
                except TYPED:
                    errors += 1
    except fastmq.Empty:
        continue
    except TYPED:
        errors += 1
        continue
    for data in items:
        got += 1
        if not verify(data):
            torn += 1
            print("TORN", len(data), bytes(data[:16]).hex(), flush=True)
q.close()
print("got", got, "torn", torn, "errors", errors, flush=True)
"""

_SCRIBBLER = _COMMON + """
import mmap
fd = os.open("/dev/shm/" + sys.argv[5], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size)
(slots, stride, ncls, _mms, _cap, nparts, _md, ctl, parts, ring, lease) = \\
    struct.unpack_from("<QIIQQIIQQQQ", m, 32)
classes = [struct.unpack_from("<QQQQ", m, 112 + 32 * c) for c in range(ncls)]
targets = []
targets += [ctl + 0, ctl + 128, ctl + 256, ctl + 384]            # tail, head, data, space
targets += [ctl + 512 + 128 * c for c in range(ncls)]            # free-stack tops
targets += [ring + i * stride for i in range(slots)]             # slot words
targets += [lease + i * (stride + 64) + k for i in range(slots) for k in (0, 8, 48)]
for size, nblocks, meta, data in classes:                        # block state words
    targets += [meta + 16 * b for b in range(min(nblocks, 64))]
flips = 0
while time.monotonic() < end:
    off = rng.choice(targets)
    old = struct.unpack_from("<Q", m, off)[0]
    how = rng.random()
    if how < 0.5:
        new = old ^ (1 << rng.randrange(64))
    elif how < 0.8:
        new = (old + rng.choice([-8, -4, -1, 1, 2, 4, 8, 64])) % 2 ** 64
    else:
        new = rng.getrandbits(64)
    struct.pack_into("<Q", m, off, new)
    flips += 1
    time.sleep(rng.uniform(0.001, 0.01))
print("flips", flips, flush=True)
"""


def _start(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_live_scribbler_never_crashes_hangs_or_tears_a_delivery(mq, backend, qname, seed):
    native_only(backend, "writes into the native segment's control words")
    q = mq.create(qname, maxsize=32, max_message_size=32768, capacity_bytes=1 << 20)
    segment = q._ring.name
    procs = []
    try:
        procs.append(("producer", _start(_PRODUCER, qname, backend, DURATION, seed)))
        for i, mode in enumerate(["get", "many", "lease"]):
            procs.append((f"consumer-{mode}",
                          _start(_CONSUMER, qname, backend, DURATION, seed * 10 + i, mode)))
        procs.append(("scribbler", _start(_SCRIBBLER, qname, backend, DURATION, seed,
                                          segment)))
        bound = time.monotonic() + DURATION + 30
        outs = {}
        for name, p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, bound - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                pytest.fail(f"{name} hung (still running {DURATION + 30:.0f} s after "
                            f"start)\n{out}\n{err}")
            outs[name] = (p.returncode, out, err)
        for name, (rc, out, err) in outs.items():
            assert rc >= 0, (f"{name} died by signal "
                             f"{signal.Signals(-rc).name}\n{out}\n{err[-3000:]}")
            assert rc == 0, f"{name} raised an untyped exception (rc {rc})\n{err[-3000:]}"
            assert "TORN" not in out, f"{name} received a torn message:\n{out}"
        print({n: o[1].strip() for n, o in outs.items()})
        got = sum(int(out.split()[1]) for name, (rc, out, err) in outs.items()
                  if name.startswith("consumer"))
        assert int(outs["scribbler"][1].split()[1]) > 100      # it really scribbled
        assert got > 0                                          # and traffic flowed
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    # A process that opens the damaged queue afterwards gets a handle or a
    # CorruptQueue, never a crash.
    code = textwrap.dedent(f"""
        import fastmq
        try:
            q = fastmq.Queue.open({qname!r}, _backend={backend!r})
            for _ in range(50):
                try:
                    q.get_bytes(timeout=0.01)
                except (fastmq.Empty, fastmq.Error, ValueError):
                    pass
            q.close()
        except fastmq.Error:
            pass
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
