"""The zero-copy path: recv, reserve/commit and zero-copy arrays.

The pure backend emulates zero-copy with private copies (it cannot pin shared
memory), so every assertion about *values* and about the API's errors holds on
both backends.  Only assertions about shared-memory *accounting* while a view is
held (fewer large messages fit while a view pins its block, as many as before
once the last view goes) are native-only, via ``native_only()``: a copying
backend frees its block at receive time.

Pool accounting is observed through ``fill_count`` (how many messages of a
size fit with ``block=False``), not ``stats()["bytes_in_use"]``: the native
core counts only *queued* bytes there, so it cannot show a pinned block.
"""
from __future__ import annotations

import gc
import os
import threading
import time
import weakref
import zlib

import pytest

import fastmq
from conftest import native_only, pool_room, run_python

np = pytest.importorskip("numpy")  # the numpy-less behaviour is tested in a subprocess

KiB, MiB = 1024, 1024 * 1024

POOL = {"maxsize": 64, "max_message_size": 1 * MiB, "capacity_bytes": 4 * MiB}
BIG = 200 * KiB


def fill_count(q, size=BIG, limit=200):
    return pool_room(q, size, limit)


def pattern(n, seed):
    """n deterministic bytes depending on seed (fast for big n)."""
    if n == 0:
        return b""
    base = np.arange(n, dtype=np.uint32) * 2654435761 + seed * 40503
    return (base >> 13).astype(np.uint8).tobytes()


# ------------------------------------------------------------------ reserve

def test_reserve_commit(mq):
    q = mq.Queue()
    with q.reserve(10) as buf:
        assert isinstance(buf, memoryview)
        assert not buf.readonly
        assert buf.nbytes == 10
        buf[:] = b"0123456789"
    assert q.qsize() == 1
    assert q.get_bytes(timeout=5) == b"0123456789"


def test_reserve_large_commit(mq):
    q = mq.Queue(max_message_size=2 * MiB)
    data = pattern(2 * MiB, 7)
    with q.reserve(len(data), timeout=5) as buf:
        buf[:] = data
    assert q.get_bytes(timeout=5) == data


@pytest.mark.parametrize("size", [10, 100 * KiB])
def test_reserve_aborts_on_exception(mq, size):
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    base = q.stats()
    with pytest.raises(RuntimeError, match="inside"):
        with q.reserve(size) as buf:
            buf[:5] = b"abcde"
            raise RuntimeError("inside")
    assert q.qsize() == 0
    with pytest.raises(fastmq.Empty):
        q.get_bytes(block=False)
    st = q.stats()
    assert st["enqueued"] == base["enqueued"]
    del buf  # our own reference to the view (a live view may keep the block pinned)
    gc.collect()
    assert fill_count(q) == n0, "the aborted space was not given back"
    # the queue is fully usable afterwards
    q.put_bytes(b"next")
    assert q.get_bytes(timeout=5) == b"next"


def test_reserve_abort_frees_room(mq):
    """An aborted reservation gives its slot back: a maxsize=1 queue accepts
    a message afterwards."""
    q = mq.Queue(maxsize=1)
    for _ in range(5):
        with pytest.raises(KeyError):
            with q.reserve(100):
                raise KeyError
    q.put_bytes(b"fits", block=False)
    assert q.get_bytes(block=False) == b"fits"


@pytest.mark.timeout(20)
def test_reserve_on_full_queue_times_out(mq):
    q = mq.Queue(maxsize=1)
    q.put_bytes(b"x")
    with pytest.raises(fastmq.Full):
        with q.reserve(10, timeout=0.1):
            pass
    assert q.get_bytes(timeout=5) == b"x"


def test_reserve_zero_bytes(mq):
    q = mq.Queue()
    with q.reserve(0) as buf:
        assert buf.nbytes == 0
    assert q.get_bytes(timeout=5) == b""


def test_reserve_negative_is_value_error(mq):
    q = mq.Queue()
    with pytest.raises(ValueError):
        q.reserve(-1)


def test_retained_reserve_view_cannot_corrupt_later_messages(mq):
    """A writable view kept after commit must not be able to change a message
    delivered later (released, or pointing at still-pinned private memory)."""
    q = mq.Queue(maxsize=4, max_message_size=64 * KiB, capacity_bytes=1 * MiB)
    with q.reserve(32 * KiB) as buf:
        buf[:] = pattern(32 * KiB, 1)
    kept = buf
    assert q.get_bytes(timeout=5) == pattern(32 * KiB, 1)
    for i in range(200):
        data = pattern(32 * KiB, i + 2)
        q.put_bytes(data)
        try:
            kept[:16] = b"\xee" * 16
        except (ValueError, BufferError, TypeError):
            pass
        assert q.get_bytes(timeout=5) == data, f"message {i} was changed by a stale view"


