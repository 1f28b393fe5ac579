"""Every backend implements the contract of ``fastmq/_ring_protocol.py``.

Two parts, and a new backend must pass both:

* **Shape**: a ring backend module (``_backend._MODULES``: native
  ``fastmq._core`` and pure ``fastmq._pure.ring``) exports every name of
  ``_ring_protocol.MODULE_NAMES``; each class has every method of its
  protocol class, and each method accepts the contract's parameters -- same
  names, same kinds, in the same order -- with anything extra optional.
* **Behaviour**: a small core (put/get order, get_many, Empty/Full, leases:
  lease/ack/nack/touch/ack_many, the in-flight count, settlement states,
  LeaseLost, close) run on a ring of each backend.

Redis (``fastmq._redis``) is not a ring backend: ``RedisQueue`` replaces the
Queue layer itself (each operation is one server-side script), so it has no
Ring or Consumer to check. What it shares with the rings is the public
surface above them, so the last part runs the same behavioural core through
``fastmq.Queue`` on every backend, Redis included, and checks that a Redis
message has the public surface of ``fastmq.Message``.
"""
from __future__ import annotations

import inspect
import time
import uuid

import pytest

import fastmq
from fastmq import _backend, _contract, _ring_protocol
from conftest import WITH_REDIS, not_on_redis

pytestmark = pytest.mark.backends(*WITH_REDIS)
RINGS = pytest.mark.backends("native", "pure")

PROTOCOL_CLASSES = ("Ring", "Reservation", "ReceivedView", "Consumer", "LeasedMessage")


def _ring_module(backend):
    return _backend.ring_module(backend)


def _contract_methods(proto):
    """(name, function) of every method the protocol class defines."""
    out = []
    for name, value in vars(proto).items():
        if name.startswith("_") or name == "Protocol":
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            out.append((name, value))
    return out


def _params(fn, bound):
    params = list(inspect.signature(fn).parameters.values())
    if bound and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return params


def _check_signature(where, want_fn, have_fn, bound):
    want = _params(want_fn, bound)
    have = _params(have_fn, bound)
    problems = []
    for i, w in enumerate(want):
        if i >= len(have):
            problems.append(f"missing parameter {w.name!r}")
            continue
        h = have[i]
        if h.name != w.name or h.kind != w.kind:
            problems.append(f"parameter {i}: contract {w.name} ({w.kind.description}), "
                            f"backend {h.name} ({h.kind.description})")
        elif w.default is not inspect.Parameter.empty and h.default is inspect.Parameter.empty:
            problems.append(f"parameter {w.name!r} must be optional")
    for h in have[len(want):]:
        if h.default is inspect.Parameter.empty and h.kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            problems.append(f"extra parameter {h.name!r} must be optional")
    assert not problems, f"{where}: {problems}"


# ------------------------------------------------------------------ shape

def test_the_contract_names_every_backend_module():
    assert set(_backend._MODULES) == set(_backend.BACKENDS)
    for name in PROTOCOL_CLASSES:
        assert name in _ring_protocol.MODULE_NAMES
        assert hasattr(_ring_protocol, name)


@RINGS
def test_a_backend_exports_every_contract_name(backend):
    module = _ring_module(backend)
    missing = [n for n in _ring_protocol.MODULE_NAMES if not hasattr(module, n)]
    assert not missing, (module.__name__, missing)
    assert module.backend_name == backend
    assert module.MAX_MESSAGE_SIZE == _contract.MAX_MESSAGE_SIZE == 2 ** 32 - 1
    assert callable(module.list_segments)


@RINGS
@pytest.mark.parametrize("cls_name", PROTOCOL_CLASSES)
def test_every_contract_method_exists_with_its_parameters(backend, cls_name):
    module = _ring_module(backend)
    proto, impl = getattr(_ring_protocol, cls_name), getattr(module, cls_name)
    methods = _contract_methods(proto)
    assert methods or cls_name == "LeasedMessage"
    for name, want in methods:
        have = inspect.getattr_static(impl, name, None)
        assert have is not None, f"{module.__name__}.{cls_name} has no {name}()"
        kind_want = type(inspect.getattr_static(proto, name))
        if kind_want in (classmethod, staticmethod):
            assert isinstance(have, kind_want) or kind_want is classmethod and \
                inspect.ismethod(getattr(impl, name)), \
                f"{module.__name__}.{cls_name}.{name} must be a {kind_want.__name__}"
        fn = getattr(impl, name)
        assert callable(fn), f"{module.__name__}.{cls_name}.{name} is not callable"
        _check_signature(f"{module.__name__}.{cls_name}.{name}", want, fn,
                         bound=kind_want is not staticmethod)


