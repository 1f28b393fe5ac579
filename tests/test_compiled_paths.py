"""The hot methods a handle binds behave as the Queue's own.

A handle on the native ring binds compiled forms of
``put``/``get``/``put_many``/``get_many`` (default codec only) and of the
``*_bytes`` methods (see ``Queue._bind_compiled``): the ring's own without an
authkey, the C ``Mac``'s with one (the MAC computed and checked in the same C
call). Each test here states the behaviour of the public method, and checks
it both through the handle (the compiled form, on the native backend) and
through the class (``fastmq.Queue.put_bytes(q, ...)``, the layer's own code),
on both backends, with and without an authkey where the behaviour is the
same: the two must agree argument for argument, message for message.
"""
from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap

import pytest

import fastmq
from fastmq.queue import DEFAULT_GET_MANY

PAYLOAD = b"x" * 64
KEY = b"k" * 32


@pytest.fixture(params=[None, KEY], ids=["plain", "authkey"])
def authkey(request):
    """Each shared behaviour with and without an authkey: a keyed handle
    binds other compiled forms (the C Mac's), which must behave the same."""
    return request.param

# name -> (positional arguments, does it write)
METHODS = {
    "put": ((("obj", 1),), True),
    "put_bytes": ((PAYLOAD,), True),
    "put_many": (([1, 2],), True),
    "put_many_bytes": (([PAYLOAD, PAYLOAD],), True),
    "get": ((), False),
    "get_bytes": ((), False),
    "get_many": ((), False),
    "get_many_bytes": ((), False),
}


def _outcome(call):
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return type(exc), str(exc)
    return "ok", value


def _both(q, name, *args, **kwargs):
    """(outcome through the handle, outcome through the class), each on a
    fresh empty queue state: whatever the first call wrote is drained."""
    bound = _outcome(lambda: getattr(q, name)(*args, **kwargs))
    _drain(q)
    reference = _outcome(lambda: getattr(fastmq.Queue, name)(q, *args, **kwargs))
    _drain(q)
    return bound, reference


def _drain(q):
    while True:
        try:
            q.get_bytes(block=False)
        except fastmq.Empty:
            return


# (block, timeout, what a write into an empty queue gives, what a read of an
# empty queue gives): "ok", or (exception type, message fragment).
TIMEOUTS = [
    (True, "1", (TypeError, "'timeout' must be a number or None, not str"), None),
    (True, True, (TypeError, "'timeout' must be a number or None, not bool"), None),
    (True, [1], (TypeError, "'timeout' must be a number or None, not list"), None),
    (True, math.nan, (ValueError, "not NaN"), None),
    (False, "not even checked", "ok", (fastmq.Empty, "")),   # as multiprocessing
    (False, None, "ok", (fastmq.Empty, "")),
    (True, 0, "ok", (fastmq.Empty, "")),
    (True, -1.5, "ok", (fastmq.Empty, "")),                  # one try, not an error
    (True, 0.01, "ok", (fastmq.Empty, "")),
    (True, 1, "ok", None),
    (True, math.inf, "ok", None),                            # forever
    (True, 10 ** 400, "ok", None),                           # forever, no OverflowError
    (True, 1e10, "ok", None),
]


def _check(outcome, expected):
    if expected == "ok":
        assert outcome[0] == "ok", outcome
    else:
        kind, fragment = expected
        assert outcome[0] is kind and fragment in outcome[1], outcome


# A read of an empty queue with a long timeout would wait: those rows are
# write-only (None above).
_TIMEOUT_CASES = [
    pytest.param(name, block, timeout, on_write if METHODS[name][1] else on_read,
                 id=f"{name}-{block}-{timeout!r}"[:40])
    for name in sorted(METHODS) for block, timeout, on_write, on_read in TIMEOUTS
    if (on_write if METHODS[name][1] else on_read) is not None]


@pytest.mark.parametrize("name, block, timeout, expected", _TIMEOUT_CASES)
def test_hot_methods_take_block_and_timeout_as_the_layer_does(mq, authkey, name, block, timeout,
                                                               expected):
    args, _ = METHODS[name]
    q = mq.Queue(maxsize=8, authkey=authkey)
    bound, reference = _both(q, name, *args, block=block, timeout=timeout)
    _check(bound, expected)
    assert bound == reference


