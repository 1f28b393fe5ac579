"""Child-process entry points for the behaviour tests.

They live in an importable module (not in a test file) so that spawn and
forkserver children can find them.  Every blocking call has a timeout so a
lost message turns into an error report instead of a hung child.
"""
from __future__ import annotations

import os
import pickle
import random
import struct
import sys
import time
import traceback
import zlib

HDR = struct.Struct("<IIII")  # producer, seq, payload length, crc32
STOP = b"STOP"                 # shorter than HDR: cannot be a data message
CHILD_TIMEOUT = 60.0

SIZES = {
    "tiny": (0, 32),
    "medium": (4096, 4096),
    "large": (200_000, 600_000),
    "mixed": None,
}
MIXED = [0, 1, 16, 100, 1000, 4096, 20_000, 60_000, 150_000, 250_000]


def pick_size(rng, spec, max_size=None):
    if spec == "mixed":
        s = rng.choice(MIXED)
    else:
        lo, hi = SIZES[spec]
        s = rng.randint(lo, hi)
    if max_size is not None:
        s = min(s, max_size - HDR.size)
    return s


def make_bytes_msg(pid, seq, size):
    payload = os.urandom(size)
    return HDR.pack(pid, seq, size, zlib.crc32(payload)) + payload


def make_obj_msg(pid, seq, size):
    payload = os.urandom(size)
    return {"p": pid, "s": seq, "data": payload, "crc": zlib.crc32(payload),
            "meta": (seq, str(seq), [pid, seq * 2], {"f": seq / 3})}


def check_bytes_msg(m):
    m = bytes(m)
    pid, seq, size, crc = HDR.unpack_from(m)
    payload = m[HDR.size:]
    if len(payload) != size:
        raise AssertionError(f"length mismatch p{pid} s{seq}: {len(payload)} != {size}")
    if zlib.crc32(payload) != crc:
        raise AssertionError(f"checksum mismatch p{pid} s{seq} ({size} bytes)")
    return pid, seq


def check_obj_msg(m):
    pid, seq = m["p"], m["s"]
    if zlib.crc32(m["data"]) != m["crc"]:
        raise AssertionError(f"checksum mismatch p{pid} s{seq}")
    if m["meta"] != (seq, str(seq), [pid, seq * 2], {"f": seq / 3}):
        raise AssertionError(f"object mismatch p{pid} s{seq}: {m['meta']!r}")
    return pid, seq


