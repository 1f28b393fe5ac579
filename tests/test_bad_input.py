"""Bad input never crashes the interpreter: a typed exception, never a segfault."""
from __future__ import annotations

import os
import queue
import random

import pytest

import fastmq
from conftest import Shm, run_python, unique_name

BAD_NAMES = ["", "a" * 201, "a/b", "/abs", "..", "../etc", "a/../b", ".hidden", ".",
             "a\x00b", "with space", "tab\t", "new\nline", "ü", "a*b", "a:b", "a\\b"]
GOOD_NAMES = ["a", "A-z_0.9", "x" * 200, "name.with.dots", "-dash", "_under"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_invalid_names_are_value_errors(mq, name):
    with pytest.raises(ValueError):
        mq.create(name)
    with pytest.raises(ValueError):
        mq.open(name)
    with pytest.raises(ValueError):
        mq.unlink(name)


def test_invalid_name_never_touches_the_file_system(mq, tmp_path):
    for name in BAD_NAMES:
        with pytest.raises(ValueError):
            mq.create(name)
    for name in BAD_NAMES:
        if "\x00" in name:
            continue
        for path in (f"/dev/shm/fastmq-q-{name}", f"/dev/shm/{name}"):
            if os.path.normpath(path) in ("/dev/shm", "/dev"):
                continue
            assert not os.path.lexists(path) or os.path.isdir(path), path
    assert not os.path.exists("/dev/etc")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_valid_names(mq, name):
    name = name if len(name) == 200 else name + "-" + unique_name("n")[-10:]
    name = name[:200]
    q = mq.create(name)
    q.put_bytes(b"ok")
    assert mq.open(name).get_bytes(timeout=5) == b"ok"


@pytest.mark.parametrize("name", [None, 123, b"bytes-name", ["x"]], ids=repr)
def test_name_of_wrong_type(mq, name):
    with pytest.raises(TypeError):
        mq.create(name)
    with pytest.raises(TypeError):
        mq.open(name)


@pytest.mark.parametrize("bad", ["text", 123, 1.5, object(), None, [1, 2]], ids=lambda v: type(v).__name__)
def test_put_bytes_wrong_type(mq, bad):
    q = mq.Queue()
    with pytest.raises(TypeError):
        q.put_bytes(bad)
    assert q.qsize() == 0


def test_put_bytes_accepts_buffers(mq):
    import array
    q = mq.Queue()
    q.put_bytes(bytearray(b"ba"))
    q.put_bytes(memoryview(b"xmvx")[1:3])
    q.put_bytes(array.array("i", [1, 2]))
    assert q.get_bytes(timeout=5) == b"ba"
    assert q.get_bytes(timeout=5) == b"mv"
    assert q.get_bytes(timeout=5) == array.array("i", [1, 2]).tobytes()


@pytest.mark.parametrize("kw", [{"maxsize": "3"}, {"maxsize": 2.5}, {"max_message_size": "big"},
                                {"capacity_bytes": "lots"}, {"maxsize": None}], ids=repr)
def test_constructor_wrong_types(mq, kw):
    with pytest.raises(TypeError):
        mq.Queue(**kw)


def test_timeout_wrong_type(mq):
    q = mq.Queue()
    with pytest.raises(TypeError):
        q.get(timeout="1")
    with pytest.raises(TypeError):
        q.put(1, timeout="1")
    assert q.qsize() == 0


def test_unpicklable_object_leaves_queue_unchanged(mq):
    q = mq.Queue()
    with pytest.raises(Exception):
        q.put(lambda: None)
    assert q.qsize() == 0
    with pytest.raises(fastmq.Empty):
        q.get_nowait()


# ------------------------------------------------------------------ sizes

def test_oversize_put_bytes_writes_nothing(mq):
    q = mq.Queue(max_message_size=1024)
    before = q.stats()
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_bytes(b"x" * 1025)
    with pytest.raises(ValueError):  # MessageTooLarge is a ValueError
        q.put_bytes(b"x" * 5000, block=False)
    after = q.stats()
    assert q.qsize() == 0
    assert after["enqueued"] == before["enqueued"]
    assert after["bytes_in_use"] == before["bytes_in_use"]
    with pytest.raises(fastmq.Empty):
        q.get_bytes(block=False)
    q.put_bytes(b"y" * 1024)  # exactly max_message_size fits
    assert q.get_bytes(timeout=5) == b"y" * 1024


def test_oversize_pickled_object_writes_nothing(mq):
    q = mq.Queue(max_message_size=1024)
    with pytest.raises(fastmq.MessageTooLarge):
        q.put(b"z" * 2000)
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_nowait(list(range(1000)))
    assert q.qsize() == 0
    assert q.stats()["enqueued"] == 0


def test_oversize_in_put_many_writes_nothing(mq):
    q = mq.Queue(max_message_size=1024)
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_many([b"a", b"b", b"c" * 5000, b"d"])
    assert q.qsize() == 0, "put_many must check every item before writing any"
    with pytest.raises(fastmq.Empty):
        q.get_nowait()


def test_oversize_reserve(mq):
    q = mq.Queue(max_message_size=1024)
    with pytest.raises(fastmq.MessageTooLarge):
        q.reserve(1025)
    assert q.qsize() == 0


def test_oversize_on_full_queue_is_message_too_large_not_full(mq):
    q = mq.Queue(maxsize=1, max_message_size=100)
    q.put_bytes(b"a")
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_bytes(b"b" * 101, block=False)
    assert q.get_bytes(timeout=5) == b"a"


@pytest.mark.parametrize("kw", [{"maxsize": 10 ** 15}, {"max_message_size": 2 ** 60},
                                {"capacity_bytes": 2 ** 60}, {"max_message_size": -1},
                                {"capacity_bytes": -5}, {"maxsize": 2 ** 63}], ids=repr)
def test_absurd_sizes_are_value_errors(mq, kw):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError):
        mq.Queue(**kw)
    with pytest.raises(ValueError):
        mq.create(unique_name("absurd"), **kw)
    assert not [n for n in set(os.listdir("/dev/shm")) - before if "absurd" in n]