@pytest.mark.parametrize("name", ["get_many", "get_many_bytes"])
@pytest.mark.parametrize("value, error, fragment", [
    (0, ValueError, "max_messages must be an int in [1, 1073741824], got 0"),
    (-3, ValueError, "got -3"),
    (2 ** 30 + 1, ValueError, "got 1073741825"),
    (2 ** 70, ValueError, "got 1180591620717411303424"),
    ("3", TypeError, "max_messages must be an int, not str"),
    (True, TypeError, "max_messages must be an int, not bool"),
    (3.0, TypeError, "max_messages must be an int, not float"),
])
def test_batch_reads_check_max_messages_as_the_layer_does(mq, authkey, name, value, error,
                                                          fragment):
    q = mq.Queue(authkey=authkey)
    q.put(1)
    bound = _outcome(lambda: getattr(q, name)(value, timeout=1))
    reference = _outcome(lambda: getattr(fastmq.Queue, name)(q, value, timeout=1))
    assert bound[0] is error and fragment in bound[1], bound
    assert bound == reference
    assert q.qsize() == 1                      # nothing was taken by the refused calls


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hot_methods_of_a_closed_handle_raise_queue_closed(mq, authkey, name):
    args, _ = METHODS[name]
    q = mq.Queue(authkey=authkey)
    q.close()
    bound = _outcome(lambda: getattr(q, name)(*args, timeout=1))
    reference = _outcome(lambda: getattr(fastmq.Queue, name)(q, *args, timeout=1))
    assert bound[0] is fastmq.QueueClosed, bound
    assert bound == reference


def test_default_batch_size_is_the_layers(mq, authkey):
    q = mq.Queue(maxsize=DEFAULT_GET_MANY + 10, authkey=authkey)
    q.put_many(range(DEFAULT_GET_MANY + 10))
    assert len(q.get_many(timeout=5)) == DEFAULT_GET_MANY
    q.put_many_bytes([PAYLOAD] * DEFAULT_GET_MANY)
    assert len(fastmq.Queue.get_many(q, timeout=5)) == 10
    assert len(q.get_many_bytes(timeout=5)) == DEFAULT_GET_MANY


def test_objects_round_trip_the_same_through_handle_and_class(mq, authkey):
    """The compiled codec writes exactly the layer's bytes and reads them."""
    q = mq.Queue(authkey=authkey)
    values = [None, True, 7, 2 ** 100, 3.25, 1j, "é", b"raw", bytearray(b"ba"),
              {"id": 1, "tags": ["a"]}, (1, (2, 3)), frozenset({1}), list(range(50)),
              pickle.PickleBuffer(b"in a buffer")]
    for value in values:
        q.put(value)
        fastmq.Queue.put(q, value)
        first, second = q.get_bytes(timeout=5), q.get_bytes(timeout=5)
        assert first == second
        q.put_bytes(first)
        fastmq.Queue.put_bytes(q, first)
        decoded = q.get(timeout=5), fastmq.Queue.get(q, timeout=5)
        expect = bytes(value.raw()) if isinstance(value, pickle.PickleBuffer) else value
        assert decoded == (expect, expect)
    q.put_many(values[:-1])
    assert q.get_many(100, timeout=5) == values[:-1]
    fastmq.Queue.put_many(q, values[:-1])
    assert fastmq.Queue.get_many(q, 100, timeout=5) == values[:-1]


def test_an_undecodable_message_is_bad_message_with_its_bytes_either_way(mq, authkey):
    q = mq.Queue(authkey=authkey)
    for raw in (b"", b"\x80\x05garbage", b"plain text", b"\x00FQ5short"):
        for get in (q.get, lambda **kw: fastmq.Queue.get(q, **kw)):
            q.put_bytes(raw)
            with pytest.raises(fastmq.BadMessage) as info:
                get(timeout=5)
            assert info.value.payload == raw
        q.put_bytes(raw)
        q.put(1)
        with pytest.raises(fastmq.BadMessage):
            q.get_many(10, timeout=5)         # the bad one first: consumed, raised
        assert q.get_many(10, timeout=5) == [1]
    assert q.qsize() == 0


def test_an_oversize_object_in_a_batch_sends_nothing(mq, authkey):
    q = mq.Queue(max_message_size=1000, authkey=authkey)
    for put_many in (q.put_many, lambda items: fastmq.Queue.put_many(q, items)):
        with pytest.raises(fastmq.MessageTooLarge, match="nothing was sent"):
            put_many([1, b"y" * 2000, 3])
        assert q.qsize() == 0