@RINGS
def test_a_leased_message_type_has_the_contract_fields(backend):
    cls = _ring_module(backend).LeasedMessage
    for field in _contract.MESSAGE_FIELDS + ("data", "redelivered", "id", "token"):
        assert hasattr(cls, field), (cls, field)
    m = cls(None, 3, 7, b"xy", 2)
    assert (m._consumer, m._slot, m._token, m._payload, m.delivery_count) == (None, 3, 7,
                                                                              b"xy", 2)
    assert m._state == _contract.HELD
    assert bytes(m.data) == b"xy" and m.data.readonly
    assert m.redelivered and m.id == 3 and m.token == 7


def test_fastmq_message_builds_on_a_backend_leased_message():
    bases = {_ring_module(b).LeasedMessage for b in _backend.BACKENDS
             if b != "native" or _backend.native_available()}
    assert any(issubclass(fastmq.Message, base) for base in bases)


# -------------------------------------------------------------- behaviour

@pytest.fixture
def ring(backend):
    module = _ring_module(backend)
    name = f"fastmq-anon-{uuid.uuid4().hex[:16]}"
    r = module.Ring.create(name, maxsize=8, max_message_size=1 << 16,
                           capacity_bytes=1 << 20, anonymous=True, max_deliveries=3)
    try:
        yield r
    finally:
        r.close()


def _consumer(ring):
    """A Consumer of ``ring`` that builds plain subclasses of the backend's
    own LeasedMessage (``fastmq.Message`` needs a Queue behind it)."""
    owner = object()
    backend = "pure" if "_pure" in type(ring).__module__ else "native"
    if backend not in _MESSAGE_TYPES:
        base = _ring_module(backend).LeasedMessage
        _MESSAGE_TYPES[backend] = type("Message", (base,), {})
    return ring.consumer(owner, _MESSAGE_TYPES[backend]), owner


_MESSAGE_TYPES = {}


@RINGS
def test_core_put_get_in_order(ring):
    for i in range(5):
        ring.put(b"m%d" % i, None)
    assert ring.qsize() == 5
    assert ring.get(None) == b"m0"
    assert ring.get_many(3, 0) == [b"m1", b"m2", b"m3"]
    assert ring.put_many([b"m5", b"m6"], None) == 2
    assert ring.get_many(10, 0) == [b"m4", b"m5", b"m6"]
    with pytest.raises(fastmq.Empty):
        ring.get(0)
    with pytest.raises(fastmq.Empty):
        ring.get(0.05)
    with pytest.raises(fastmq.MessageTooLarge):
        ring.put(b"x" * ((1 << 16) + 1), 0)
    for i in range(8):
        ring.put(b"f", 0)
    with pytest.raises(fastmq.Full):
        ring.put(b"f", 0)
    with pytest.raises(fastmq.Full):
        ring.put(b"f", 0.05)


@RINGS
def test_core_refuses_a_max_message_size_beyond_the_contract_limit(backend):
    module = _ring_module(backend)
    name = f"fastmq-anon-{uuid.uuid4().hex[:16]}"
    with pytest.raises(ValueError, match="max_message_size"):
        module.Ring.create(name, maxsize=4, max_message_size=_contract.MAX_MESSAGE_SIZE + 1,
                           capacity_bytes=_contract.MAX_MESSAGE_SIZE + 2 ** 20,
                           anonymous=True).close()


@RINGS
def test_core_recv_is_a_view_not_a_lease(ring):
    ring.put(b"hello", None)
    got = ring.recv(None)
    assert not hasattr(got, "ack")
    assert bytes(got.view) == b"hello" and got.nbytes == 5
    got.close()
    assert ring.qsize() == 0 and ring.pending() == []