def test_defaults_serve_a_drop_in_user(mq):
    """API: Queue() carries single messages of at least 1 MiB and holds a
    backlog of at least 1,000 small messages."""
    q = mq.Queue()
    big = os.urandom(1 << 20)
    q.put_bytes(big)
    assert q.get_bytes(timeout=10) == big
    q.put(big)
    assert q.get(timeout=10) == big
    for i in range(1000):
        q.put_nowait(i)
    assert q.qsize() == 1000
    assert q.get_many(1000, timeout=5) == list(range(1000))


def test_maxsize_counts_messages_exactly(mq):
    q = mq.Queue(maxsize=5)
    for i in range(5):
        q.put_nowait(i)
    assert q.full()
    with pytest.raises(fastmq.Full):
        q.put_nowait(5)
    assert q.stats()["capacity"] == 5


# ------------------------------------------------------------ exists / not found

def test_queue_exists(mq, qname):
    q = mq.create(qname, maxsize=4)
    with pytest.raises(fastmq.QueueExists):
        mq.create(qname)
    with pytest.raises(FileExistsError):
        mq.create(qname, maxsize=99)
    q.put("shared")
    q2 = mq.create(qname, maxsize=99, exist_ok=True)  # opens; the existing geometry wins
    assert q2.get(timeout=5) == "shared"
    assert q2.stats()["capacity"] == 4


def test_queue_not_found(mq):
    name = unique_name("missing")
    with pytest.raises(fastmq.QueueNotFound):
        mq.open(name)
    with pytest.raises(FileNotFoundError):
        mq.open(name)
    assert not os.path.exists(Shm.path(f"fastmq-q-{name}"))


# ------------------------------------------------------------ corrupt segments

OPEN_CHILD = r"""
import sys, fastmq
try:
    q = fastmq.Queue.open(sys.argv[1], _backend=sys.argv[2])
    try:
        q.put_bytes(b"probe", timeout=1)
        q.get_bytes(timeout=1)
    finally:
        q.close()
    print("EXC none")
except BaseException as e:
    print("EXC", type(e).__name__, "|", e)
"""


def _make_segment(mq, name):
    q = mq.create(name, maxsize=8)
    q.put_bytes(b"hello" * 10)
    q.put({"x": 1})
    q.close()
    return Shm.segment_of_named(name)