# ------------------------------------------------------------- reserve_array

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64", "complex64", "complex128", ">i4", "<f8",
          "S5", "U3", [("a", "<i4"), ("b", "<f8")]]
# numpy pickles datetime64/timedelta64 in-band only; put/get must still carry them
DTYPES_PUT = DTYPES + ["datetime64[ns]", "timedelta64[s]"]


def _sample(shape, dtype, seed=0):
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if len(shape) else 1
    raw = np.frombuffer(pattern(n * dt.itemsize, seed), dtype=np.uint8)
    if dt.kind == "b":
        return (raw[:n] & 1).astype(bool).reshape(shape)
    if dt.kind in "fc":
        return (np.arange(n) * 0.5 - 3).astype(dt).reshape(shape)
    if dt.kind in "U":
        return np.array([str(i % 1000) for i in range(n)], dtype=dt).reshape(shape)
    return raw.view(dt).reshape(shape).copy()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reserve_array_commit(mq, dtype):
    q = mq.Queue()
    arr = q.reserve_array((3, 4), dtype)
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (3, 4) and arr.dtype == np.dtype(dtype)
    assert arr.flags.writeable
    expect = _sample((3, 4), dtype, 5)
    arr[...] = expect
    q.commit(arr)
    got = q.get(timeout=5)
    assert isinstance(got, np.ndarray)
    assert got.dtype == expect.dtype and got.shape == expect.shape
    assert got.tobytes() == expect.tobytes()


@pytest.mark.parametrize("shape", [(), (0,), (1,), (1000,), (10, 20, 3), (2, 0, 3)], ids=str)
def test_reserve_array_shapes(mq, shape):
    q = mq.Queue()
    arr = q.reserve_array(shape, np.float64)
    arr[...] = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    q.commit(arr)
    got = q.get(timeout=5)
    assert got.shape == shape
    np.testing.assert_array_equal(got, np.arange(int(np.prod(shape))).reshape(shape))


def test_reserve_array_big_and_zero_copy_get(mq):
    q = mq.Queue(max_message_size=16 * MiB)
    arr = q.reserve_array((1024, 1024), np.float32)
    arr[...] = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)
    q.commit(arr)
    got = q.get(timeout=5, zero_copy=True)
    assert got.shape == (1024, 1024)
    assert got[512, 7] == 512 * 1024 + 7
    assert float(got.sum(dtype=np.float64)) == float(np.arange(1024 * 1024, dtype=np.float64).sum())


def test_commit_of_foreign_array_is_rejected(mq):
    q = mq.Queue()
    with pytest.raises((ValueError, TypeError)):
        q.commit(np.zeros(4))
    assert q.qsize() == 0


def test_commit_twice_is_rejected(mq):
    q = mq.Queue()
    arr = q.reserve_array((4,), np.int32)
    arr[:] = [1, 2, 3, 4]
    q.commit(arr)
    with pytest.raises(ValueError):
        q.commit(arr)
    assert q.qsize() == 1
    np.testing.assert_array_equal(q.get(timeout=5), [1, 2, 3, 4])


def test_reserve_array_oversize(mq):
    q = mq.Queue(max_message_size=1024)
    with pytest.raises(fastmq.MessageTooLarge):
        q.reserve_array((1024,), np.float64)
    assert q.qsize() == 0


FRAME_CASES = [((3, 4), "int32"), ((1000,), "uint8"), ((), "float64"), ((0,), "f8"),
               ((7, 3), ">i4"), ((5,), "S5"), ((2, 2), [("a", "<i4"), ("b", "<f8")])]


@pytest.mark.parametrize("shape,dtype", FRAME_CASES, ids=str)
def test_reserve_array_writes_the_frame_put_writes(mq, shape, dtype):
    """An array committed from reserve_array arrives as the very bytes ``put``
    sends for the same array, padding included, even in memory that held
    other data: nothing of an earlier message shows through. Each shape is
    reserved twice (the second time from what the first one learnt)."""
    q = mq.Queue()
    value = _sample(shape, dtype, 3)
    q.put(value)
    with q.recv(timeout=5) as msg:
        want = bytes(msg.data)
    for _ in range(2):
        with q.reserve(len(want)) as buf:           # junk where the next one goes
            buf[:] = b"\xa5" * len(want)
        assert q.get_bytes(timeout=5)[:1] == b"\xa5"
        arr = q.reserve_array(shape, dtype)
        arr[...] = value
        q.commit(arr)
        with q.recv(timeout=5) as msg:
            assert bytes(msg.data) == want


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.int32).reshape(3, 4), np.arange(6, dtype=">i2"),
    np.zeros((), np.float64), np.zeros((0, 3), np.uint8),
    np.arange(12, dtype=np.int64).reshape(3, 4).T,              # F-ordered
    np.arange(20, dtype=np.float32)[::2],                       # not contiguous
    np.array([1, 2], dtype="datetime64[ns]"),                   # pickled in-band
    np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")])], ids=lambda v: f"{v.dtype}{v.shape}")
