"""The hot methods a handle binds from its ring behave as the Queue's own.

A handle without an authkey binds the native ring's compiled forms of
``put``/``get``/``put_many``/``get_many`` (default codec only) and of the
``*_bytes`` methods (see ``Queue._bind_compiled``). Each test here states the
behaviour of the public method, and checks it both through the handle (the
compiled form, on the native backend) and through the class
(``fastmq.Queue.put_bytes(q, ...)``, the layer's own code), on both backends:
the two must agree argument for argument, message for message.
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
def test_hot_methods_take_block_and_timeout_as_the_layer_does(mq, name, block, timeout,
                                                               expected):
    args, _ = METHODS[name]
    q = mq.Queue(maxsize=8)
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
def test_batch_reads_check_max_messages_as_the_layer_does(mq, name, value, error, fragment):
    q = mq.Queue()
    q.put(1)
    bound = _outcome(lambda: getattr(q, name)(value, timeout=1))
    reference = _outcome(lambda: getattr(fastmq.Queue, name)(q, value, timeout=1))
    assert bound[0] is error and fragment in bound[1], bound
    assert bound == reference
    assert q.qsize() == 1                      # nothing was taken by the refused calls


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hot_methods_of_a_closed_handle_raise_queue_closed(mq, name):
    args, _ = METHODS[name]
    q = mq.Queue()
    q.close()
    bound = _outcome(lambda: getattr(q, name)(*args, timeout=1))
    reference = _outcome(lambda: getattr(fastmq.Queue, name)(q, *args, timeout=1))
    assert bound[0] is fastmq.QueueClosed, bound
    assert bound == reference


def test_default_batch_size_is_the_layers(mq):
    q = mq.Queue(maxsize=DEFAULT_GET_MANY + 10)
    q.put_many(range(DEFAULT_GET_MANY + 10))
    assert len(q.get_many(timeout=5)) == DEFAULT_GET_MANY
    q.put_many_bytes([PAYLOAD] * DEFAULT_GET_MANY)
    assert len(fastmq.Queue.get_many(q, timeout=5)) == 10
    assert len(q.get_many_bytes(timeout=5)) == DEFAULT_GET_MANY


def test_objects_round_trip_the_same_through_handle_and_class(mq):
    """The compiled codec writes exactly the layer's bytes and reads them."""
    q = mq.Queue()
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


def test_an_undecodable_message_is_bad_message_with_its_bytes_either_way(mq):
    q = mq.Queue()
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


def test_an_oversize_object_in_a_batch_sends_nothing(mq):
    q = mq.Queue(max_message_size=1000)
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


def test_a_custom_serializer_is_used_by_put_and_get(mq):
    calls = []

    def dumps(obj):
        calls.append("dumps")
        return repr(obj).encode()

    def loads(data):
        calls.append("loads")
        return ("loaded", bytes(data))

    q = mq.Queue(serializer=(dumps, loads))
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
def test_hot_methods_of_a_handle_have_the_layers_signature(mq, name):
    import inspect
    q = mq.Queue()
    bound = inspect.signature(getattr(q, name))
    reference = inspect.signature(getattr(fastmq.Queue, name))
    want = [(p.name, p.kind, p.default) for p in list(reference.parameters.values())[1:]]
    assert [(p.name, p.kind, p.default) for p in bound.parameters.values()] == want



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