def _report(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def producer(q, pid, n, spec, kind, batch, max_size, seed):
    """Send n messages numbered 0..n-1 (in order) from producer ``pid``."""
    rng = random.Random(seed)
    make = make_bytes_msg if kind == "bytes" else make_obj_msg
    seq = 0
    while seq < n:
        if batch > 1:
            k = min(batch, n - seq)
            items = [make(pid, seq + i, pick_size(rng, spec, max_size)) for i in range(k)]
            # put_many pickles objects; raw bytes go through put_bytes one by one
            # is tested elsewhere, so batches of bytes are pickled bytes objects too.
            sent = q.put_many(items, timeout=CHILD_TIMEOUT)
            if sent != k:
                raise AssertionError(f"put_many returned {sent}, expected {k}")
            seq += k
        else:
            m = make(pid, seq, pick_size(rng, spec, max_size))
            if kind == "bytes":
                q.put_bytes(m, timeout=CHILD_TIMEOUT)
            else:
                q.put(m, timeout=CHILD_TIMEOUT)
            seq += 1
    q.close()


def consumer(q, cid, kind, batch, result_path):
    """Receive until a STOP sentinel; report [(producer, seq), ...] in arrival order."""
    got = []
    try:
        check = check_bytes_msg if kind == "bytes" else check_obj_msg
        done = False
        while not done:
            if batch > 1:
                items = q.get_many(batch, timeout=CHILD_TIMEOUT)
            else:
                items = [q.get_bytes(timeout=CHILD_TIMEOUT) if kind == "bytes"
                         else q.get(timeout=CHILD_TIMEOUT)]
            for m in items:
                if (kind == "bytes" and bytes(m) == STOP) or (kind != "bytes" and m is None):
                    if done:
                        # get_many took another consumer's sentinel too: give it back
                        q.put(m, timeout=CHILD_TIMEOUT)
                    done = True
                    continue
                if done:
                    raise AssertionError("data message after STOP: sentinels are sent last")
                got.append(check(m))
        _report(result_path, {"cid": cid, "got": got, "error": None})
    except BaseException:
        _report(result_path, {"cid": cid, "got": got, "error": traceback.format_exc()})
        raise
    finally:
        q.close()


# ---------------------------------------------------------------- handle passing

def echo_child(q, reply, backend_expected):
    """Get one message from q, put it back on reply doubled, plus the backend name."""
    import fastmq
    x = q.get(timeout=CHILD_TIMEOUT)
    reply.put((x, x * 2, getattr(q, "backend", None), fastmq.__name__), timeout=CHILD_TIMEOUT)
    q.close()
    reply.close()


_POOL_Q = None


def pool_init(q):
    global _POOL_Q
    _POOL_Q = q


def pool_task(x):
    _POOL_Q.put(("from-pool", x, os.getpid()), timeout=CHILD_TIMEOUT)
    return x * 3


def through_queue_child(outer, backend_expected):
    """Receive (queue, reply) handles through ``outer``, then use them."""
    inner, reply = outer.get(timeout=CHILD_TIMEOUT)
    msg = inner.get(timeout=CHILD_TIMEOUT)
    reply.put(("ack", msg), timeout=CHILD_TIMEOUT)
    inner.close()
    reply.close()
    outer.close()


def relay(dst, src):
    """Move one message from src to dst."""
    dst.put(src.get(timeout=CHILD_TIMEOUT), timeout=CHILD_TIMEOUT)


def hold_and_wait(q, ready, release):
    """Hold a handle until told to go (used by leftover/cleanup tests)."""
    q.put_bytes(b"child-was-here", timeout=CHILD_TIMEOUT)
    ready.set()
    release.wait(CHILD_TIMEOUT)
    q.close()


def blocked_get_cpu(q, timeout, result_path):
    """Block in get() for ``timeout`` seconds; report the CPU seconds it used."""
    import fastmq
    t0 = os.times()
    w0 = time.monotonic()
    outcome = None
    try:
        q.get(timeout=timeout)
        outcome = "got"
    except fastmq.Empty:
        outcome = "empty"
    t1 = os.times()
    _report(result_path, {"cpu": (t1.user - t0.user) + (t1.system - t0.system),
                          "wall": time.monotonic() - w0, "outcome": outcome})


if __name__ == "__main__":  # pragma: no cover
    sys.exit("not a script")


# ---------------------------------------------------------------- zero-copy

def zc_producer(q, pid, n, use_reserve):
    """Send n arrays; array k of producer p is filled with a known pattern."""
    import numpy as np
    for k in range(n):
        length = 1000 + (k * 7919) % 60000
        if use_reserve and k % 2 == 0:
            arr = q.reserve_array((length,), np.uint32)
            arr[:] = np.arange(length, dtype=np.uint32) * 3 + pid * 1_000_000 + k
            q.commit(arr)
        else:
            q.put(np.arange(length, dtype=np.uint32) * 3 + pid * 1_000_000 + k,
                  timeout=CHILD_TIMEOUT)
    q.close()


def _zc_expected(pid, k, length):
    import numpy as np
    return np.arange(length, dtype=np.uint32) * 3 + pid * 1_000_000 + k


def zc_consumer(q, result_path, hold):
    """Receive arrays zero-copy until None; keep the last ``hold`` of them
    alive and re-verify every held one after each receive."""
    import collections
    import numpy as np
    held = collections.deque()
    got, error = [], None
    try:
        while True:
            arr = q.get(timeout=CHILD_TIMEOUT, zero_copy=True)
            if arr is None:
                break
            first = int(arr[0])
            pid, k = divmod(first, 1_000_000)
            if not np.array_equal(arr, _zc_expected(pid, k, arr.shape[0])):
                raise AssertionError(f"array p{pid} k{k} arrived wrong")
            got.append((pid, k))
            held.append((pid, k, arr))
            if len(held) > hold:
                held.popleft()
            for hp, hk, ha in held:
                if not np.array_equal(ha, _zc_expected(hp, hk, ha.shape[0])):
                    raise AssertionError(f"held array p{hp} k{hk} changed under us")
    except BaseException:
        error = traceback.format_exc()
    _report(result_path, {"got": got, "error": error})
    q.close()
