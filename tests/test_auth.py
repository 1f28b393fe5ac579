"""``authkey=``: messages from writers without the key are never unpickled.

Every message a keyed handle writes carries a keyed MAC; a keyed reader
checks it before deserializing anything. The family tested here: a message
that fails the check -- no tag (a writer without the key), another key's
tag, one altered byte -- on every read call and both backends is consumed,
counted once in the shared ``stats()["rejected"]``, raises
``AuthenticationError``, runs no code (the trap payload would create a file
when unpickled), and costs none of the messages behind it. The key reaches
multiprocessing children (fork and spawn) but never travels inside a
pickled handle put into a queue.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import pickle

import pytest

import fastmq

from conftest import unique_name

# Every test runs on the durable location too: a file keeps the same tags
# and the same shared rejected count (in its header page, as shared memory).
pytestmark = [pytest.mark.timeout(120), pytest.mark.backends("native", "pure", "file")]

KEY = b"k" * 32
OTHER = b"o" * 32


class Trap:
    """Unpickling this creates ``path``: proof that a payload was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _get_message(q):
    m = q.get_message(timeout=5)
    m.ack()
    return m.value


def _get_messages(q):
    ms = q.get_messages(1, timeout=5)
    q.ack_many(ms)
    return ms[0].value


def _recv(q):
    with q.recv(timeout=5) as msg:
        return pickle.loads(msg.data)      # what the caller would do with it


# Each reads one message and returns the object in it.
READS = {
    "get": lambda q: q.get(timeout=5),
    "get_zero_copy": lambda q: q.get(timeout=5, zero_copy=True),
    "get_many": lambda q: q.get_many(1, timeout=5)[0],
    "get_bytes": lambda q: pickle.loads(q.get_bytes(timeout=5)),
    "get_many_bytes": lambda q: pickle.loads(q.get_many_bytes(1, timeout=5)[0]),
    "recv": _recv,
    "get_message": _get_message,
    "get_messages": _get_messages,
    "get_async": lambda q: asyncio.run(asyncio.wait_for(q.get_async(timeout=5), 20)),
    "get_many_async": lambda q: asyncio.run(
        asyncio.wait_for(q.get_many_async(1, timeout=5), 20))[0],
}


def _pair(mq, **kw):
    """(reader with KEY, a keyless handle on the same queue)."""
    name = unique_name("auth")
    q = mq.create(name, maxsize=16, authkey=KEY, **kw)
    return q, mq.open(name)


def _big(tag):
    return tag * (1 << 20)                 # 1 MiB: lives in a pool block


# ------------------------------------------------- a writer without the key

@pytest.mark.parametrize("size", ["small", "1MiB"])
@pytest.mark.parametrize("call", sorted(READS))
def test_writer_without_key_is_rejected_never_unpickled(mq, tmp_path, call, size):
    q, keyless = _pair(mq, max_message_size=4 << 20)
    trap = tmp_path / "unpickled"
    evil = Trap(str(trap))
    payload = pickle.dumps([evil, b"p" * (1 << 20)] if size == "1MiB" else evil, protocol=5)
    keyless.put_bytes(payload)             # what a writer without the key can send
    q.put("behind-1")
    q.put(_big(b"b") if size == "1MiB" else "behind-2")
    with pytest.raises(fastmq.AuthenticationError, match="rejected"):
        READS[call](q)
    assert not trap.exists(), "the rejected payload was unpickled"
    assert READS[call](q) == "behind-1"                # nothing behind it lost
    assert READS[call](q) == (_big(b"b") if size == "1MiB" else "behind-2")
    assert q.stats()["rejected"] == 1
    assert keyless.stats()["rejected"] == 1            # shared: every handle sees it
    assert q.qsize() == 0 and q.pending() == []


@pytest.mark.parametrize("call", sorted(READS))
def test_wrong_key_is_rejected(mq, tmp_path, call):
    name = unique_name("auth")
    q = mq.create(name, maxsize=16, authkey=KEY)
    other = mq.open(name, authkey=OTHER)
    trap = tmp_path / "unpickled"
    other.put(Trap(str(trap)))             # a valid tag, of the wrong key
    q.put("good")
    with pytest.raises(fastmq.AuthenticationError, match="does not match"):
        READS[call](q)
    assert not trap.exists()
    assert READS[call](q) == "good"
    assert q.stats()["rejected"] == 1