@RINGS
def test_core_lease_ack_and_the_in_flight_count(ring):
    consumer, owner = _consumer(ring)
    assert consumer.owner is owner and consumer.in_flight == 0
    for i in range(4):
        ring.put(b"L%d" % i, None)
    got = consumer.lease(3, None, 30.0)
    assert [bytes(m.data) for m in got] == [b"L0", b"L1", b"L2"]
    assert all(m._state == _contract.HELD and m._consumer is consumer for m in got)
    assert [m.delivery_count for m in got] == [1, 1, 1]
    assert consumer.in_flight == 3 and ring.qsize() == 1
    assert sorted(p["id"] for p in ring.pending()) == sorted(m.id for m in got)
    consumer.ack(got[0])
    assert got[0]._state == _contract.ACKED and consumer.in_flight == 2
    consumer.ack(got[0])                          # a second ack: no-op
    assert consumer.in_flight == 2
    assert consumer.ack_many(got) == 2            # the ACKED one is skipped
    assert [m._state for m in got] == [_contract.ACKED] * 3
    assert consumer.in_flight == 0 and len(ring.pending()) == 0
    assert consumer.ack_many(got) == 0


@RINGS
def test_core_nack_requeues_at_the_back_with_a_delivery_more(ring):
    consumer, _ = _consumer(ring)
    ring.put(b"a", None)
    ring.put(b"b", None)
    (a,) = consumer.lease(1, None, 30.0)
    consumer.nack(a)
    assert a._state == _contract.NACKED and consumer.in_flight == 0
    with pytest.raises(fastmq.LeaseLost):
        consumer.ack(a)                           # settled: nothing to ack
    b, again = consumer.lease(2, None, 30.0)
    assert (bytes(b.data), bytes(again.data)) == (b"b", b"a")
    assert again.delivery_count == 2 and again.redelivered
    consumer.nack(again, False)                   # dead-letter now (no DLQ: dropped)
    consumer.ack(b)
    assert ring.qsize() == 0 and ring.pending() == []
    assert ring.stats()["dead_lettered"] == 1


@RINGS
def test_core_touch_keeps_a_lease_and_expiry_loses_it(ring):
    consumer, _ = _consumer(ring)
    ring.put(b"t", None)
    ring.put(b"u", None)
    t, u = consumer.lease(2, None, 0.2)
    consumer.touch(t, 30.0)
    assert t._state == _contract.HELD
    with pytest.raises(ValueError):
        consumer.touch(t, -1.0)
    time.sleep(0.4)                               # u's lease runs out; t's does not
    with pytest.raises(fastmq.LeaseLost):
        consumer.ack(u)
    assert u._state == _contract.LOST and consumer.in_flight == 1
    with pytest.raises(fastmq.LeaseLost):
        consumer.touch(u, 1.0)                    # already lost
    consumer.ack(t)
    assert consumer.in_flight == 0
    ring.redeliver_due()
    (back,) = consumer.lease(1, 5.0, 30.0)
    assert bytes(back.data) == b"u" and back.delivery_count == 2
    consumer.ack(back)


@RINGS
def test_core_ack_many_settles_lost_leases_without_raising(ring):
    consumer, _ = _consumer(ring)
    ring.put(b"short", None)
    (short,) = consumer.lease(1, None, 0.1)
    ring.put(b"long", None)
    (long,) = consumer.lease(1, None, 30.0)
    time.sleep(0.3)
    assert consumer.ack_many([short, long]) == 1
    assert (short._state, long._state) == (_contract.LOST, _contract.ACKED)
    assert consumer.in_flight == 0


@RINGS
def test_core_a_consumer_settles_only_its_own_messages(ring):
    mine, _ = _consumer(ring)
    other, _ = _consumer(ring)
    ring.put(b"x", None)
    (m,) = mine.lease(1, None, 30.0)
    with pytest.raises(ValueError):
        other.ack(m)
    with pytest.raises(ValueError):
        other.ack_many([m])
    with pytest.raises(TypeError, match="Message"):
        mine.ack_many([b"not a message"])
    assert m._state == _contract.HELD and mine.in_flight == 1
    mine.ack(m)


@RINGS
def test_core_lease_waits_then_raises_empty(ring):
    consumer, _ = _consumer(ring)
    t0 = time.monotonic()
    with pytest.raises(fastmq.Empty):
        consumer.lease(1, 0.1, 30.0)
    assert time.monotonic() - t0 < 5
    with pytest.raises(fastmq.Empty):
        consumer.lease(1, 0, 30.0)
    with pytest.raises(ValueError):
        consumer.lease(0, 0, 30.0)
    assert consumer.in_flight == 0