def test_a_subclass_that_overrides_a_hot_method_keeps_its_override(backend):
    class Tagged(fastmq.Queue):
        def put(self, obj, block=True, timeout=None):
            super().put(("tagged", obj), block, timeout)

        def get_bytes(self, block=True, timeout=None):
            return b"sub:" + super().get_bytes(block, timeout)

    q = Tagged(_backend=backend)
    try:
        q.put(1)
        assert q.get(timeout=5) == ("tagged", 1)
        q.put_bytes(b"b")
        assert q.get_bytes(timeout=5) == b"sub:b"
    finally:
        q.close()


def test_a_custom_serializer_is_used_by_put_and_get(mq, authkey):
    calls = []

    def dumps(obj):
        calls.append("dumps")
        return repr(obj).encode()

    def loads(data):
        calls.append("loads")
        return ("loaded", bytes(data))

    q = mq.Queue(serializer=(dumps, loads), authkey=authkey)
    q.put(12)
    assert q.get(timeout=5) == ("loaded", b"12")
    q.put_many([1, 2])
    assert q.get_many(5, timeout=5) == [("loaded", b"1"), ("loaded", b"2")]
    q.put_bytes(b"raw")
    assert q.get_bytes(timeout=5) == b"raw"            # bytes bypass the serializer
    assert calls == ["dumps", "loads", "dumps", "dumps", "loads", "loads"]


def test_a_keyed_handle_tags_what_its_hot_methods_write(mq):
    key = b"k" * 32
    q = mq.Queue(authkey=key)
    q.put({"a": 1})
    q.put_bytes(b"payload")
    q.put_many_bytes([b"m1"])
    assert q.get(timeout=5) == {"a": 1}
    assert q.get_bytes(timeout=5) == b"payload"
    assert q.get_many_bytes(timeout=5) == [b"m1"]
    # What went into the ring carries a tag: the ring holds more than the payload.
    q.put_bytes(b"payload")
    assert len(q._ring.get(5)) > len(b"payload")


_SNAPSHOT_CHILD = textwrap.dedent("""
    import sys, threading, time
    try:
        import fastmq          # the installed one, or the tree on PYTHONPATH
    except ImportError:
        sys.path.insert(0, {src!r})
        import fastmq
    q = fastmq.Queue(maxsize=1, _backend={backend!r})
    q.put_bytes(b"0")                          # full: put_many_bytes waits
    batch = [b"a", b"b", b"c"]
    result = []
    t = threading.Thread(target=lambda: result.append(q.put_many_bytes(batch, timeout=30)))
    t.start()
    time.sleep(0.3)                            # it is waiting, without the GIL
    batch.clear()                              # ... while its list is emptied
    got = [q.get_bytes(timeout=10) for _ in range(4)]
    t.join(30)
    print(got, result)
    q.close()
""")


def test_put_many_sends_the_batch_it_was_called_with_when_its_list_changes(backend):
    """A batch is what the caller passed when it called: another thread
    emptying the list while put_many waits for room neither crashes it nor
    changes what is sent."""
    import os
    src = os.path.dirname(os.path.dirname(fastmq.__file__))
    code = _SNAPSHOT_CHILD.format(src=src, backend=backend)
    res = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[b'0', b'a', b'b', b'c'] [3]"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hot_methods_of_a_handle_have_the_layers_signature(mq, authkey, name):
    import inspect
    q = mq.Queue(authkey=authkey)
    bound = inspect.signature(getattr(q, name))
    reference = inspect.signature(getattr(fastmq.Queue, name))
    want = [(p.name, p.kind, p.default) for p in list(reference.parameters.values())[1:]]
    assert [(p.name, p.kind, p.default) for p in bound.parameters.values()] == want


# ------------------------------------------------------------ keyed handles
#
# What only a keyed handle does: the tag written, checked and refused. Each
# scenario runs once through the handle (on the native backend, the C Mac's
# compiled forms) and once through the class (the layer's code), and the two
# must agree on every outcome, on the bytes that went into the ring and on
# the shared rejected count.

_OBJECT_METHODS = ("put", "get", "put_many", "get_many")