def _open_in_subprocess(name, backend):
    import subprocess
    import sys
    import textwrap
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(OPEN_CHILD), name, backend],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode >= 0, (
        f"the opener died from signal {-proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("EXC")][-1]
    return line


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _xor(path, offset, n):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


CORRUPTIONS = {
    "flipped-magic": lambda p: _xor(p, 0, 8),
    "flipped-first-byte": lambda p: _xor(p, 0, 1),
    "random-header-64": lambda p: _patch(p, 0, random.Random(1).randbytes(64)),
    "random-header-64-seed2": lambda p: _patch(p, 0, random.Random(2).randbytes(64)),
    "zeroed-header-64": lambda p: _patch(p, 0, bytes(64)),
    "ones-after-magic": lambda p: _patch(p, 8, b"\xff" * 56),
    "version-word-flipped": lambda p: _xor(p, 8, 8),
    "random-after-magic": lambda p: _patch(p, 8, random.Random(3).randbytes(56)),
    # the native header is magic[8], u32 abi_version, u32 layout_hash, geometry...
    "abi-version-plus-one": lambda p: _add_u32(p, 8, 1),
    "layout-hash-plus-one": lambda p: _add_u32(p, 12, 1),
}


def _add_u32(path, offset, delta):
    import struct
    with open(path, "r+b") as f:
        f.seek(offset)
        (v,) = struct.unpack("<I", f.read(4))
        f.seek(offset)
        f.write(struct.pack("<I", (v + delta) & 0xFFFFFFFF))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_segment_is_corrupt_queue(mq, qname, backend, how):
    path = _make_segment(mq, qname)
    CORRUPTIONS[how](path)
    line = _open_in_subprocess(qname, backend)
    assert line.startswith("EXC CorruptQueue"), line


TRUNCATIONS = {
    "empty": lambda size: 0,
    "4-bytes": lambda size: 4,
    "16-bytes": lambda size: 16,
    "64-bytes": lambda size: 64,
    "half": lambda size: size // 2,
    "minus-one-page": lambda size: size - 4096,
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", sorted(TRUNCATIONS))
def test_truncated_segment_is_corrupt_queue(mq, qname, backend, how):
    path = _make_segment(mq, qname)
    size = os.path.getsize(path)
    new = TRUNCATIONS[how](size)
    assert 0 <= new < size
    os.truncate(path, new)
    line = _open_in_subprocess(qname, backend)
    assert line.startswith("EXC CorruptQueue"), line


@pytest.mark.timeout(90)
def test_foreign_file_is_corrupt_queue(backend, qname):
    """A file under the queue's segment name that fastmq never wrote."""
    path = Shm.path(f"fastmq-q-{qname}")
    with open(path, "wb") as f:
        f.write(b"#!/bin/sh\necho not a queue\n" + bytes(70000))
    try:
        line = _open_in_subprocess(qname, backend)
        assert line.startswith("EXC CorruptQueue"), line
    finally:
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.timeout(90)
def test_corrupt_open_does_not_break_other_queues(mq, qname, backend):
    """After a CorruptQueue, the process still works with good queues."""
    path = _make_segment(mq, qname)
    _xor(path, 0, 8)
    code = f"""
        import fastmq
        try:
            fastmq.Queue.open({qname!r}, _backend={backend!r})
        except fastmq.CorruptQueue as e:
            assert str(e), "CorruptQueue needs a message"
            print("corrupt ok")
        q = fastmq.Queue(_backend={backend!r})
        q.put("fine")
        assert q.get(timeout=5) == "fine"
        print("still fine")
    """
    res = run_python(code, timeout=60)
    assert "corrupt ok" in res.stdout and "still fine" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------ corrupt bodies

USE_CHILD = r"""
import sys, fastmq
results = []
try:
    q = fastmq.Queue.open(sys.argv[1], _backend=sys.argv[2])
except BaseException as e:
    print("OPEN", type(e).__name__, flush=True)
    sys.exit(0)
print("OPEN ok", flush=True)
for name, call in [("get", lambda: q.get_bytes(timeout=0.5)),
                   ("get2", lambda: q.get_bytes(timeout=0.5)),
                   ("put", lambda: q.put_bytes(b"x" * 3000, timeout=0.5)),
                   ("put_small", lambda: q.put_bytes(b"y", timeout=0.5)),
                   ("get_many", lambda: q.get_many(5, timeout=0.5)),
                   ("recv", lambda: q.recv(timeout=0.5).close()),
                   ("qsize", q.qsize), ("stats", q.stats)]:
    try:
        call()
        print(name, "ok", flush=True)
    except BaseException as e:
        print(name, type(e).__name__, flush=True)
q.close()
print("DONE", flush=True)
"""


def _scribble_body(path, seed, start, length):
    size = os.path.getsize(path)
    start = min(start, size)
    n = max(0, min(length, size - start))
    _patch(path, start, random.Random(seed).randbytes(n))


BODY_CORRUPTIONS = {
    "page1-random": lambda p: _scribble_body(p, 11, 4096, 4096),
    "control-and-slots-random": lambda p: _scribble_body(p, 12, 4096, 64 * 1024),
    "everything-after-header": lambda p: _scribble_body(p, 13, 4096, 1 << 30),
    "ones-after-header": lambda p: _patch(p, 4096, b"\xff" * (os.path.getsize(p) - 4096)),
    "header-tail-random": lambda p: _scribble_body(p, 14, 64, 4096 - 64),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", sorted(BODY_CORRUPTIONS))
def test_corrupted_body_never_kills_the_process(mq, qname, backend, how):
    """Scribbles beyond the validated header: every call either works or raises
    a Python exception; the process never dies from a signal or hangs."""
    q = mq.create(qname, maxsize=8, max_message_size=64 * 1024, capacity_bytes=1 << 20)
    q.put_bytes(b"small")
    q.put_bytes(b"L" * 20000)
    q.close()
    path = Shm.segment_of_named(qname)
    BODY_CORRUPTIONS[how](path)
    import subprocess
    import sys
    import textwrap
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(USE_CHILD), qname, backend],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode >= 0, (
        f"died from signal {-proc.returncode}:\n{proc.stdout}\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DONE" in proc.stdout or proc.stdout.startswith("OPEN "), proc.stdout
    if proc.stdout.startswith("OPEN ") and "OPEN ok" not in proc.stdout:
        assert "CorruptQueue" in proc.stdout, proc.stdout


SCRIBBLE_WHILE_OPEN = r"""
import os, sys, random, fastmq
q = fastmq.Queue.open(sys.argv[1], _backend=sys.argv[2])
path = sys.argv[3]
q.put_bytes(b"before")
with open(path, "r+b") as f:   # someone scribbles over the header meanwhile
    f.write(random.Random(5).randbytes(4096))
out = []
for call in (lambda: q.get_bytes(timeout=0.5), lambda: q.put_bytes(b"after", timeout=0.5),
             lambda: q.get_bytes(timeout=0.5), q.qsize, q.stats):
    try:
        call()
        out.append("ok")
    except BaseException as e:
        out.append(type(e).__name__)
q.close()
print("DONE", out, flush=True)
"""


@pytest.mark.timeout(60)
def test_header_scribbled_while_open_never_kills_the_process(mq, qname, backend):
    mq.create(qname, maxsize=8).close()
    path = Shm.segment_of_named(qname)
    import subprocess
    import sys
    import textwrap
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIBBLE_WHILE_OPEN),
                           qname, backend, path], capture_output=True, text=True, timeout=50)
    assert proc.returncode >= 0, f"died from signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert "DONE" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_put_bytes_odd_buffers_are_exact_or_refused(mq):
    """Non-contiguous or multi-dimensional buffers: the bytes that arrive are
    exactly the buffer's logical bytes, or the call is refused with a clear
    error and nothing is queued -- never wrong or partial bytes."""
    np = pytest.importorskip("numpy")
    q = mq.Queue()
    cases = [memoryview(b"abcdefgh")[::2], memoryview(b"abcdefgh")[::-1],
             np.arange(12, dtype=np.int32).reshape(3, 4),
             np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],
             np.arange(12, dtype=np.int32).reshape(3, 4).T,
             memoryview(np.arange(6, dtype=np.float64)).cast("B")]
    for buf in cases:
        expect = buf.tobytes()
        try:
            q.put_bytes(buf)
        except (TypeError, ValueError, BufferError):
            assert q.qsize() == 0
            continue
        assert q.get_bytes(timeout=5) == expect, repr(buf)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.parametrize("at", [0, 1, 2])
def test_put_many_bytes_with_one_oversize_item_sends_nothing(mq, kind, at):
    """A batch is size-checked whole before anything is written: one item over
    max_message_size (first, middle or last; bytes or another buffer) raises
    MessageTooLarge and the queue stays empty."""
    q = mq.Queue(maxsize=16, max_message_size=100)
    items = [kind(b"a" * 10), kind(b"b" * 100), kind(b"c" * 10)]
    items.insert(at, kind(b"x" * 101))
    with pytest.raises(fastmq.MessageTooLarge, match="max_message_size"):
        q.put_many_bytes(items, timeout=1)
    assert q.qsize() == 0
    with pytest.raises(queue.Empty):
        q.get_bytes(timeout=0.05)
    assert q.put_many_bytes(items[:at] + items[at + 1:], timeout=1) == 3
    assert q.get_many_bytes(10, timeout=1) == [b"a" * 10, b"b" * 100, b"c" * 10]