@RINGS
def test_core_close_gives_leases_back_and_refuses_calls(backend, ring):
    module = _ring_module(backend)
    other = module.Ring.open(ring.name)
    try:
        consumer, _ = _consumer(other)
        ring.put(b"c", None)
        (m,) = consumer.lease(1, None, 60.0)
        other.close()
        other.close()                             # idempotent
        assert other.closed
        with pytest.raises(fastmq.QueueClosed):
            other.get(0)
        with pytest.raises(fastmq.QueueClosed):
            consumer.ack(m)
        assert m._state == _contract.HELD          # not settled by a failed call
        assert ring.get(5.0) == b"c"              # given back at once, not on expiry
    finally:
        other.close()


@RINGS
def test_core_dead_letters_are_taken_and_acked_by_a_consumer(backend):
    module = _ring_module(backend)
    name = f"fastmq-anon-{uuid.uuid4().hex[:16]}"
    r = module.Ring.create(name, maxsize=4, max_message_size=1024, capacity_bytes=1 << 20,
                           anonymous=True, max_deliveries=1, dead_letter="some-dlq")
    try:
        consumer, _ = _consumer(r)
        r.put(b"poison", None)
        (m,) = consumer.lease(1, None, 30.0)
        consumer.nack(m)                          # past max_deliveries: parked
        letters = consumer.take_dead_letters(10)
        assert [p for _, _, p in letters] == [b"poison"]
        consumer.ack_dead(*letters[0][:2])
        with pytest.raises(fastmq.LeaseLost):
            consumer.ack_dead(*letters[0][:2])
        assert consumer.take_dead_letters(10) == [] and r.stats()["dead_lettered"] == 1
    finally:
        r.close()


# --------------------------------------------- the public layer, Redis included

def test_queue_core_on_every_backend(mq, backend):
    q = mq.Queue(maxsize=8)
    q.put_many(["a", "b", "c"])
    assert q.get(timeout=5) == "a"
    m = q.get_message(timeout=5)
    assert m.value == "b" and m.delivery_count == 1 and not m.acked
    m.ack()
    assert m.acked
    n = q.get_message(timeout=5)
    n.nack()
    with pytest.raises(fastmq.LeaseLost):
        n.ack()
    again = q.get_message(timeout=5)
    assert again.value == "c" and again.delivery_count == 2
    again.touch(30)
    assert q.ack_many([again]) == 1
    assert q.pending() == []
    q.close()
    with pytest.raises(fastmq.QueueClosed):
        q.get(block=False)


def test_queue_in_flight_count_on_every_backend(mq, backend):
    not_on_redis(backend, "in_flight / max_in_flight are not available over Redis")
    q = mq.Queue(maxsize=8)
    q.put_many(range(4))
    got = q.get_messages(3, timeout=5)
    assert q.in_flight == 3
    got[0].ack()
    got[1].nack()
    assert q.in_flight == 1
    assert q.ack_many(got) == 1 and q.in_flight == 0


def test_a_redis_message_has_the_public_message_surface():
    try:
        from fastmq._redis import RedisMessage
    except ImportError as exc:
        pytest.fail(f"fastmq._redis does not import ({exc!r}): pip install fastmq[redis]")
    # fastmq.Message's documented surface (its class docstring).
    public = ("value", "data", "delivery_count", "redelivered", "id", "acked", "ack", "nack",
              "touch")
    assert all(hasattr(fastmq.Message, n) for n in public)
    missing = sorted(n for n in public if not hasattr(RedisMessage, n))
    assert not missing, missing


def test_every_layer_uses_the_one_message_size_limit(mq, backend):
    from fastmq import queue
    limit = _contract.MAX_MESSAGE_SIZE
    assert queue.MAX_MESSAGE_SIZE == limit
    for b in _backend.BACKENDS:
        if b != "native" or _backend.native_available():
            assert _ring_module(b).MAX_MESSAGE_SIZE == limit
    with pytest.raises(ValueError, match="max_message_size"):
        mq.Queue(maxsize=4, max_message_size=limit + 1)