@pytest.mark.parametrize("where", ["tag", "first", "middle", "last"])
@pytest.mark.parametrize("size", [10, 1 << 20])
def test_one_altered_byte_is_rejected(mq, where, size):
    q, keyless = _pair(mq, max_message_size=4 << 20)
    q.put_bytes(b"v" * size)
    sealed = bytearray(keyless.get_bytes(timeout=5))   # the message as stored
    at = {"tag": 10, "first": 20, "middle": 20 + size // 2, "last": len(sealed) - 1}[where]
    sealed[at] ^= 0x01
    keyless.put_bytes(bytes(sealed))
    q.put_bytes(b"after")
    with pytest.raises(fastmq.AuthenticationError):
        q.get_bytes(timeout=5)
    assert q.get_bytes(timeout=5) == b"after"
    assert q.stats()["rejected"] == 1


def test_a_bad_message_inside_a_batch_is_counted_once(mq):
    q, keyless = _pair(mq)
    q.put("a")
    keyless.put("forged")
    q.put("b")
    assert q.get_many(10, timeout=5) == ["a"]        # stops before the bad one
    with pytest.raises(fastmq.AuthenticationError):
        q.get_many(10, timeout=5)                    # meets it first: consumes it
    assert q.get_many(10, timeout=5) == ["b"]
    assert q.stats()["rejected"] == 1


def test_leased_batch_drops_the_bad_ones_and_returns_the_rest(mq, tmp_path):
    q, keyless = _pair(mq)
    trap = tmp_path / "unpickled"
    keyless.put(Trap(str(trap)))
    q.put("good")
    got = q.get_messages(10, timeout=5)
    assert [m.value for m in got] == ["good"]
    q.ack_many(got)
    assert not trap.exists()
    assert q.stats()["rejected"] == 1
    # Rejected means gone: not redelivered, not dead-lettered, not in flight.
    assert q.qsize() == 0 and q.pending() == []
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.2)