def test_a_keyed_handle_binds_the_compiled_forms_on_the_native_ring_only(backend):
    """The comparisons below are only worth something if the handle really
    runs other code than the class: on the native ring every hot method of a
    keyed handle is a C method of its Mac (objects: default codec only)."""
    plain = fastmq.Queue(authkey=KEY, _backend=backend)
    custom = fastmq.Queue(authkey=KEY, serializer=(pickle.dumps, pickle.loads),
                          _backend=backend)
    try:
        for name in METHODS:
            bound = plain.__dict__.get(name)
            if backend == "native":
                assert bound is not None and type(bound).__name__ == "builtin_function_or_method"
                assert bound.__self__ is plain._auth, name
            else:
                assert bound is None, name          # the pure ring: the layer's methods
            if name in _OBJECT_METHODS or backend != "native":
                assert name not in custom.__dict__, name   # a custom codec: the layer's
            else:
                assert custom.__dict__[name].__self__ is custom._auth, name
    finally:
        plain.close()
        custom.close()


def _keyed_trio(mq, **kw):
    """(a handle with KEY, one without a key, one with another key), one queue."""
    from conftest import unique_name
    name = unique_name("cauth")
    q = mq.create(name, authkey=KEY, **kw)
    return q, mq.open(name), mq.open(name, authkey=b"o" * 32)


# how a bad message is written: (writer, what it writes)
_BAD = {
    "no_tag": lambda plain, other: plain.put_bytes(pickle.dumps("x", 5)),
    "empty": lambda plain, other: plain.put_bytes(b""),
    "magic_only": lambda plain, other: plain.put_bytes(b"\x00FQA" + b"t" * 15),
    "wrong_key": lambda plain, other: other.put("x"),
    "wrong_key_big": lambda plain, other: other.put_bytes(b"b" * (200 << 10)),
    "wrong_key_atomic": lambda plain, other: other.put_many(["x"], atomic=True),
    "altered": None,                  # a genuine message with one byte flipped
}

# read method -> (call on the handle, call through the class, good messages
# as written by put_good)
_READS = {
    "get": (lambda q: q.get(timeout=5), lambda q: fastmq.Queue.get(q, timeout=5)),
    "get_zero_copy": (lambda q: q.get(timeout=5, zero_copy=True),
                      lambda q: fastmq.Queue.get(q, timeout=5, zero_copy=True)),
    "get_bytes": (lambda q: q.get_bytes(timeout=5),
                  lambda q: fastmq.Queue.get_bytes(q, timeout=5)),
    "get_many": (lambda q: q.get_many(10, timeout=5),
                 lambda q: fastmq.Queue.get_many(q, 10, timeout=5)),
    "get_many_bytes": (lambda q: q.get_many_bytes(10, timeout=5),
                       lambda q: fastmq.Queue.get_many_bytes(q, 10, timeout=5)),
}


def _put_good(q, read, value):
    if "bytes" in read:
        q.put_bytes(value.encode())
    else:
        q.put(value)


def _write_altered(q, plain):
    """A message of q's (a genuine tag) with one payload byte changed."""
    raw = bytearray(q._auth.seal(pickle.dumps("genuine", 5)))
    raw[-2] ^= 1
    plain.put_bytes(bytes(raw))


@pytest.mark.parametrize("read", sorted(_READS))
@pytest.mark.parametrize("bad", sorted(_BAD))
def test_a_rejected_message_is_consumed_counted_and_raises_the_same_either_way(mq, read, bad):
    """good, bad, good: the first is delivered (a batch read stops before
    the bad one), the bad one is consumed, counted once in
    stats()["rejected"] and raises AuthenticationError with the same
    message, and the one behind it is delivered intact."""
    q, plain, other = _keyed_trio(mq)
    outcomes = []
    for call in _READS[read]:
        before = q.stats()["rejected"]
        _put_good(q, read, "before")
        if bad == "altered":
            _write_altered(q, plain)
        else:
            _BAD[bad](plain, other)
        _put_good(q, read, "behind")
        seen = [_outcome(lambda: call(q)) for _ in range(3)]
        outcomes.append((seen, q.stats()["rejected"] - before, q.qsize()))
    bound, reference = outcomes
    assert bound == reference
    seen, counted, left = bound
    assert seen[1][0] is fastmq.AuthenticationError, seen
    assert counted == 1 and left == 0
    first, last = seen[0][1], seen[2][1]
    if read.startswith("get_many"):
        first, last = first[0], last[0]
    if "bytes" in read:
        assert (first, last) == (b"before", b"behind")
    else:
        assert (first, last) == ("before", "behind")


