"""The Queue / Message / Exchange behaviour on a redis:// location, against a
real private Redis server (see ``redis_support``).

What of the shared-memory suite does not apply here, and why:

* zero-copy (``test_zero_copy.py``, ``test_acks_zero_copy.py``, the
  ``reserve``/``recv``/``get(zero_copy=True)`` parts of the others): messages
  cross a network, so they are copies; those methods raise
  ``NotImplementedError`` here (``test_zero_copy_is_a_typed_error``);
* the C core, segment layout, corruption and ``/dev/shm`` leftovers
  (``test_c_core.py``, ``test_robustness.py``, ``test_statemachine.py``, the
  shm parts of ``test_crash.py`` / ``test_handles.py``): there is no segment;
  a process killed mid-operation cannot tear a server-side script, and the
  crash cases that remain (a killed consumer, a killed server) are in
  ``test_redis_failures.py``;
* anonymous queues (``fastmq.Queue()``): a Redis queue always has a name;
* "unlink keeps open handles working": over Redis, unlink deletes the data,
  so open handles get ``QueueNotFound`` (``test_unlink_deletes``);
* ``max_in_flight`` / ``TooManyInFlight``: no per-handle bound over Redis;
* a frozen (SIGSTOP) consumer is not told apart from a dead one: its
  heartbeat lapses and its leases come back (a network peer cannot tell).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import resource
import subprocess
import sys
import threading
import time

import pytest

import fastmq
from conftest import watch_until_removed
from redis_support import *  # noqa: F401,F403 - fixtures


def _child_echo(q_in, q_out, n):
    for _ in range(n):
        q_out.put(("echo", q_in.get(timeout=30)))
    q_in.close()
    q_out.close()


# ------------------------------------------------------------------ basics

def test_put_get_round_trip(rq):
    q = rq.create()
    assert isinstance(q, fastmq.Queue)
    objs = [1, "two", b"three", {"four": [4.0]}, None, (5, 6), 10 ** 40]
    for o in objs:
        q.put(o)
    assert q.qsize() == len(objs)
    assert [q.get(timeout=5) for _ in objs] == objs
    q.put_bytes(b"raw")
    q.put_bytes(bytearray(b"ba"))
    q.put_bytes(memoryview(b"mv"))
    assert [q.get_bytes() for _ in range(3)] == [b"raw", b"ba", b"mv"]
    assert q.empty()


def test_custom_serializer(rq):
    import json
    ser = (lambda o: json.dumps(o).encode(), lambda b: json.loads(b))
    q = rq.create(serializer=ser)
    q.put({"a": [1, 2]})
    assert q.get() == {"a": [1, 2]}
    q.put_bytes(b"[3]")
    assert rq.open(q.name, serializer=ser).get() == [3]


def test_fifo_and_batches(rq):
    q = rq.create()
    assert q.put_many(range(2500)) == 2500
    got = []
    while len(got) < 2500:
        got += q.get_many(700, timeout=5)
    assert got == list(range(2500))
    assert q.put_many_bytes([b"a", b"b"]) == 2
    assert q.get_many_bytes(10) == [b"a", b"b"]


def test_get_nonblocking_and_timeout(rq):
    q = rq.create()
    with pytest.raises(fastmq.Empty):
        q.get_nowait()
    with pytest.raises(fastmq.Empty):
        q.get(block=False)
    t = time.monotonic()
    with pytest.raises(fastmq.Empty):
        q.get(timeout=0.5)
    assert 0.45 <= time.monotonic() - t < 3
    with pytest.raises(fastmq.Empty):
        q.get_many(5, timeout=0.2)


def test_blocking_get_wakes_on_put_from_another_process(rq):
    q = rq.create()
    code = (f"import time, fastmq; time.sleep(0.5); "
            f"q = fastmq.Queue.open({q.name!r}, url={rq.url!r}); q.put('hello'); q.close()")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        t = time.monotonic()
        assert q.get(timeout=20) == "hello"
        assert time.monotonic() - t < 10
    finally:
        child.wait(timeout=30)
    assert child.returncode == 0


def test_maxsize_exact(rq):
    q = rq.create(maxsize=5)
    assert q.put_many(range(8), block=False) == 5
    assert q.full() and q.qsize() == 5
    with pytest.raises(fastmq.Full):
        q.put_nowait(9)
    with pytest.raises(fastmq.Full):
        q.put(9, timeout=0.2)
    assert q.put_many([1, 2], timeout=0.2) == 0
    assert q.get() == 0
    assert not q.full()
    q.put("x", block=False)
    assert q.qsize() == 5 and q.stats()["depth"] == 5


def _race_put(url, name, n, out):
    q = fastmq.Queue.open(name, url=url)
    ok = 0
    for i in range(n):
        try:
            q.put_nowait(i)
            ok += 1
        except fastmq.Full:
            pass
    out.put(ok)
    q.close()


def test_maxsize_exact_under_racing_producers(rq):
    q = rq.create(maxsize=37)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_put, args=(rq.url, q.name, 40, out)) for _ in range(4)]
    try:
        for p in procs:
            p.start()
        total = sum(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert total == 37
    assert q.qsize() == 37


def test_put_blocks_until_room(rq):
    q = rq.create(maxsize=1)
    q.put("a")
    got = []

    def consumer():
        time.sleep(0.5)
        got.append(q.get())
    t = threading.Thread(target=consumer)
    t.start()
    start = time.monotonic()
    q.put("b")                        # timeout=None: waits for the consumer
    waited = time.monotonic() - start
    t.join(10)
    assert got == ["a"] and q.get() == "b"
    assert 0.3 < waited < 10


def test_put_many_waits_for_the_rest(rq):
    q = rq.create(maxsize=3)
    got = []

    def consumer():
        while len(got) < 10:
            got.extend(q.get_many(10, timeout=20))
    t = threading.Thread(target=consumer)
    t.start()
    assert q.put_many(range(10)) == 10
    t.join(20)
    assert got == list(range(10))


def test_atomic_put_many(rq):
    q = rq.create(maxsize=5)
    q.put_many([0, 1, 2])
    with pytest.raises(fastmq.Full):
        q.put_many([3, 4, 5], atomic=True, block=False)
    assert q.qsize() == 3                            # nothing of it went in
    assert q.put_many([3, 4], atomic=True) == 2
    with pytest.raises(ValueError, match="never fit"):
        q.put_many(range(6), atomic=True)
    assert q.get_many(10) == [0, 1, 2, 3, 4]


def test_atomic_put_many_and_lease_beyond_luas_unpack_limit(rq):
    # Lua's unpack() stops at about 8000 values; a batch this size once failed
    # inside the script with a raw ResponseError.
    n = 20_000
    q = rq.create()
    assert q.put_many_bytes([b"%d" % i for i in range(n)], atomic=True) == n
    msgs = []
    deadline = time.monotonic() + 30
    while len(msgs) < n and time.monotonic() < deadline:
        msgs += q.get_messages(n - len(msgs), timeout=10)
    assert [bytes(m.data) for m in msgs] == [b"%d" % i for i in range(n)]
    assert q.ack_many(msgs) == n
    assert q.qsize() == 0


def test_message_too_large(rq):
    q = rq.create(max_message_size=100)
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_bytes(b"x" * 101)
    with pytest.raises(fastmq.MessageTooLarge):
        q.put_many_bytes([b"ok", b"x" * 101])
    assert q.qsize() == 0                            # nothing of the batch went in
    q.put_bytes(b"x" * 100)


def test_capacity_bytes_bound(rq):
    q = rq.create(max_message_size=10, capacity_bytes=25)
    assert q.put_many_bytes([b"x" * 10] * 3, block=False) == 2
    assert q.stats()["bytes_in_use"] == 20
    q.get_bytes()
    assert q.stats()["bytes_in_use"] == 10


def test_bad_arguments(rq, rurl):
    with pytest.raises(ValueError):
        fastmq.Queue.create("../etc", url=rurl)
    with pytest.raises(TypeError):
        rq.create(maxsize="3")
    q = rq.create()
    with pytest.raises(ValueError):
        q.get(timeout=float("nan"))
    with pytest.raises(fastmq.Empty):
        q.get(timeout=-1)                # one non-blocking try, as on shared memory
    with pytest.raises(TypeError):
        q.put_bytes(12)


def test_exists_notfound_unlink(rq, rurl, rname):
    q = rq.create(rname, maxsize=7)
    with pytest.raises(fastmq.QueueExists):
        fastmq.Queue.create(rname, url=rurl)
    again = fastmq.Queue.create(rname, url=rurl, exist_ok=True, maxsize=99)
    assert again.maxsize == 7                       # its own sizes win
    again.close()
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open("no-such-queue", url=rurl)
    with pytest.raises(FileNotFoundError):
        fastmq.Queue.unlink("no-such-queue", url=rurl)
    q.put(1)
    assert rq.open(rname).get() == 1


def test_unlink_deletes(rq, rurl):
    q = rq.create()
    q.put(1)
    fastmq.Queue.unlink(q.name, url=rurl)
    with pytest.raises(fastmq.QueueNotFound):
        q.put(2)
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open(q.name, url=rurl)


def test_fastmq_url_environment(rq, rurl, rname, monkeypatch):
    monkeypatch.setenv("FASTMQ_URL", rurl)
    q = fastmq.Queue.create(rname)
    try:
        assert q.backend == "redis"
        q.put(5)
        assert fastmq.Queue.open(rname).get() == 5
    finally:
        q.close()
        fastmq.Queue.unlink(rname)
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open(rname)


def test_locations():
    with pytest.raises(ValueError, match="must be absolute"):
        fastmq.Queue.create("x", url="file:relative/q")   # (durable: test_durable.py)
    with pytest.raises(ValueError, match="unsupported fastmq location"):
        fastmq.Queue.open("x", url="amqp://u:secret@h/")
    with pytest.raises(ValueError, match="needs a host"):
        fastmq.Queue.open("x", url="redis://")
    try:
        fastmq.Queue.open("x", url="amqp://u:secret@h/")
    except ValueError as exc:
        assert "secret" not in str(exc)


def test_missing_client_library_names_the_extra():
    code = ("import sys; sys.modules['redis'] = None\n"
            "import fastmq\n"
            "try:\n"
            "    fastmq.Queue.open('x', url='redis://127.0.0.1:1/0')\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "pip install fastmq[redis]" in out.stdout, out.stderr


def test_zero_copy_is_a_typed_error(rq):
    q = rq.create()
    for call in (lambda: q.reserve(10), lambda: q.recv(timeout=0),
                 lambda: q.reserve_array((2,), "f8"), lambda: q.commit(None),
                 lambda: q.get(zero_copy=True)):
        with pytest.raises(NotImplementedError, match="redis"):
            call()


def test_close(rq):
    q = rq.create()
    other = rq.open(q.name)
    q.close()
    q.close()                                       # idempotent
    assert q.closed
    with pytest.raises(fastmq.QueueClosed):
        q.put(1)
    with pytest.raises(fastmq.QueueClosed):
        q.get_nowait()
    other.put(1)                                    # other handles unaffected
    assert other.get() == 1
    with rq.open(q.name) as h:
        h.put(2)
    assert h.closed


def test_close_wakes_a_blocked_get(rq):
    q = rq.create()
    errors = []

    def blocked():
        try:
            q.get()                                 # forever
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.5)
    start = time.monotonic()
    q.close()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - start < 2.5
    assert isinstance(errors[0], fastmq.QueueClosed)


def test_get_many_keeps_messages_behind_a_bad_one(rq):
    q = rq.create()
    q.put(1)
    q.put_bytes(b"not a pickle")
    q.put(3)
    assert q.get_many(10) == [1]
    with pytest.raises(Exception):
        q.get()
    assert q.get() == 3


def test_pickled_handle_through_spawn_child(rq):
    q_in, q_out = rq.create(), rq.create()
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_child_echo, args=(q_in, q_out, 2))
    p.start()
    try:
        q_in.put("a")
        q_in.put(pickle.loads(pickle.dumps(q_out)))   # a handle through a queue
        assert q_out.get(timeout=60) == ("echo", "a")
        echoed = q_out.get(timeout=60)
        assert echoed[0] == "echo" and echoed[1].name == q_out.name
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0


# ----------------------------------------------------------- at-least-once

def test_lease_ack(rq):
    q = rq.create()
    q.put("job")
    m = q.get_message(timeout=5)
    assert m.value == "job"
    assert fastmq._serialize.decode(bytes(m.data)) == "job" and m.data.readonly
    assert m.delivery_count == 1 and not m.redelivered
    assert q.qsize() == 0
    p = q.pending()
    assert len(p) == 1
    assert set(p[0]) >= {"id", "pid", "idle", "delivery_count"}
    assert p[0]["pid"] == os.getpid() and p[0]["id"] == m.id and p[0]["delivery_count"] == 1
    m.ack()
    m.ack()                                          # idempotent
    assert m.acked and q.pending() == []
    with pytest.raises(fastmq.Empty):
        q.get_message(block=False)
    with pytest.raises(fastmq.LeaseLost):
        m.nack()


def test_late_ack_is_lease_lost_and_redelivered_at_the_back(rq):
    q = rq.create()
    q.put("a")
    m = q.get_message(lease=0.3)
    q.put("b")
    time.sleep(0.6)
    with pytest.raises(fastmq.LeaseLost):            # nobody took it yet
        m.ack()
    first = q.get_message(timeout=5)
    second = q.get_message(timeout=5)
    assert (first.value, first.delivery_count) == ("b", 1)
    assert (second.value, second.delivery_count) == ("a", 2) and second.redelivered
    q.ack_many([first, second])


def test_expired_lease_comes_back_to_a_waiting_consumer(rq):
    q = rq.create()
    q.put("x")
    q.get_message(lease=0.5)                          # dropped, never acked
    m = q.get_message(timeout=10)
    assert (m.value, m.delivery_count) == ("x", 2)
    m.ack()


def test_touch(rq):
    q = rq.create()
    q.put("x")
    m = q.get_message(lease=0.4)
    m.touch(5)
    time.sleep(0.7)
    m.ack()                                           # still ours
    q.put("y")
    m = q.get_message(lease=0.2)
    time.sleep(0.4)
    with pytest.raises(fastmq.LeaseLost):
        m.touch(5)


def test_nack_requeues_at_the_back(rq):
    q = rq.create()
    q.put_many(["a", "b"])
    m = q.get_message()
    m.nack()
    assert [x.value for x in (q.get_message(), q.get_message())] == ["b", "a"]
    assert q.stats()["redelivered"] == 1


def test_max_deliveries_and_dead_letter(rq):
    dlq = rq.create()
    q = rq.create(max_deliveries=3, dead_letter=dlq.name)
    q.put({"v": 1})
    counts = []
    for _ in range(3):
        m = q.get_message(timeout=5)
        counts.append(m.delivery_count)
        m.nack()
    assert counts == [1, 2, 3]
    with pytest.raises(fastmq.Empty):
        q.get_message(timeout=0.2)
    assert dlq.get(timeout=5) == {"v": 1}
    assert q.stats()["dead_lettered"] == 1
    q.put("now")
    q.get_message().nack(requeue=False)
    assert dlq.get(timeout=5) == "now"


def test_expiry_past_max_deliveries_dead_letters(rq):
    dlq = rq.create()
    q = rq.create(max_deliveries=2, dead_letter=dlq.name)
    q.put("e")
    q.get_message(lease=0.2)
    time.sleep(0.3)
    m = q.get_message(timeout=5, lease=0.2)
    assert m.delivery_count == 2
    time.sleep(0.3)
    q.redeliver_expired()
    assert dlq.get(timeout=5) == "e"


def test_dead_letter_none_drops_and_counts(rq):
    q = rq.create(max_deliveries=1)
    q.put("x")
    q.get_message().nack()
    s = q.stats()
    assert s["dead_lettered"] == 1 and s["depth"] == 0 and s["bytes_in_use"] == 0


def test_empty_payloads_through_every_path(rq):
    """Zero-byte messages through get, lease/ack, ack_many, nack, expiry and
    the dead-letter path: each settles its (zero) bytes without a server
    error and the byte count comes back to 0."""
    dlq = rq.create()
    q = rq.create(max_deliveries=2, dead_letter=dlq.name)
    q.put_bytes(b"")
    assert q.get_bytes(timeout=5) == b""
    q.put_many_bytes([b""] * 3)
    ms = q.get_messages(3, timeout=5)
    assert [bytes(m.data) for m in ms] == [b""] * 3
    ms[0].ack()
    assert q.ack_many(ms[1:]) == 2
    q.put_bytes(b"")
    q.get_message(timeout=5).nack()                   # back, delivery 2
    q.get_message(timeout=5).nack()                   # past max_deliveries
    assert dlq.get_bytes(timeout=5) == b""
    q.put_bytes(b"")
    q.get_message(timeout=5).nack(requeue=False)
    assert dlq.get_bytes(timeout=5) == b""
    q.put_bytes(b"")
    q.get_message(timeout=5, lease=0.1)
    time.sleep(0.25)
    q.redeliver_expired()
    assert bytes(q.get_message(timeout=5).data) == b""    # (left leased: closed below)
    assert q.stats()["bytes_in_use"] == 0 and dlq.stats()["bytes_in_use"] == 0


def test_ack_many(rq):
    q = rq.create()
    q.put_many(range(50))
    ms = q.get_messages(100)
    assert [m.value for m in ms] == list(range(50))
    assert q.ack_many(ms[:10]) == 10
    assert q.ack_many(ms[:20]) == 10                 # already-acked not counted
    assert q.ack_many(ms) == 30
    assert q.pending() == []
    q.put("late")
    m = q.get_messages(lease=0.2)
    time.sleep(0.4)
    assert q.ack_many(m) == 0                        # lost lease: not counted


def test_stats_keys(rq):
    q = rq.create(maxsize=10)
    q.put_many(range(3))
    q.get()
    m = q.get_message()
    s = q.stats()
    for k in ("depth", "capacity", "enqueued", "dequeued", "bytes_in_use", "producers",
              "consumers", "redelivered", "abandoned", "dead_lettered"):
        assert k in s
    assert (s["depth"], s["capacity"], s["enqueued"], s["dequeued"]) == (1, 10, 3, 1)
    assert s["in_flight"] == 1 and s["producers"] == 1 and s["consumers"] >= 1
    assert s["bytes_in_use"] > 0
    m.ack()


def test_close_gives_leases_back(rq):
    q = rq.create()
    q.put("x")
    h = rq.open(q.name)
    h.get_message(lease=60)
    h.close()
    m = q.get_message(timeout=5)
    assert (m.value, m.delivery_count) == ("x", 2)


# ------------------------------------------------------------------ exchanges

@pytest.fixture
def rx(rurl):
    made = []

    def make(kind, **kw):
        name = f"x-{os.urandom(6).hex()}"
        ex = fastmq.Exchange.create(name, kind, url=rurl, **kw)
        made.append(ex)
        return ex
    try:
        yield make
    finally:
        for ex in made:
            ex.close()
            try:
                fastmq.Exchange.unlink(ex.name, url=rurl)
            except fastmq.QueueNotFound:
                pass


def test_exchange_direct(rq, rx, rurl):
    a, b = rq.create(), rq.create()
    ex = rx("direct")
    assert isinstance(ex, fastmq.Exchange) and ex.kind == "direct"
    ex.bind(a.name, "red")
    ex.bind(b.name, "blue")
    ex.bind(b.name, "red")
    assert ex.publish("r", key="red") == 2
    assert ex.publish("g", key="green") == 0
    assert (a.get(), b.get()) == ("r", "r")
    other = fastmq.Exchange.open(ex.name, url=rurl)          # bindings are shared
    assert sorted(other.bindings()) == sorted(ex.bindings())
    ex.unbind(b.name, "red")
    assert other.publish("only-a", key="red") == 1
    other.close()
    with pytest.raises(fastmq.QueueNotFound):
        ex.bind("no-such-queue", "x")
    with pytest.raises(FileNotFoundError):
        fastmq.Exchange.open("no-such-exchange", url=rurl)


def test_exchange_topic(rq, rx):
    a, b = rq.create(), rq.create()
    ex = rx("topic")
    ex.bind(a.name, "stock.#")
    ex.bind(a.name, "stock.*.nyse")              # a queue matched twice: one copy
    ex.bind(b.name, "*.usd.*")
    assert ex.publish(1, key="stock") == 1        # '#' matches zero words
    assert ex.publish(2, key="stock.usd.nyse") == 2
    assert ex.publish(3, key="bond.usd") == 0
    assert a.get_many(10) == [1, 2] and b.get_many(10) == [2]
    with pytest.raises(ValueError):
        ex.bind(a.name, "bad..pattern")


def test_exchange_fanout_and_publish_many(rq, rx):
    qs = [rq.create() for _ in range(3)]
    ex = rx("fanout")
    for q in qs:
        ex.bind(q.name, "ignored")
    assert ex.publish("all") == 3
    assert ex.publish_many(["x", "y"]) == 6
    for q in qs:
        assert q.get_many(10) == ["all", "x", "y"]


def test_exchange_hash_is_stable(rq, rx):
    qs = [rq.create() for _ in range(3)]
    ex = rx("hash")
    for q in qs:
        ex.bind(q.name)
    for i in range(30):
        ex.publish(i, key=f"k{i % 5}")
    seen = {}
    for q in qs:
        try:
            for v in q.get_many(100, timeout=0.1):
                seen.setdefault(f"k{v % 5}", set()).add(q.name)
        except fastmq.Empty:
            pass
    assert len(seen) == 5 and all(len(s) == 1 for s in seen.values())


def test_exchange_round_robin_shared_turn(rq, rx, rurl):
    qs = [rq.create() for _ in range(3)]
    ex = rx("round_robin")
    for q in qs:
        ex.bind(q.name)
    other = fastmq.Exchange.open(ex.name, url=rurl)
    for i in range(6):
        (ex if i % 2 else other).publish(i)
    other.close()
    assert [q.qsize() for q in qs] == [2, 2, 2]


def test_exchange_random(rq, rx):
    qs = [rq.create() for _ in range(2)]
    ex = rx("random")
    for q in qs:
        ex.bind(q.name)
    assert sum(ex.publish(i) for i in range(40)) == 40
    assert sum(q.qsize() for q in qs) == 40


def test_exchange_full_target_is_all_or_nothing(rq, rx):
    small, big = rq.create(maxsize=1), rq.create()
    ex = rx("fanout")
    ex.bind(small.name)
    ex.bind(big.name)
    assert ex.publish("first") == 2
    with pytest.raises(fastmq.Full):
        ex.publish("second", timeout=0.3)
    assert big.qsize() == 1                       # went to none of them
    fastmq.Queue.unlink(small.name, url=rq.url)   # a deleted bound queue is skipped
    assert ex.publish("third", timeout=1) == 1


def test_exchange_exists_and_kind(rx, rurl):
    ex = rx("direct")
    with pytest.raises(fastmq.QueueExists):
        fastmq.Exchange.create(ex.name, "direct", url=rurl)
    with pytest.raises(ValueError):
        fastmq.Exchange.create(ex.name, "fanout", url=rurl, exist_ok=True)
    with pytest.raises(ValueError):
        fastmq.Exchange.create("y", "nope", url=rurl)
    assert ex.name in fastmq._redis.RedisExchange.list_names(rurl)


# -------------------------------------------------------------------- asyncio

def test_asyncio(rq):
    q = rq.create(maxsize=1)

    async def main():
        async def later():
            await asyncio.sleep(0.3)
            await q.put_async("a")
        task = asyncio.ensure_future(later())
        assert await q.get_async(timeout=10) == "a"
        await task
        await q.put_async("b")
        blocked = asyncio.ensure_future(q.put_async("c", timeout=10))
        await asyncio.sleep(0.3)
        assert not blocked.done()                     # maxsize=1: waits for room
        assert await q.get_many_async(10, timeout=5) == ["b"]
        await blocked
        m = await q.get_message_async(timeout=5)
        assert m.value == "c"
        m.ack()
        with pytest.raises(fastmq.Empty):
            await q.get_async(timeout=0.3)
        with pytest.raises(fastmq.Full):
            await q.put_async("d")
            await q.put_async("e", timeout=0.2)
    asyncio.run(main())


def test_asyncio_idle_await_costs_no_cpu(rq):
    q = rq.create()

    async def main():
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.monotonic()
        with pytest.raises(fastmq.Empty):
            await q.get_async(timeout=3)
        after = resource.getrusage(resource.RUSAGE_SELF)
        return (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                time.monotonic() - t)
    cpu, wall = asyncio.run(main())
    assert wall >= 2.9
    assert cpu < 0.3 * wall * 0.5                    # far from a spinning core


def test_idle_blocking_get_costs_no_cpu(rq):
    q = rq.create()
    before = resource.getrusage(resource.RUSAGE_SELF)
    with pytest.raises(fastmq.Empty):
        q.get(timeout=3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime < 0.45


def test_asyncio_cancelled_get_loses_nothing(rq):
    q = rq.create()

    async def main():
        t = asyncio.ensure_future(q.get_async())
        await asyncio.sleep(0.2)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        q.put("kept")
        return await q.get_async(timeout=5)
    assert asyncio.run(main()) == "kept"


def _lose_one_cancel(client, command, took_one=False):
    """Make ``client`` lose the next cancel that reaches it right after a
    ``command`` returns (with a message, if ``took_one``), as redis-py does on
    Python < 3.12: it bounds each socket write with ``asyncio.wait_for``,
    which returns normally when its inner future finishes at the moment its
    task is cancelled. Returns an event set when the cancel can land (for
    the next second)."""
    real = client.execute_command
    reached = asyncio.Event()

    async def execute_command(*args, **options):
        res = await real(*args, **options)
        if (args[0] == command and not reached.is_set()
                and (not took_one or (isinstance(res, list) and res and res[0]))):
            reached.set()
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass                    # lost: the command's result is returned
        return res
    client.execute_command = execute_command
    return reached


@pytest.mark.parametrize("call,command", [
    ("get_async", "XREAD"), ("get_async", "EVALSHA"), ("get_many_async", "XREAD"),
    ("get_message_async", "XREAD"), ("put_async", "XREAD"), ("put_async", "EVALSHA")])
def test_a_cancel_lost_inside_a_redis_command_still_ends_the_await(rq, call, command):
    """A cancel that redis-py loses must still end the awaiting call at once,
    and the call must leave the queue as it found it."""
    q = rq.create(maxsize=1)
    if call == "put_async":
        q.put("full")                           # so the put waits for room

    async def main():
        client, _ = q._link._async()
        reached = _lose_one_cancel(client, command)
        args = ("waits",) if call == "put_async" else ()
        task = asyncio.ensure_future(getattr(q, call)(*args))   # no timeout: waits forever
        await asyncio.wait_for(reached.wait(), 10)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        assert done, f"{call} went on waiting after a cancel lost inside {command}"
        assert task.cancelled()
        await asyncio.sleep(0.1)                # the cancelled attempt settles
    asyncio.run(main())
    if call == "put_async":
        assert q.get(timeout=5) == "full" and q.qsize() == 0
    else:
        q.put("kept")
        assert q.get(timeout=5) == "kept"
    assert q.qsize() == 0


def test_a_message_a_cancelled_take_kept_reaches_a_take_already_waiting(rq):
    """A get_async cancelled while its take is in flight keeps what the take
    took on the handle; another get_async of that handle, already waiting,
    must get it (not wait on for a message already here)."""
    q = rq.create()
    other = rq.open(q.name)

    async def main():
        client, _ = q._link._async()
        reached = _lose_one_cancel(client, "EVALSHA", took_one=True)
        first = asyncio.ensure_future(q.get_async())
        await asyncio.sleep(0.3)                  # waiting on an empty queue
        other.put("m")
        await asyncio.wait_for(reached.wait(), 10)  # its take holds "m"
        waiting = asyncio.ensure_future(q.get_async(timeout=10))
        await asyncio.sleep(0.3)                  # it found nothing and waits
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        t0 = time.monotonic()
        got = await waiting
        return got, time.monotonic() - t0
    got, waited = asyncio.run(main())
    assert got == "m"
    assert waited < 5                             # one wait slice, not the timeout
    assert q.qsize() == 0


# ----------------------------------------------------------- command line

def test_cli(rq, rurl):
    q = rq.create()
    q.put_many(range(3))
    m = q.get_message()
    env = dict(os.environ)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fastmq", *args], capture_output=True,
                              text=True, env=env, timeout=60)
    out = run("ls", "--url", rurl)
    assert out.returncode == 0 and q.name in out.stdout, out.stderr
    out = run("stat", q.name, "--url", rurl)
    assert out.returncode == 0 and "depth" in out.stdout and " 2" in out.stdout
    out = run("pending", q.name, "--url", rurl)
    assert out.returncode == 0 and str(os.getpid()) in out.stdout
    m.ack()
    out = run("rm", q.name, "--url", rurl)
    assert out.returncode == 0
    out = run("stat", q.name, "--url", rurl)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    env["FASTMQ_URL"] = rurl                          # the default location
    q2 = rq.create()
    out = run("ls")
    assert q2.name in out.stdout


def test_cli_stat_watch_shows_rates_and_stops_when_removed(rq, rurl):
    # The same watch as on shared memory: counters with their rate, the
    # interval; the queue removed meanwhile ends it with exit 1, no traceback.
    q = rq.create()
    rc, out, err = watch_until_removed(
        ["stat", q.name, "--watch", "--interval", "0.2", "--url", rurl], q,
        lambda: fastmq.Queue.unlink(q.name, url=rurl))
    assert rc == 1, (out, err)
    assert "Traceback" not in err, err
    assert "every 0.2 s" in out
    enq = [line for line in out.splitlines() if line.split()[:1] == ["enqueued"]]
    assert any(line.endswith("/s)") and "(0.0/s)" not in line for line in enq), enq


def test_no_server_fails_saying_how_to_get_one(tmp_path):
    test = tmp_path / "test_needs_server.py"
    test.write_text("from redis_support import *\n"
                    "def test_x(rq):\n"
                    "    pass\n")
    env = dict(os.environ, FASTMQ_TEST_REDIS_SERVER=str(tmp_path / "no-such-redis-server"))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(test)], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode != 0
    assert "apt-get install redis-server" in out.stdout and "fastmq[test]" in out.stdout
    assert "1 error" in out.stdout or "1 failed" in out.stdout


# ------------------------------------------------------------- Redis Cluster

def _node_keys(nodes):
    import redis
    out = {}
    for n in nodes:
        r = redis.Redis(port=n.port)
        out[n.port] = [k.decode() for k in r.scan_iter(match="fmq:*", count=1000)]
        r.close()
    return out


def test_cluster_queues_spread_one_slot_each(redis_cluster):
    url = redis_cluster[0].url + "?cluster=1"
    names = [f"cl-{i}" for i in range(8)]
    qs = [fastmq.Queue.create(n, url=url, maxsize=4) for n in names]
    try:
        for q in qs:
            assert q.put_many(range(6), block=False) == 4            # exact maxsize
            m = q.get_message()
            m.nack()
            assert [x.value for x in q.get_messages(10)] == [1, 2, 3, 0]
            assert q.stats()["in_flight"] == 4
        keys = _node_keys(redis_cluster)
        homes = {}
        for port, ks in keys.items():
            for k in ks:
                homes.setdefault(k.split("{")[1].split("}")[0], set()).add(port)
        assert set(homes) == set(names)
        assert all(len(ports) == 1 for ports in homes.values())   # one node per queue
        assert len({p for ports in homes.values() for p in ports}) >= 2   # spread
    finally:
        for q, n in zip(qs, names):
            q.close()
            fastmq.Queue.unlink(n, url=url)


def test_cluster_blocking_get_and_asyncio(redis_cluster):
    url = redis_cluster[1].url + "?cluster=1"
    q = fastmq.Queue.create("cl-block", url=url)
    try:
        def late():
            with fastmq.Queue.open("cl-block", url=url) as other:
                other.put("late")
        t = threading.Timer(0.5, late)
        t.start()
        assert q.get(timeout=20) == "late"
        t.join()

        async def main():
            later = asyncio.ensure_future(q.put_async("a"))
            got = await q.get_async(timeout=10)
            await later
            return got
        assert asyncio.run(main()) == "a"
    finally:
        q.close()
        fastmq.Queue.unlink("cl-block", url=url)


def test_cluster_refuses_exchanges(redis_cluster):
    with pytest.raises(ValueError, match="single Redis server"):
        fastmq.Exchange.create("cl-x", "direct", url=redis_cluster[0].url + "?cluster=1")


def test_ack_many_whole_and_partial_batches(rq):
    q = rq.create()
    q.put_many(range(5))
    ms = q.get_messages(5)
    ms[0].touch(30)                     # now a batch of its own
    ms[1].nack()                        # settled on its own: the rest is not whole
    assert q.ack_many(ms) == 4
    assert all(m.acked for m in ms if m is not ms[1])
    again = q.get_message(timeout=5)
    assert (again.value, again.delivery_count) == (1, 2)
    again.ack()
    q.put_many(range(3))
    whole = q.get_messages(3)
    assert q.ack_many(whole + whole) == 3                # duplicates count once
    assert q.pending() == [] and q.stats()["bytes_in_use"] == 0
    q.put_many(range(2))
    ms = q.get_messages(2)
    res = q._link.call("ack_batches", q._mkey, (q._prefix, ms[0]._consumer, ms[0]._batch, 3))
    assert res == [-1]                                    # not whole: refused as a batch
    res = q._link.call("ack_batches", q._mkey, (q._prefix, "someone-else", ms[0]._batch, 2))
    assert res == [0]                                     # not the owner
    assert q.ack_many(ms) == 2


def test_whole_batch_ack_after_expiry_is_lost(rq):
    q = rq.create()
    q.put_many(range(3))
    ms = q.get_messages(3, lease=0.2)
    time.sleep(0.4)
    assert q.ack_many(ms) == 0
    assert sorted(m.value for m in q.get_messages(3, timeout=5)) == [0, 1, 2]


# ------------------------------------------------- the client's hot path

def test_scripts_come_back_after_the_server_flushed_them(rq):
    """The hot path sends EVALSHA only: a server that lost its script cache
    (SCRIPT FLUSH, a restart) gets the script loaded again, once."""
    import redis
    q = rq.create()
    q.put(1)
    m = q.get_message()
    raw = redis.Redis.from_url(rq.url)
    try:
        raw.script_flush()
        q.put(2)                                     # put: reloaded, applied once
        m.ack()                                      # ack: reloaded
        raw.script_flush()
        assert q.get() == 2                          # get: reloaded
        assert q.qsize() == 0 and q.stats()["in_flight"] == 0
    finally:
        raw.close()


def test_a_call_interrupted_mid_reply_never_hands_its_reply_to_the_next(rq):
    """Ctrl-C (any exception) between sending a script and reading its reply:
    the connection is dropped, so the next call cannot read the stale reply
    as its own."""
    q = rq.create()
    q.put_many([1, 2, 3])
    conn = q._link._conn()
    real = conn.read_response
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)
    conn.read_response = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            q.get()                                  # the server took 1; its reply is lost
    finally:
        conn.read_response = real
    assert q.get() == 2                              # not the stale reply [1]
    assert q.get() == 3
    assert q.qsize() == 0


def _child_uses_inherited_handle(q, out):
    try:
        for i in range(100):
            q.put(("child", i))
        out.put("ok")
    except BaseException as exc:  # noqa: BLE001
        out.put(repr(exc))


def test_a_forked_child_gets_connections_of_its_own(rq):
    """The per-thread connection of the parent is not shared with a forked
    child (both would read each other's replies)."""
    q = rq.create()
    q.put("before")
    assert q.get() == "before"                       # the parent's connection exists
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child_uses_inherited_handle, args=(q, out))
    try:
        p.start()
        got = []
        for i in range(200):                         # the parent keeps using its own
            q.put(("parent", i))
            got.append(q.get(timeout=10))
        assert out.get(timeout=30) == "ok"
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    while q.qsize():
        got.append(q.get(timeout=10))
    # Every reply went to the call that asked: each message exactly once.
    assert sorted(got) == sorted([("parent", i) for i in range(200)] +
                                 [("child", i) for i in range(100)])