def test_rejected_count_is_shared_across_processes(mq, py):
    q, keyless = _pair(mq)
    keyless.put("forged")
    with pytest.raises(fastmq.AuthenticationError):
        q.get(timeout=5)
    res = py(f"""
        import fastmq
        q = fastmq.Queue.open({q.name!r}, _backend={mq.backend!r})
        print(q.stats()["rejected"])
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"


def test_keyed_round_trip_of_every_write_call(mq):
    np = pytest.importorskip("numpy")
    q = mq.Queue(authkey=KEY)
    q.put({"a": 1})
    q.put(np.arange(5))
    q.put_many([1, 2])
    q.put_bytes(b"raw")
    q.put_many_bytes([b"r1"])
    with q.reserve(5) as buf:
        buf[:] = b"hello"
    arr = q.reserve_array((3,), "int64")
    arr[:] = 7
    q.commit(arr)
    assert q.get(timeout=5) == {"a": 1}
    assert q.get(timeout=5, zero_copy=True).tolist() == [0, 1, 2, 3, 4]
    assert q.get_many(2, timeout=5) == [1, 2]
    assert q.get_bytes(timeout=5) == b"raw"
    assert q.get_bytes(timeout=5) == b"r1"
    with q.recv(timeout=5) as msg:
        assert bytes(msg.data) == b"hello"
    assert q.get(timeout=5).tolist() == [7, 7, 7]
    assert q.stats()["rejected"] == 0


@pytest.mark.backends("native", "pure")     # exchanges live in shared memory
def test_exchange_with_the_key_publishes_into_keyed_queues(mq, backend):
    q, _ = _pair(mq)
    signed = fastmq.Exchange.create(unique_name("x"), "fanout", authkey=KEY, _backend=backend)
    unsigned = fastmq.Exchange.open(signed.name, _backend=backend)
    try:
        signed.bind(q.name)
        assert unsigned.publish("no key") == 1
        assert signed.publish("with key") == 1
        with pytest.raises(fastmq.AuthenticationError):
            q.get(timeout=5)
        assert q.get(timeout=5) == "with key"
    finally:
        unsigned.close()
        signed.close()
        fastmq.Exchange.unlink(signed.name)


def test_bad_authkey_arguments(mq):
    with pytest.raises(TypeError, match="bytes"):
        mq.Queue(authkey="secret")
    with pytest.raises(ValueError, match="empty"):
        mq.Queue(authkey=b"")
    long_key = mq.Queue(authkey=b"x" * 200)          # longer than BLAKE2b's 64: derived
    long_key.put("ok")
    assert long_key.get(timeout=5) == "ok"


# ----------------------------------------------- the key and other processes

def _child_echo(q, out):
    """Read a keyed message, write one back with the handle's key."""
    try:
        value = q.get(timeout=10)
        q.put(("echo", value))
        out.put(("ok", None))
    except Exception as exc:                 # reported, not swallowed
        out.put((type(exc).__name__, str(exc)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_key_reaches_multiprocessing_children(mq, backend, method):
    ctx = mp.get_context(method)
    q = mq.create(unique_name("auth"), maxsize=16, authkey=KEY)
    out = mq.Queue()
    q.put("from parent")
    p = ctx.Process(target=_child_echo, args=(q, out), daemon=True)
    p.start()
    try:
        assert out.get(timeout=60) == ("ok", None)
        assert q.get(timeout=10) == ("echo", "from parent")   # signed by the child
        p.join(30)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert q.stats()["rejected"] == 0


def test_handle_pickled_into_a_queue_does_not_carry_the_key(mq):
    q = mq.Queue(authkey=KEY)
    assert KEY not in pickle.dumps(q)        # nor in a file, nor anywhere else
    carrier = mq.Queue()
    carrier.put(q)
    copy = carrier.get(timeout=5)
    mq.handles.append(copy)
    q.put("secret")
    with pytest.raises(fastmq.AuthenticationError, match="authkey"):
        copy.get(timeout=5)
    copy.put("from the copy")                # unsigned: keyed readers reject it
    with pytest.raises(fastmq.AuthenticationError):
        q.get(timeout=5)


@pytest.mark.parametrize("compression", ["portable", "avx2", "avx512", None],
                         ids=["portable", "avx2", "avx512", "by_cpu"])
def test_the_c_mac_is_keyed_blake2b(backend, compression):
    """The native build's MAC (csrc/fmq_mac.c) is exactly hashlib's keyed
    BLAKE2b, so handles with and without the extension agree on every tag --
    with each compression function forced in turn (the portable one, AVX2,
    AVX-512VL) and with the one the CPU check picks, at every length of one
    block, at the block boundaries, and past the size where the tag is
    computed without the GIL."""
    import hashlib
    import random
    from conftest import native_only
    native_only(backend, "the C MAC lives in the native extension")
    from fastmq._core import Mac, _mac_path, _mac_select
    rng = random.Random(7)
    try:
        was = _mac_select(compression)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {compression} compression")
    try:
        if compression is not None:
            assert _mac_path() == compression
        # Every length of one block (the AVX-512 one reads those with masked
        # loads), then the block boundaries and past the no-GIL size.
        sizes = list(range(131)) + [255, 256, 257, 1 << 16, (1 << 16) + 1, 300_001]
        for i in range(500):
            key = rng.randbytes(rng.randint(1, 64))
            size = sizes[i] if i < len(sizes) else rng.randint(0, 3000)
            data = rng.randbytes(size)
            mac = Mac(key, b"\x00FQA")
            want = hashlib.blake2b(data, key=key, digest_size=16).digest()
            sealed = mac.seal(data)
            assert sealed == b"\x00FQA" + want + data, (size, len(key))
            cut = rng.randint(0, len(data))
            assert mac.tag(data[:cut], data[cut:]) == want
            assert mac.check(sealed) == data
            bad = bytearray(sealed)
            bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            assert mac.check(bytes(bad)) is None
    finally:
        _mac_select(was)


def test_the_mac_compression_can_only_be_forced_to_one_the_cpu_runs(backend):
    from conftest import native_only
    native_only(backend, "the C MAC lives in the native extension")
    from fastmq._core import _mac_path, _mac_select
    best = _mac_path()
    assert best in ("portable", "avx2", "avx512")
    assert _mac_select("portable") == best          # the portable one runs anywhere
    try:
        assert _mac_path() == "portable"
        with pytest.raises(ValueError, match="'sse9'.*portable"):
            _mac_select("sse9")
    finally:
        assert _mac_select(None) == "portable"
    assert _mac_path() == best


@pytest.mark.parametrize("stored", [b"", b"\x00FQ", b"\x00FQA" + b"t" * 15, b"x" * 19])
def test_a_message_shorter_than_a_tag_is_rejected_and_consumed(mq, stored):
    q, keyless = _pair(mq)
    keyless.put_bytes(stored)
    q.put("behind")
    with pytest.raises(fastmq.AuthenticationError, match="has no authentication tag"):
        q.get(timeout=5)
    assert q.get(timeout=5) == "behind"
    assert q.stats()["rejected"] == 1


@pytest.mark.parametrize("where", ["slot", "block"])
def test_a_sealed_message_exactly_fills_max_message_size(mq, where):
    """The tag counts against max_message_size: a payload that fits with
    its tag goes in whole (in a slot or a block), one byte more is
    MessageTooLarge naming the tag, and nothing is written."""
    limit = 200 if where == "slot" else 64 << 10
    q, keyless = _pair(mq, max_message_size=limit)
    from fastmq import _auth
    fits = b"f" * (limit - _auth.OVERHEAD)
    q.put_bytes(fits)
    with pytest.raises(fastmq.MessageTooLarge, match="authentication tag"):
        q.put_bytes(fits + b"!")
    assert q.qsize() == 1
    assert q.get_bytes(timeout=5) == fits
    assert q.qsize() == 0


def test_pure_and_native_handles_agree_on_tags(mq, backend, monkeypatch):
    """A handle using hashlib (no extension) reads what a C-MAC handle wrote."""
    from fastmq import _auth
    q = mq.Queue(authkey=KEY)
    q.put("from the C MAC")
    monkeypatch.setattr(_auth, "_NativeAuth", None)
    slow = fastmq.Queue._from_ring(q._ring, q.backend, None, None, KEY)
    assert slow.get(timeout=5) == "from the C MAC"
    slow.put("from hashlib")
    monkeypatch.undo()
    assert q.get(timeout=5) == "from hashlib"


def test_dead_letters_keep_their_tag(mq):
    dlq = unique_name("dlq")
    mq.names.append(dlq)
    q = mq.create(unique_name("auth"), maxsize=8, dead_letter=dlq, authkey=KEY)
    q.put({"job": 1})
    q.get_message(timeout=5).nack(requeue=False)
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.1)           # forwards the dead letter
    assert mq.open(dlq, authkey=KEY).get(timeout=5) == {"job": 1}
    q.put({"job": 2})
    q.get_message(timeout=5).nack(requeue=False)
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.1)
    with pytest.raises(fastmq.AuthenticationError, match="authkey"):
        mq.open(dlq).get(timeout=5)          # a reader without the key cannot use it


def test_mac_time_runs_the_compression_in_use_and_checks_its_arguments(backend):
    """benchmarks/mac_speed.py's timer: a duration for every path this CPU
    runs (never asserted as a speed), and a clear error for no message."""
    from conftest import native_only
    native_only(backend, "the C MAC lives in the native extension")
    from fastmq._core import _mac_select, _mac_time
    for path in ("portable", "avx2", "avx512"):
        try:
            _mac_select(path)
        except ValueError:
            continue
        try:
            assert _mac_time(64, 100) > 0 and _mac_time(300, 3) > 0
        finally:
            _mac_select(None)
    for size, n in ((0, 1), (64, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            _mac_time(size, n)