_SIZES = [0, 1, 19, 20, 107, 108, 109, 4000, (64 << 10) - 21, (64 << 10) - 20, 64 << 10,
          (64 << 10) + 1, 1 << 20]


@pytest.mark.parametrize("size", _SIZES)
def test_keyed_payloads_of_every_size_carry_the_same_bytes_either_way(mq, size):
    """Around the inline-slot limit, the 64 KiB boundaries (the MAC and the
    copy run without the GIL past them) and in a 1 MiB block: what the
    handle writes is byte for byte what the class writes (tag included),
    and each reads what the other wrote."""
    import os
    q = mq.Queue(maxsize=8, authkey=KEY)
    data = os.urandom(size)
    for put in (lambda: q.put_bytes(data), lambda: fastmq.Queue.put_bytes(q, data),
                lambda: q.put(data), lambda: fastmq.Queue.put(q, data)):
        put()
    raw = [q._ring.get(5) for _ in range(4)]
    assert raw[0] == raw[1] and raw[2] == raw[3]
    assert len(raw[0]) == size + 20
    q.put_bytes(data)
    assert fastmq.Queue.get_bytes(q, timeout=5) == data
    fastmq.Queue.put_bytes(q, bytearray(data))
    assert q.get_bytes(timeout=5) == data
    q.put(data)
    assert fastmq.Queue.get(q, timeout=5) == data
    fastmq.Queue.put(q, data)
    assert q.get(timeout=5) == data
    q.put_many_bytes([data, memoryview(data)])
    assert fastmq.Queue.get_many_bytes(q, timeout=5) == [data, data]
    fastmq.Queue.put_many(q, [data])
    assert q.get_many(timeout=5) == [data]
    assert q.qsize() == 0