def _child_consumes_with_inherited_handle(q, takes, out):
    try:
        held = q.in_flight                           # the parent's lease is not ours
        value = ident = None
        if takes:
            m = q.get_message(timeout=10)
            value = m.value
            ident = [p["consumer"] for p in q.pending() if p["id"] == m.id][0]
        q.close()                                    # gives back what *this* process holds
        out.put((held, value, ident, os.getpid()))
    except BaseException as exc:  # noqa: BLE001
        out.put(repr(exc))


@pytest.mark.parametrize("takes", [False, True], ids=["idle-child", "consuming-child"])
def test_a_forked_child_is_a_consumer_of_its_own(rq, takes):
    """A child forked while the parent holds a lease gets a consumer
    identity of its own: it does not count the parent's lease as its own,
    and closing its inherited handle gives back only what the child took
    (nothing, if it took nothing), never the parent's lease."""
    q = rq.create()
    for v in ("parent", "child"):
        q.put(v)
    m = q.get_message(timeout=10)
    assert m.value == "parent" and q.in_flight == 1
    parent_id = q.pending()[0]["consumer"]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_child_consumes_with_inherited_handle, args=(q, takes, out))
    try:
        p.start()
        got = out.get(timeout=30)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()
    assert not isinstance(got, str), got
    held, value, child_id, child_pid = got
    assert held == 0
    if takes:
        assert value == "child"
        assert child_id != parent_id and f":{child_pid}:" in child_id
    # "child" is back (or was never taken); the parent's lease is untouched.
    assert q.get(timeout=10) == "child"
    assert [x["consumer"] for x in q.pending()] == [parent_id]
    m.ack()                                          # still the parent's lease
    assert q.in_flight == 0 and q.qsize() == 0