def test_put_of_arrays_of_one_kind_sends_what_pickle_frames(mq, value):
    """put() of arrays of one shape and dtype sends, every time, the frame
    that pickling each array makes (``_serialize.encode``): what the first
    one taught the queue never changes what a later one is sent as."""
    from fastmq import _serialize
    q = mq.Queue()
    want = bytes(_serialize.encode(value))
    for _ in range(3):
        q.put(value)
        with q.recv(timeout=5) as msg:
            assert bytes(msg.data) == want
    q.put(value)
    got = q.get(timeout=5)
    assert got.dtype == value.dtype and got.shape == value.shape
    assert got.tobytes() == value.tobytes()


def test_reserve_array_dropped_uncommitted_gives_its_space_back(mq):
    """An array from reserve_array that dies uncommitted gives its space back
    at once (no garbage collection needed): three times as many as fit at
    once are reserved and dropped one after the other, then the queue has
    all its room and no message."""
    q = mq.Queue(**POOL)
    room = fill_count(q)
    gc.disable()
    try:
        for k in range(3 * room):
            arr = q.reserve_array((BIG,), np.uint8, timeout=5)
            arr[:4] = k
            del arr
        assert fill_count(q) == room
    finally:
        gc.enable()
    assert q.qsize() == 0


def test_reserve_array_pins_its_memory_after_commit(mq):
    """The producer's array stays intact after commit while the queue
    recycles its memory: its block is not given back under it."""
    q = mq.Queue(**POOL)
    held = []
    for k in range(6):
        arr = q.reserve_array((BIG // 4,), np.uint32)
        arr[...] = k
        q.commit(arr)
        held.append(arr)
        del arr
        got = q.get(timeout=5, zero_copy=True)
        del got
        for _ in range(3):                     # other messages through the same pool
            q.put_bytes(b"\xff" * BIG)
            q.get_bytes(timeout=5)
        for i, h in enumerate(held):
            assert not h.flags.writeable
            assert (h == i).all(), f"array {i} changed after its commit"


@pytest.mark.parametrize("shape,dtype", [((5000,), np.uint32), ((3, 7), "f8"), ((4,), ">i2")],
                         ids=str)
def test_repeated_zero_copy_gets_pin_and_match(mq, shape, dtype):
    """The same kind of array received zero-copy again and again (the
    decoder learns its pickle after the first): every one is what pickle
    gives (shape, dtype, strides, read-only) and stays intact while held
    as the queue recycles its memory."""
    q = mq.Queue(**POOL)
    held = []
    for k in range(8):
        value = (_sample(shape, dtype, k) if k else np.zeros(shape, dtype))
        q.put(value)
        got = q.get(timeout=5, zero_copy=True)
        assert type(got) is np.ndarray
        assert (got.shape, got.dtype, got.strides) == (value.shape, value.dtype, value.strides)
        assert not got.flags.writeable
        held.append((value, got))
        for _ in range(2):
            q.put_bytes(b"\xff" * BIG)
            q.get_bytes(timeout=5)
        for v, h in held:
            assert h.tobytes() == v.tobytes(), "a held zero-copy array changed"


def test_learnt_array_pickle_with_another_length_is_not_trusted():
    """A frame whose pickle was seen before but whose buffer has another
    length decodes as pickle alone would decode it (here: an error), not
    as an array of the length learnt."""
    from fastmq import _serialize
    frame = _serialize.encode(np.arange(16, dtype=np.uint32))
    first = _serialize.decode(memoryview(bytes(frame)), zero_copy=True)
    np.testing.assert_array_equal(first, np.arange(16))
    again = _serialize.decode(memoryview(bytes(frame)), zero_copy=True)
    np.testing.assert_array_equal(again, np.arange(16))
    stream, entries = _serialize.parse_frame(memoryview(frame))
    (off, length), = entries
    # the same header and pickle, the buffer entry 4 bytes shorter
    short = bytearray(frame[:off + length - 4])
    _serialize._ENTRY.pack_into(short, _serialize._FIXED.size, off, length - 4)
    with pytest.raises(Exception) as info:
        _serialize.decode(memoryview(bytes(short)), zero_copy=True)
    with pytest.raises(type(info.value)):
        pickle_only = [memoryview(bytes(short))[off:off + length - 4]]
        __import__("pickle").loads(bytes(stream), buffers=pickle_only)


# ------------------------------------------------------------------ recv

def test_recv_view_is_read_only(mq):
    q = mq.Queue()
    q.put_bytes(b"hello world")
    with q.recv(timeout=5) as msg:
        assert isinstance(msg.data, memoryview)
        assert msg.data.readonly
        assert bytes(msg.data) == b"hello world"
        with pytest.raises(TypeError):
            msg.data[0] = 0
        arr = np.frombuffer(msg.data, dtype=np.uint8)
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1
        with pytest.raises(ValueError):
            arr.flags.writeable = True
        del arr
    assert q.qsize() == 0


def test_recv_timeout_and_nonblocking(mq):
    q = mq.Queue()
    with pytest.raises(fastmq.Empty):
        q.recv(timeout=0.05)
    with pytest.raises(fastmq.Empty):
        q.recv(timeout=-1)              # one non-blocking try, as mp.Queue
    with pytest.raises(ValueError):
        q.recv(timeout=float("nan"))


def test_recv_of_pickled_message_gives_its_bytes(mq):
    import pickle
    q = mq.Queue()
    q.put({"k": 1})
    with q.recv(timeout=5) as msg:
        assert pickle.loads(msg.data) == {"k": 1}


def test_recv_zero_length(mq):
    q = mq.Queue()
    q.put_bytes(b"")
    with q.recv(timeout=5) as msg:
        assert msg.data.nbytes == 0
        assert bytes(msg.data) == b""


@pytest.mark.parametrize("make_view", ["slice", "memoryview", "numpy", "cast"])
def test_explicit_release_with_live_view_is_buffer_error(mq, make_view):
    q = mq.Queue()
    q.put_bytes(b"0123456789abcdef")
    with q.recv(timeout=5) as msg:
        if make_view == "slice":
            v = msg.data[2:6]
        elif make_view == "memoryview":
            v = memoryview(msg.data)
        elif make_view == "numpy":
            v = np.frombuffer(msg.data, dtype=np.uint8)
        else:
            v = msg.data.cast("B", (4, 4))
        with pytest.raises(BufferError):
            msg.release()
        # the failed release changed nothing: the view still reads right
        expect = {"slice": b"2345"}.get(make_view, b"0123456789abcdef")
        assert (v.tobytes() if make_view == "numpy" else bytes(v)) == expect
        assert bytes(msg.data) == b"0123456789abcdef"
        del v
        gc.collect()
        msg.release()  # no views left: fine
        msg.release()  # idempotent


def test_release_without_views_then_data_is_unusable(mq):
    q = mq.Queue()
    q.put_bytes(b"abc")
    with q.recv(timeout=5) as msg:
        msg.release()
        with pytest.raises(ValueError):
            bytes(msg.data)


def test_deferred_release_after_with(mq, backend):
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    data = pattern(BIG, 3)
    q.put_bytes(data)
    with q.recv(timeout=5) as msg:
        v = np.frombuffer(msg.data, dtype=np.uint8)[1000:]
        s = msg.data[:100]
    # leaving the with with live views is not an error; they stay valid
    assert v.tobytes() == data[1000:]
    assert bytes(s) == data[:100]
    if backend == "native":  # the block is still pinned: one big message less fits
        assert fill_count(q) < n0
    del v
    gc.collect()
    if backend == "native":
        assert fill_count(q) < n0, "released while a slice was alive"
    assert bytes(s) == data[:100]
    del s
    gc.collect()
    assert fill_count(q) == n0, "the block was not released with the last view"


def test_leaving_with_without_views_releases_at_once(mq):
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    q.put_bytes(pattern(BIG, 4))
    with q.recv(timeout=5) as msg:
        assert msg.data.nbytes == BIG
    assert fill_count(q) == n0
    with pytest.raises(ValueError):
        bytes(msg.data)  # the lease is over; no stale access


# ------------------------------------------------------------- pin torture

def _cycle(q, rounds, size, check_every, held_checks):
    for i in range(rounds):
        data = pattern(size, 1000 + i)
        q.put_bytes(data, timeout=10)
        got = q.get_bytes(timeout=10)
        assert got == data
        if i % check_every == 0:
            for check in held_checks:
                check()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [64 * KiB, 300 * KiB])
def test_pin_torture_recv_views(mq, size):
    """Hold views of one message while the queue cycles 100x its capacity
    (slots and pool bytes): the held bytes never change."""
    maxsize = 8
    q = mq.Queue(maxsize=maxsize, max_message_size=512 * KiB, capacity_bytes=4 * MiB)
    held = pattern(size, 99)
    q.put_bytes(held)
    with q.recv(timeout=5) as msg:
        view = msg.data[:]  # derived views (msg.data itself is the lease's own)
        arr = np.frombuffer(msg.data, dtype=np.uint8)
        sl = msg.data[size // 2:]
    checks = [lambda: bytes(view) == held or pytest.fail("memoryview changed"),
              lambda: arr.tobytes() == held or pytest.fail("ndarray changed"),
              lambda: bytes(sl) == held[size // 2:] or pytest.fail("slice changed")]
    rounds = max(100 * maxsize, 100 * (4 * MiB) // size)
    _cycle(q, rounds, size, 25, checks)
    for c in checks:
        c()
    del view, arr, sl, checks
    gc.collect()
    _cycle(q, 2 * maxsize, size, 1, [])


@pytest.mark.timeout(120)
def test_pin_torture_zero_copy_get(mq):
    maxsize = 8
    q = mq.Queue(maxsize=maxsize, max_message_size=512 * KiB, capacity_bytes=2 * MiB)
    src = np.arange(50_000, dtype=np.float64)
    q.put(src)
    arr = q.get(timeout=5, zero_copy=True)
    np.testing.assert_array_equal(arr, src)
    rounds = 100 * maxsize
    for i in range(rounds):
        x = np.full(50_000, float(i))
        q.put(x, timeout=10)
        y = q.get(timeout=10, zero_copy=True)
        assert y[0] == i and y[-1] == i
        del y
        if i % 50 == 0:
            np.testing.assert_array_equal(arr, src)
    np.testing.assert_array_equal(arr, src)


def test_pin_small_message_values_stable(mq):
    """Small (possibly inline) messages: a held view never changes while the
    queue moves as much traffic as it accepts without blocking."""
    q = mq.Queue(maxsize=4)
    q.put_bytes(b"held-small")
    with q.recv(timeout=5) as msg:
        v = msg.data[:]
    moved = 0
    for i in range(400):
        try:
            q.put_bytes(b"x%09d" % i, block=False)
        except fastmq.Full:
            break
        assert q.get_bytes(timeout=5) == b"x%09d" % i
        moved += 1
        assert bytes(v) == b"held-small"
    assert bytes(v) == b"held-small"
    del v
    gc.collect()
    # once released, the queue moves freely again
    for i in range(40):
        q.put_bytes(b"y", timeout=5)
        assert q.get_bytes(timeout=5) == b"y"


def test_held_large_view_does_not_block_the_ring(mq):
    """Issue 3: a consumer holding a large message frees its slot at once
    (the block stays pinned), so the ring keeps moving for others."""
    q = mq.Queue(maxsize=2, max_message_size=1 * MiB, capacity_bytes=8 * MiB)
    big = pattern(512 * KiB, 5)
    q.put_bytes(big)
    with q.recv(timeout=5) as msg:
        held = np.frombuffer(msg.data, dtype=np.uint8)
    for i in range(50):
        q.put_bytes(b"small %d" % i, timeout=5)
        assert q.get_bytes(timeout=5) == b"small %d" % i
    assert held.tobytes() == big


# ------------------------------------------------------------- numpy via put/get

def _arrays():
    base = np.arange(2 * 3 * 4 * 5, dtype=np.int64).reshape(2, 3, 4, 5)
    out = {}
    for dt in DTYPES_PUT:
        out[f"dtype-{dt}"] = _sample((6, 7), dt, 11)
    out["scalar0d"] = np.array(3.25)
    out["empty"] = np.empty((0,), dtype=np.float32)
    out["empty2d"] = np.empty((3, 0), dtype=np.int16)
    out["4d"] = base
    out["fortran"] = np.asfortranarray(base.astype(np.float32))
    out["step2"] = base.ravel()[::2]
    out["reversed"] = base.ravel()[::-1]
    out["transposed"] = base.T
    out["col-slice"] = base[:, 1, ::3, :]
    out["broadcast"] = np.broadcast_to(np.arange(5.0), (4, 5))
    out["bool-mask"] = np.arange(100) % 3 == 0
    out["unaligned"] = np.frombuffer(bytes(range(65)), dtype=np.uint8)[1:].view(np.uint32)
    out["object-dtype"] = np.array([1, "a", None, (2, 3)], dtype=object)
    out["large"] = np.arange(300_000, dtype=np.float64)
    out["large-strided"] = np.arange(600_000, dtype=np.int32)[::3]
    return out


ARRAYS = _arrays()


@pytest.mark.parametrize("zero_copy", [False, True], ids=["copy", "zero_copy"])
@pytest.mark.parametrize("key", sorted(ARRAYS))
def test_numpy_roundtrip(mq, key, zero_copy):
    q = mq.Queue()
    a = ARRAYS[key]
    q.put(a)
    got = q.get(timeout=5, zero_copy=zero_copy)
    assert isinstance(got, np.ndarray)
    assert got.dtype == a.dtype
    assert got.shape == a.shape
    np.testing.assert_array_equal(got, a)
    if not zero_copy and a.flags.writeable:
        # pickle semantics: an independent array, writable if the original was
        assert got.flags.writeable, "plain get() returns an independent (writable) array"
        got[...] = got  # writable for real
    del got
    gc.collect()


def test_numpy_through_put_many_get_many(mq):
    q = mq.Queue()
    arrays = [np.arange(n, dtype=np.int16) for n in (0, 1, 1000, 50_000)]
    arrays.append(np.arange(100.0).reshape(10, 10).T)
    assert q.put_many(arrays) == len(arrays)
    got = []
    while len(got) < len(arrays):
        got += q.get_many(10, timeout=5)
    for a, b in zip(arrays, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.timeout(60)
def test_put_array_makes_no_intermediate_copy(mq, backend):
    native_only(backend, "the pure backend's reservation is a private buffer (one "
                         "extra copy by design)")
    import tracemalloc
    a = np.ones(32 * MiB // 8)
    q = mq.Queue(max_message_size=40 * MiB, capacity_bytes=48 * MiB)
    tracemalloc.start()
    try:
        q.put(a)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"put() of a 32 MiB array allocated {peak / MiB:.1f} MiB"
    tracemalloc.start()
    try:
        got = q.get(timeout=10, zero_copy=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"get(zero_copy=True) allocated {peak / MiB:.1f} MiB"
    assert got.shape == a.shape and float(got.sum()) == float(a.size)


def test_numpy_in_containers_zero_copy(mq):
    q = mq.Queue()
    obj = {"frames": [np.arange(10, dtype=np.uint16), np.ones((3, 3))],
           "meta": ("x", 1), "nc": np.arange(20)[::4]}
    q.put(obj)
    got = q.get(timeout=5, zero_copy=True)
    assert got["meta"] == ("x", 1)
    np.testing.assert_array_equal(got["frames"][0], obj["frames"][0])
    np.testing.assert_array_equal(got["frames"][1], obj["frames"][1])
    np.testing.assert_array_equal(got["nc"], obj["nc"])


def test_plain_get_is_independent_of_the_queue(mq):
    """Plain get() copies: the queue's memory is free right away."""
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    a = np.arange(BIG // 8, dtype=np.float64)
    q.put(a)
    got = q.get(timeout=5)
    assert fill_count(q) == n0, "plain get() kept shared memory pinned"
    got += 1
    np.testing.assert_array_equal(got, a + 1)


def test_zero_copy_get_pins_until_last_array(mq, backend):
    native_only(backend, "a copying backend frees the block at receive time; "
                         "pinning shared memory needs exported shared memory")
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    a = np.arange(BIG // 8, dtype=np.float64)
    q.put(a)
    got = q.get(timeout=5, zero_copy=True)
    assert fill_count(q) < n0
    part = got[10:20]
    del got
    gc.collect()
    assert fill_count(q) < n0, "released while a derived view was alive"
    np.testing.assert_array_equal(part, a[10:20])
    del part
    gc.collect()
    assert fill_count(q) == n0


def test_recv_pins_shared_memory(mq, backend):
    native_only(backend, "the pure backend's lease holds a private copy")
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    q.put_bytes(pattern(BIG, 8))
    with q.recv(timeout=5) as msg:
        assert fill_count(q) < n0
        v = msg.data[10:]
    assert fill_count(q) < n0
    del v
    gc.collect()
    assert fill_count(q) == n0


def test_zero_length_messages(mq):
    q = mq.Queue()
    q.put_bytes(b"")
    q.put(b"")
    q.put(np.empty(0, dtype=np.uint8))
    with q.reserve(0):
        pass
    q.put_many([b"", b""])
    assert q.qsize() == 6
    assert q.get_bytes(timeout=5) == b""
    assert q.get(timeout=5) == b""
    e = q.get(timeout=5, zero_copy=True)
    assert e.shape == (0,) and e.dtype == np.uint8
    with q.recv(timeout=5) as msg:
        assert msg.data.nbytes == 0
    assert q.get_many(5, timeout=5) == [b"", b""]


@pytest.mark.timeout(240)
def test_256_mib_round_trip(mq):
    n = 256 * MiB
    q = mq.Queue(maxsize=2, max_message_size=n + 64 * KiB, capacity_bytes=n + 4 * MiB)
    a = np.arange(n // 8, dtype=np.uint64)
    q.put(a)
    got = q.get(timeout=60, zero_copy=True)
    assert got.nbytes == n
    assert got.dtype == np.uint64
    assert np.array_equal(got, a)
    del got
    gc.collect()
    # raw bytes of the same size through reserve/recv
    with q.reserve(n, timeout=60) as buf:
        np.frombuffer(buf, dtype=np.uint64)[:] = a[::-1]
    with q.recv(timeout=60) as msg:
        v = np.frombuffer(msg.data, dtype=np.uint64)
        assert v[0] == n // 8 - 1 and v[-1] == 0
        assert np.array_equal(v, a[::-1])
        del v
    assert q.qsize() == 0


# ------------------------------------------------------------- processes

@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_reserve", [False, True], ids=["put", "reserve_array"])
def test_zero_copy_between_processes_with_held_arrays(mq, tmp_path, use_reserve):
    """2 producers -> 2 consumers of numpy arrays; consumers receive with
    get(zero_copy=True) and keep their last 6 arrays alive, re-checking them
    after every receive while the small pool is recycled around them."""
    import pickle as _pickle
    import _workers as W
    from conftest import ChildGroup
    import multiprocessing as mp
    # up to 2 x 6 held + 8 queued + 2 being written arrays of <= 240 KiB: the
    # pool must have room for all of them in their size class (the native pool
    # gives each class only a share of capacity_bytes), else this deadlocks by
    # construction
    q = mq.Queue(maxsize=8, max_message_size=512 * KiB, capacity_bytes=64 * MiB)
    paths = [str(tmp_path / f"zc{i}") for i in range(2)]
    per = 150
    g = ChildGroup(mp.get_context("fork"))
    try:
        cons = [g.start(W.zc_consumer, q, paths[i], 6) for i in range(2)]
        prods = [g.start(W.zc_producer, q, p, per, use_reserve) for p in range(2)]
        g.join(90, prods)
        for _ in range(2):
            q.put(None, timeout=30)
        g.join(90, cons)
    finally:
        g.reap()
    got = []
    for path in paths:
        with open(path, "rb") as f:
            rep = _pickle.load(f)
        assert rep["error"] is None, rep["error"]
        got += rep["got"]
    assert sorted(got) == [(p, k) for p in range(2) for k in range(per)]


def test_reserve_blocks_when_pool_exhausted(mq):
    """Issue 3: an exhausted pool blocks like a full queue (with timeout)."""
    q = mq.Queue(maxsize=64, max_message_size=256 * KiB, capacity_bytes=1 * MiB)
    n = fill_count(q, 200 * KiB, limit=64)
    assert 0 < n < 64, "the pool never ran out before the slots"
    for _ in range(n):
        q.put_bytes(b"y" * (200 * KiB), block=False)
    t0 = time.monotonic()
    with pytest.raises(fastmq.Full):
        with q.reserve(200 * KiB, timeout=0.2):
            pass
    assert 0.15 <= time.monotonic() - t0 <= 2.0
    t0 = time.monotonic()
    with pytest.raises(fastmq.Full):
        q.put_bytes(b"x" * (200 * KiB), timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 <= 2.0
    q.get_bytes(timeout=5)
    with q.reserve(200 * KiB, timeout=5) as buf:  # room again
        buf[:4] = b"last"
    assert q.qsize() == n


def test_open_reservations_hold_pool_space(mq, backend):
    native_only(backend, "the pure backend's reservation is a private buffer that "
                         "takes pool space only at commit")
    import contextlib
    q = mq.Queue(maxsize=64, max_message_size=256 * KiB, capacity_bytes=1 * MiB)
    with contextlib.ExitStack() as stack:
        n = 0
        with pytest.raises(fastmq.Full):
            for n in range(1, 65):
                buf = stack.enter_context(q.reserve(200 * KiB, timeout=0.2))
                buf[:4] = b"%04d" % n
        del buf
        assert n < 64, "the pool never ran out"
        t0 = time.monotonic()
        with pytest.raises(fastmq.Full):
            q.put_bytes(b"x" * (200 * KiB), timeout=0.2)
        assert 0.15 <= time.monotonic() - t0 <= 2.0
    # leaving the stack committed the reservations that fitted (last entered first)
    got = [q.get_bytes(timeout=5)[:4] for _ in range(n - 1)]
    assert got == [b"%04d" % i for i in reversed(range(1, n))]


# ------------------------------------------------------------- threads

@pytest.mark.timeout(60)
def test_views_handed_across_threads(mq):
    q = mq.Queue(maxsize=4, max_message_size=1 * MiB, capacity_bytes=16 * MiB)
    datas = [pattern(200 * KiB, i) for i in range(10)]
    for d in datas[:4]:
        q.put_bytes(d)
    views = []
    for _ in range(4):
        with q.recv(timeout=5) as msg:
            views.append(msg.data[:])
    results = {}
    errors = []

    def reader(i, v):
        try:
            results[i] = zlib.crc32(v)
            # this thread also receives an array and hands it back
            results[("arr", i)] = q.get(timeout=10, zero_copy=True)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    for i in range(4):
        q.put(np.full(1000, i, dtype=np.int32))
    threads = [threading.Thread(target=reader, args=(i, v)) for i, v in enumerate(views)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert [results[i] for i in range(4)] == [zlib.crc32(d) for d in datas[:4]]
    arrays = sorted((results[("arr", i)] for i in range(4)), key=lambda a: int(a[0]))
    for i, a in enumerate(arrays):
        assert a.shape == (1000,) and (a == i).all()
    for i in range(40):
        d = pattern(200 * KiB, 50 + i)
        q.put_bytes(d, timeout=5)
        assert q.get_bytes(timeout=5) == d
    for v, d in zip(views, datas):
        assert bytes(v) == d
    # release views in another thread
    t = threading.Thread(target=views.clear)
    t.start()
    t.join(10)
    del arrays, results
    gc.collect()


# ------------------------------------------------------------- lifetime

def test_lifetime_weakref_and_gc(mq):
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    a = np.arange(BIG // 8, dtype=np.int64)
    q.put(a)
    got = q.get(timeout=5, zero_copy=True)
    wr = weakref.ref(got)
    derived = got.reshape(-1, 100)[::7, 3]
    del got
    gc.collect()
    np.testing.assert_array_equal(derived, a.reshape(-1, 100)[::7, 3])
    del derived
    gc.collect()
    assert wr() is None
    assert fill_count(q) == n0


def test_lifetime_reference_cycle(mq):
    q = mq.Queue(**POOL)
    n0 = fill_count(q)
    q.put_bytes(pattern(BIG, 2))
    with q.recv(timeout=5) as msg:
        cycle = [msg.data[5:], np.frombuffer(msg.data, dtype=np.uint8)]
        cycle.append(cycle)
    wr = weakref.ref(cycle[0])
    del cycle, msg
    gc.collect()
    assert wr() is None
    assert fill_count(q) == n0


def test_lease_object_dropped_while_views_alive(mq):
    q = mq.Queue(max_message_size=2 * MiB)
    data = pattern(300 * KiB, 6)
    q.put_bytes(data)
    with q.recv(timeout=5) as msg:
        v = np.frombuffer(msg.data, dtype=np.uint8)
    wr = weakref.ref(msg) if type(msg).__weakrefoffset__ else None
    del msg
    gc.collect()
    assert v.tobytes() == data  # the view alone keeps the memory alive
    for i in range(30):
        d = pattern(300 * KiB, 100 + i)
        q.put_bytes(d, timeout=5)
        assert q.get_bytes(timeout=5) == d
    assert v.tobytes() == data
    del v
    gc.collect()
    if wr is not None:
        assert wr() is None


@pytest.mark.timeout(60)
def test_views_outlive_closed_handle_safely(backend):
    """Close (and drop) the queue while zero-copy views are alive, then read
    them: either the right bytes or a Python exception -- never a crash."""
    code = f"""
        import gc, numpy as np, fastmq
        q = fastmq.Queue(max_message_size=4 << 20, _backend={backend!r})
        a = np.arange(300_000, dtype=np.float64)
        q.put(a)
        z = q.get(timeout=5, zero_copy=True)
        q.put_bytes(b"abc" * 1000)
        with q.recv(timeout=5) as msg:
            v = msg.data[3:]
        q.close()
        del q, msg
        gc.collect()
        try:
            ok1 = bool(np.array_equal(z, a))
        except Exception as e:
            ok1 = type(e).__name__
        try:
            ok2 = bytes(v) == (b"abc" * 1000)[3:]
        except Exception as e:
            ok2 = type(e).__name__
        print("RESULT", ok1, ok2)
        del z, v
        gc.collect()
        print("DONE")
    """
    res = run_python(code, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "DONE" in res.stdout, res.stdout + res.stderr
    assert "RESULT True True" in res.stdout, res.stdout


# ------------------------------------------------------------- numpy optional

NO_NUMPY = r"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ImportError("numpy hidden by the test")
        return None
sys.meta_path.insert(0, _Block())
try:
    import numpy
    print("numpy importable?!")
    sys.exit(3)
except ImportError:
    pass
import fastmq
q = fastmq.Queue(_backend=sys.argv[1])
q.put({"a": [1, 2]})
assert q.get(timeout=5) == {"a": [1, 2]}
q.put_bytes(b"raw")
assert q.get_bytes(timeout=5) == b"raw"
with q.reserve(3) as buf:
    buf[:] = b"res"
with q.recv(timeout=5) as msg:
    assert bytes(msg.data) == b"res"
print("BASIC OK")
try:
    q.reserve_array((3,), "f8")
    print("NO ERROR")
except ImportError as e:
    print("IMPORTERROR", e)
"""


@pytest.mark.timeout(60)
def test_import_without_numpy(backend):
    import subprocess
    import sys
    import textwrap
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_NUMPY), backend],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BASIC OK" in proc.stdout, proc.stdout + proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith(("IMPORTERROR", "NO ERROR"))]
    assert line and line[0].startswith("IMPORTERROR"), proc.stdout
    assert "numpy" in line[0].lower(), f"the ImportError must say what to install: {line[0]}"


@pytest.mark.timeout(60)
def test_import_with_numpy_set_to_none(backend):
    code = f"""
        import sys
        sys.modules["numpy"] = None
        import fastmq
        q = fastmq.Queue(_backend={backend!r})
        q.put([1, 2, 3])
        assert q.get(timeout=5) == [1, 2, 3]
        try:
            q.reserve_array((2, 2), "i4")
        except ImportError as e:
            print("IMPORTERROR", e)
    """
    res = run_python(code, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "IMPORTERROR" in res.stdout and "numpy" in res.stdout.lower(), res.stdout