@pytest.mark.parametrize("nbytes", [64, 200 << 10])
def test_keyed_objects_with_out_of_band_buffers_the_same_either_way(mq, nbytes):
    """numpy arrays (out-of-band buffers): written as a sealed frame by
    either, read back equal by either; zero_copy=True gives a read-only
    array and the same values."""
    np = pytest.importorskip("numpy")
    q = mq.Queue(maxsize=8, authkey=KEY)
    arr = np.arange(nbytes // 8, dtype=np.int64)
    q.put(arr)
    fastmq.Queue.put(q, arr)
    first, second = q._ring.get(5), q._ring.get(5)
    assert first == second
    writes = (lambda: q.put(arr), lambda: fastmq.Queue.put(q, arr))
    reads = (lambda: q.get(timeout=5), lambda: fastmq.Queue.get(q, timeout=5),
             lambda: q.get(timeout=5, zero_copy=True),
             lambda: fastmq.Queue.get(q, timeout=5, zero_copy=True))
    for write in writes:
        for i, read in enumerate(reads):
            write()
            got = read()
            assert isinstance(got, np.ndarray) and np.array_equal(got, arr)
            if i >= 2:
                assert not got.flags.writeable
            del got
    q.put_many([arr, {"a": arr}])
    a, b = fastmq.Queue.get_many(q, timeout=5)
    assert np.array_equal(a, arr) and np.array_equal(b["a"], arr)
    assert q.qsize() == 0


@pytest.mark.parametrize("how", ["put_many", "put_many_bytes"])
def test_keyed_atomic_batches_the_same_either_way(mq, how):
    """An atomic batch of sealed messages: the same record either way, read
    back one at a time by get/get_bytes or whole by get_many, by either;
    one that can never fit is refused with the same error, nothing sent."""
    q = mq.Queue(maxsize=16, max_message_size=4096, authkey=KEY)
    items = [1, "two", b"3"] if how == "put_many" else [b"1", b"two", bytearray(b"3")]
    want = items if how == "put_many" else [bytes(i) for i in items]
    one = "get" if how == "put_many" else "get_bytes"
    many = "get_many" if how == "put_many" else "get_many_bytes"
    outcomes = []
    for target in (q, None):
        write = getattr(q, how) if target is q else (
            lambda it, **kw: getattr(fastmq.Queue, how)(q, it, **kw))
        assert write(items, atomic=True) == 3
        got = [getattr(q, one)(timeout=5)]
        got.append(getattr(fastmq.Queue, one)(q, timeout=5))
        got += getattr(q, many)(timeout=5)
        assert write(items, atomic=True) == 3
        got += getattr(fastmq.Queue, many)(q, timeout=5)
        big = _outcome(lambda: write([b"x" * 10, b"y" * 4080], atomic=True))   # + its tag
        outcomes.append((got, big, q.qsize()))
    assert outcomes[0] == outcomes[1]
    got, big, left = outcomes[0]
    assert got == want + want and left == 0
    assert big[0] is fastmq.MessageTooLarge, big


@pytest.mark.parametrize("name", ["put", "put_bytes", "put_many", "put_many_bytes"])
def test_a_keyed_write_that_cannot_fit_its_tag_is_refused_the_same_either_way(mq, name):
    """The tag counts against max_message_size: the same MessageTooLarge
    (naming the tag for one message, "nothing was sent" for a batch) and
    nothing written."""
    q = mq.Queue(max_message_size=1000, authkey=KEY)
    fits, over = b"f" * 980, b"o" * 981
    arg = {"put": over, "put_bytes": over, "put_many": [fits, over],
           "put_many_bytes": [fits, over]}[name]
    if name == "put":
        arg = b"o" * 975             # pickled: 975 + a few bytes, + the tag > 1000
    bound = _outcome(lambda: getattr(q, name)(arg, timeout=1))
    reference = _outcome(lambda: getattr(fastmq.Queue, name)(q, arg, timeout=1))
    assert bound == reference
    assert bound[0] is fastmq.MessageTooLarge, bound
    if name in ("put", "put_bytes"):
        assert "authentication tag" in bound[1]
    assert q.qsize() == 0 or name == "put_many_bytes"
    _drain(q)
    q.put_bytes(fits)
    assert fastmq.Queue.get_bytes(q, timeout=5) == fits


def _two_handles(mq, maxsize):
    """Two handles of one named queue (two producers' views of one ring)."""
    from conftest import unique_name
    name = unique_name("runs")
    a = mq.create(name, maxsize=maxsize)
    return a, mq.open(name)


def test_batch_calls_keep_counts_depth_and_order_exact(mq):
    """put_many_bytes / get_many_bytes count their messages and move the ring's
    hints once per call: after runs that fill the queue, stop at Full, and
    interleave with single puts of another handle, the statistics, qsize and
    what comes out are exact."""
    q, other = _two_handles(mq, 64)
    sent, got = [], []
    n = 0
    for size in (1, 7, 62, 70, 40):
        batch = [b"m%05d" % (n + i) for i in range(size)]
        went = q.put_many_bytes(batch, timeout=0.01)
        assert went == min(size, 64 - (len(sent) - len(got)))
        sent += batch[:went]
        n += size
        assert q.qsize() == other.qsize() == len(sent) - len(got)
        got += q.get_many_bytes(5 if went % 2 else 64)
        other.put_bytes(b"s%05d" % n, timeout=1)
        sent.append(b"s%05d" % n)
        assert q.qsize() == len(sent) - len(got)
    while len(got) < len(sent):
        got += q.get_many_bytes(100, timeout=1)
    assert got == sent
    st = q.stats()
    assert (st["enqueued"], st["dequeued"], st["depth"]) == (len(sent), len(sent), 0)
    # a run that meets Full: what went in is counted, the rest is not
    assert q.put_many_bytes([b"f"] * 100, timeout=0.01) == 64
    assert q.stats()["enqueued"] == len(sent) + 64 and q.qsize() == 64
    assert other.put_many_bytes([b"g"], block=False) == 0
    assert q.get_many_bytes(100) == [b"f"] * 64
    assert q.stats()["dequeued"] == len(sent) + 64 and q.qsize() == 0


def test_batch_runs_of_two_producers_interleave_without_loss(mq):
    """Two handles' put_many_bytes runs on one ring (each reserves past its
    previous ticket and moves the tail hint once per call): every message
    arrives once, each handle's in its order, and the counts add up."""
    import threading
    a, b = _two_handles(mq, 32)
    errors = []

    def produce(q, tag):
        try:
            for k in range(50):
                batch = [b"%s%04d" % (tag, k * 10 + i) for i in range(10)]
                assert q.put_many_bytes(batch, timeout=10) == 10
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    ts = [threading.Thread(target=produce, args=(q, t)) for q, t in ((a, b"a"), (b, b"b"))]
    for t in ts:
        t.start()
    got = []
    try:
        while len(got) < 1000 and not errors:
            got += a.get_many_bytes(17, timeout=10)
    finally:
        for t in ts:
            t.join(10)
    assert not errors
    for tag in (b"a", b"b"):
        assert [m for m in got if m.startswith(tag)] == [b"%s%04d" % (tag, i) for i in range(500)]
    st = a.stats()
    assert a.qsize() == 0 and st["enqueued"] == st["dequeued"] == 1000


# ---- code that runs inside pickling and unpickling ------------------------ #
#
# put and get pickle and unpickle in the same call that writes or reads the
# ring: an object's __reduce__ / __setstate__ runs there, may raise, and may
# use the very queue it travels on. These classes live at module level so
# that pickle can find them again; _HOOK is what the current test makes them do.

_HOOK = {}


class _Hooked:
    """Pickles as its ``state``; pickling calls _HOOK["reduce"], unpickling
    _HOOK["setstate"] (each: the object), when set."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        hook = _HOOK.get("reduce")
        if hook is not None:
            hook(self)
        return (_Hooked, (None,), {"state": self.state})

    def __setstate__(self, d):
        self.state = d["state"]
        hook = _HOOK.get("setstate")
        if hook is not None:
            hook(self)


@pytest.fixture
def hooks():
    _HOOK.clear()
    yield _HOOK
    _HOOK.clear()


def _puts_and_gets(q):
    """(name, put, get) through the handle and through the class."""
    return [("handle", q.put, q.get),
            ("class", lambda obj, **kw: fastmq.Queue.put(q, obj, **kw),
             lambda **kw: fastmq.Queue.get(q, **kw))]


def test_an_error_raised_while_pickling_sends_nothing_either_way(mq, authkey, hooks):
    q = mq.Queue(maxsize=4, authkey=authkey)

    def fail(obj):
        raise RuntimeError("refused while pickling")
    hooks["reduce"] = fail
    for how, put, _ in _puts_and_gets(q):
        for obj in (_Hooked(1), {"k": _Hooked(1)}, [1, _Hooked(2)]):
            with pytest.raises(RuntimeError, match="refused while pickling"):
                put(obj)
            assert q.qsize() == 0, how


def test_an_error_raised_while_unpickling_consumes_that_message_only_either_way(
        mq, authkey, hooks):
    """Not a malformed message: the object's own code raised. The error comes
    out as it is, that message is consumed (handed over), the next is intact."""
    q = mq.Queue(maxsize=4, authkey=authkey)
    for how, put, get in _puts_and_gets(q):
        hooks.pop("setstate", None)
        put({"bad": _Hooked("x")})
        put("next")

        def fail(obj):
            raise ValueError("refused while unpickling")
        hooks["setstate"] = fail
        with pytest.raises(ValueError, match="refused while unpickling"):
            get(timeout=5)
        assert q.qsize() == 1, how
        assert get(timeout=5) == "next", how
        assert q.qsize() == 0, how


def test_unpickling_code_may_get_from_the_same_queue_either_way(mq, authkey, hooks):
    """A __setstate__ that itself calls get() on the queue it came from gets
    the next message: nothing is lost, nothing is seen twice or torn."""
    q = mq.Queue(maxsize=8, authkey=authkey)
    for how, put, get in _puts_and_gets(q):
        hooks.pop("setstate", None)
        big = bytes(range(256)) * 64                  # 16 KiB: a pool block
        put(_Hooked(("outer", big)))
        put(_Hooked(("middle", big[::-1])))
        put("last")

        def take_next(obj):
            if obj.state[0] == "outer":
                obj.inner = get(timeout=5)            # "middle", which takes "last"
            else:
                obj.inner = get(timeout=5)
        hooks["setstate"] = take_next
        got = get(timeout=5)
        assert got.state == ("outer", big), how
        assert got.inner.state == ("middle", big[::-1]), how
        assert got.inner.inner == "last", how
        assert q.qsize() == 0, how


def test_unpickling_code_may_put_into_the_same_full_queue_either_way(mq, authkey, hooks):
    """get hands its message over before the object's code runs: a
    __setstate__ may put into the queue it came from even when that message
    filled it (maxsize=1), without waiting for room."""
    q = mq.Queue(maxsize=1, authkey=authkey)
    for how, put, get in _puts_and_gets(q):
        hooks.pop("setstate", None)
        put(_Hooked("first"))

        def put_back(obj):
            put(("after", obj.state), block=False)     # Full if the slot were still held
        hooks["setstate"] = put_back
        assert get(timeout=5).state == "first", how
        hooks.pop("setstate")
        assert get(timeout=5) == ("after", "first"), how
        assert q.qsize() == 0, how


def test_pickling_code_may_put_into_the_same_queue_either_way(mq, authkey, hooks):
    """A __reduce__ that itself puts into the queue: its message goes in
    first (it is committed while the outer one is being pickled), both intact."""
    q = mq.Queue(maxsize=8, authkey=authkey)
    for how, put, get in _puts_and_gets(q):
        def put_inner(obj):
            hooks.pop("reduce")                       # once
            put(("inner", obj.state))
        hooks["reduce"] = put_inner
        put({"outer": _Hooked(7)})
        assert get(timeout=5) == ("inner", 7), how
        assert get(timeout=5)["outer"].state == 7, how
        assert q.qsize() == 0, how


def test_an_object_nested_too_deeply_to_pickle_is_recursion_error_either_way(mq, authkey):
    q = mq.Queue(maxsize=4, authkey=authkey)
    nested = []
    for _ in range(sys.getrecursionlimit() * 4):
        nested = [nested]
    for how, put, get in _puts_and_gets(q):
        with pytest.raises(RecursionError):
            put(nested)
        assert q.qsize() == 0, how
        put([[["fine"]]])                             # and the handle still works
        assert get(timeout=5) == [[["fine"]]], how


def _rebuild_buffered(data):
    return _Buffered(bytes(data), out_of_band=False)


class _Buffered:
    """Pickles its data as an out-of-band buffer (a PickleBuffer) or, with
    ``out_of_band=False``, in the pickle: one type, both kinds of message."""

    def __init__(self, data, out_of_band=True):
        self.data = bytearray(data)
        self.out_of_band = out_of_band

    def __reduce_ex__(self, protocol):
        if self.out_of_band:
            return (_rebuild_buffered, (pickle.PickleBuffer(self.data),))
        return (_rebuild_buffered, (bytes(self.data),))


def test_out_of_band_buffers_are_framed_every_time_and_only_when_present_either_way(
        mq, authkey):
    """However often a type with out-of-band buffers is sent, each message
    carries them as a frame (raw, not in the pickle); an object of that type
    that has none this time is a plain pickle; both decode to what was sent."""
    q = mq.Queue(maxsize=8, authkey=authkey)
    for how, put, get in _puts_and_gets(q):
        for i in range(200):                   # well past any caching of the type
            oob = i % 50 not in (7, 8, 30)
            data = bytes([i % 256]) * (100 + i)
            put(_Buffered(data, out_of_band=oob))
            raw = q.get_bytes(timeout=5)
            assert raw[:4] == b"\x00FQ5" if oob else raw[:2] == b"\x80\x05", (how, i)
            assert data in raw, (how, i)        # the buffer's bytes, unchanged
            q.put_bytes(raw)
            assert get(timeout=5).data == data, (how, i)
        assert q.qsize() == 0, how


def test_numpy_arrays_contiguous_or_not_round_trip_every_time_either_way(mq, authkey):
    np = pytest.importorskip("numpy")
    q = mq.Queue(maxsize=8, authkey=authkey)
    base = np.arange(64, dtype=np.float64).reshape(8, 8)
    for how, put, get in _puts_and_gets(q):
        for i in range(150):
            arr = base + i if i % 3 else (base + i)[:, ::2]      # every third strided
            put(arr)
            raw = q.get_bytes(timeout=5)
            # contiguous: its data raw in a frame; strided: copied into the pickle
            assert raw[:4] == b"\x00FQ5" if i % 3 else raw[:2] == b"\x80\x05", (how, i)
            q.put_bytes(raw)
            got = get(timeout=5)
            assert got.shape == arr.shape and (got == arr).all(), (how, i)
        assert q.qsize() == 0, how