@pytest.mark.parametrize("lock", ["handle", "heartbeats", "connections"])
def test_a_lock_a_parent_thread_held_at_fork_does_not_wedge_the_child(rq, lock):
    """A thread of the parent holds one of the client's locks when another
    thread forks: the child's first calls (a new consumer identity, its own
    heartbeat thread, its own connection) complete."""
    from _fork_support import fork_while_held

    from fastmq._redis import queue as redis_queue
    q = rq.create()
    q.put("one")
    held = {"handle": q._lock, "heartbeats": redis_queue._heartbeats.lock,
            "connections": q._link._conns_lock}[lock]

    def action():
        m = q.get_message(timeout=5)        # identity, heartbeat, connection
        m.ack()
        return m.value
    assert fork_while_held(held, action) == repr("one")
    assert q.qsize() == 0 and q.in_flight == 0


def test_threads_each_use_the_handle_at_once(rq):
    """Several threads on one handle: each call gets its own reply."""
    q = rq.create()
    errors = []

    def worker(k):
        try:
            for i in range(200):
                q.put((k, i))
            for _ in range(200):
                q.get_message(timeout=10).ack()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    s = q.stats()
    assert s["enqueued"] == 800 and s["dequeued"] == 800 and s["in_flight"] == 0


def test_a_batch_settled_piece_by_piece_then_whole(rq):
    """Members of one lease batch settled one by one (ack, nack, touch), the
    rest acked together: every count and pending() stay exact."""
    q = rq.create()
    q.put_many(list(range(6)))
    ms = q.get_messages(6)
    assert [m.value for m in ms] == list(range(6))
    assert len({m.id for m in ms}) == 6
    ms[1].ack()
    ms[3].nack()                                    # back at the end, delivery 2
    ms[0].touch(60)
    assert q.stats()["in_flight"] == 4
    assert sorted(p["id"] for p in q.pending()) == sorted(m.id for m in (ms[0], ms[2], ms[4],
                                                                           ms[5]))
    with pytest.raises(fastmq.LeaseLost):
        ms[3].ack()
    assert q.ack_many(ms) == 4                       # 0 (touched), 2, 4, 5
    assert all(m.acked for m in ms if m is not ms[3])
    again = q.get_message(timeout=5)
    assert again.value == 3 and again.delivery_count == 2
    again.ack()
    s = q.stats()
    assert s["in_flight"] == 0 and s["depth"] == 0 and s["dequeued"] == 6
    assert s["bytes_in_use"] == 0


def test_a_departing_consumer_gives_back_in_lease_order(rq):
    """More than 9 leases in a batch (ids <n>.1 ... <n>.12): they come back
    in the order they were leased, not in the order of their ids as numbers."""
    q = rq.create()
    other = rq.open(q.name)
    q.put_many(list(range(12)))
    assert len(q.get_messages(12)) == 12
    q.close()                                       # departs: leases go back
    assert other.get_many(12, timeout=5) == list(range(12))


def test_unlink_leaves_no_key_behind(rq):
    """Leases held in several batches, touched ones, dead letters parked:
    unlink removes every key of the queue."""
    import redis
    q = rq.create(dead_letter=None)
    q.put_many(list(range(20)))
    a = q.get_messages(5)
    q.get_messages(5)
    a[0].touch(30)
    a[1].ack()
    name = q.name
    fastmq.Queue.unlink(name, url=rq.url)
    raw = redis.Redis.from_url(rq.url)
    try:
        assert raw.keys(f"fmq:{{{name}}}:*") == []
    finally:
        raw.close()


@pytest.mark.parametrize("how", ["lease", "touch"])
def test_a_short_lease_after_long_ones_still_expires_on_time(rq, how):
    """Scripts skip the reclaim work while nothing can be due (a bound kept
    in the queue's meta hash): a shorter deadline added later (a short lease,
    or a touch to a short one) must move that bound, or it would expire late."""
    q = rq.create()
    other = rq.open(q.name)
    q.put_many(["long", "short"])
    q.get_message(lease=60)
    if how == "lease":
        q.get_message(lease=0.3)
    else:
        m = q.get_message(lease=60)
        m.touch(0.3)
    time.sleep(0.8)
    again = other.get_message(block=False)          # due now: given back at once
    assert again.value == "short" and again.delivery_count == 2
    again.ack()
