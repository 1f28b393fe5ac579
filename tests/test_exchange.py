"""Routing: fastmq.Exchange.

Every kind, shared bindings across real processes, topic patterns, one copy
per queue, hash stability, a round-robin turn shared by processes, missing
queues and names, and a writer killed while it rewrites the bindings. The
queues run on both backends (the exchange file itself is backend-free).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import fastmq
from fastmq.exchange import KINDS, topic_matches
from conftest import WITH_REDIS, not_on_redis, unique_name

pytestmark = [pytest.mark.timeout(120), pytest.mark.backends(*WITH_REDIS)]


class EX:
    """Queues and exchanges for one test; all unlinked at teardown."""

    def __init__(self, mq):
        self.mq, self.names, self.handles = mq, [], []

    def queues(self, n, **kw):
        names = [unique_name(f"xq{i}") for i in range(n)]
        return names, [self.mq.create(name, maxsize=kw.get("maxsize", 256)) for name in names]

    def create(self, kind, **kw):
        name = unique_name("x")
        ex = fastmq.Exchange.create(name, kind, _backend=self.mq.backend, **kw)
        self.names.append(name)
        self.handles.append(ex)
        return ex

    def open(self, name):
        ex = fastmq.Exchange.open(name, _backend=self.mq.backend)
        self.handles.append(ex)
        return ex

    def teardown(self):
        for ex in self.handles:
            ex.close()
        for name in self.names:
            try:
                fastmq.Exchange.unlink(name)
            except FileNotFoundError:
                pass


@pytest.fixture
def xs(mq):
    x = EX(mq)
    yield x
    x.teardown()


def drain(q):
    out = []
    while True:
        try:
            out.append(q.get(block=False))
        except fastmq.Empty:
            return out


# ------------------------------------------------------------------ kinds

def test_direct_routes_by_exact_key(xs):
    (a, b), (qa, qb) = xs.queues(2)
    ex = xs.create("direct")
    ex.bind(a, "red")
    ex.bind(b, "blue")
    ex.bind(b, "red")
    assert ex.publish("r1", "red") == 2
    assert ex.publish("b1", "blue") == 1
    assert ex.publish("g1", "green") == 0          # unroutable: nobody gets it
    assert ex.publish("e1") == 0                   # "" is a key like any other
    assert drain(qa) == ["r1"]
    assert drain(qb) == ["r1", "b1"]


def test_fanout_reaches_every_bound_queue_once(xs):
    names, qs = xs.queues(3)
    ex = xs.create("fanout")
    for n in names:
        ex.bind(n)
    ex.bind(names[0], "ignored")                   # key ignored: still one binding
    assert ex.bindings() == [(n, "") for n in names]
    assert ex.publish({"k": 1}, "anything") == 3
    assert [drain(q) for q in qs] == [[{"k": 1}]] * 3


@pytest.mark.parametrize("pattern,key,hit", [
    ("stock.#", "stock", True), ("stock.#", "stock.nyse.ibm", True),
    ("stock.*", "stock", False), ("stock.*", "stock.nyse", True),
    ("stock.*", "stock.nyse.ibm", False), ("*.nyse", "stock.nyse", True),
    ("#", "", True), ("#", "a.b.c", True), ("#.ibm", "ibm", True),
    ("a.#.z", "a.z", True), ("a.#.z", "a.b.c.z", True), ("a.#.z", "a.b.c", False),
    ("*", "", False), ("a", "a", True), ("a", "b", False), ("a.*.#", "a", False),
])
def test_topic_pattern_rules(pattern, key, hit):
    assert topic_matches(pattern, key) is hit


def test_topic_exchange_one_copy_per_queue(xs):
    (a, b), (qa, qb) = xs.queues(2)
    ex = xs.create("topic")
    ex.bind(a, "stock.#")
    ex.bind(a, "*.nyse")                           # also matches stock.nyse
    ex.bind(b, "weather.*")
    assert ex.publish(1, "stock.nyse") == 1        # two bindings, one copy
    assert ex.publish(2, "stock") == 1
    assert ex.publish(3, "weather.paris") == 1
    assert ex.publish(4, "weather") == 0
    assert drain(qa) == [1, 2] and drain(qb) == [3]
    with pytest.raises(ValueError, match="empty word"):
        ex.bind(a, "stock..nyse")


def test_hash_keeps_each_key_on_one_queue(xs):
    names, qs = xs.queues(3)
    ex = xs.create("hash")
    for n in names:
        ex.bind(n)
    keys = [f"user{i}" for i in range(60)]
    for rnd in range(3):
        for k in keys:
            assert ex.publish((k, rnd), k) == 1
    where = {}
    for i, q in enumerate(qs):
        for k, rnd in drain(q):
            where.setdefault(k, set()).add(i)
            assert rnd in (0, 1, 2)
    assert all(len(v) == 1 for v in where.values())      # a key never moves
    assert len({i for v in where.values() for i in v}) == 3   # and keys spread
    # the same choice from a fresh handle in another process (stable hash)
    code = ("import sys, zlib; names = sorted(sys.argv[1:]);"
            "print(','.join(names[zlib.crc32(k.encode()) % 3] for k in "
            f"{keys[:10]!r}))")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True,
                         text=True, timeout=30).stdout.strip().split(",")
    expect = [names[next(iter(where[k]))] for k in keys[:10]]
    assert out == expect


def _publish_turns(name, backend, n):
    ex = fastmq.Exchange.open(name, _backend=backend)
    for i in range(n):
        ex.publish(("child", i))
    ex.close()


def test_round_robin_turn_is_shared_by_processes(xs, children):
    names, qs = xs.queues(3)
    ex = xs.create("round_robin")
    for n in names:
        ex.bind(n)
    assert [ex.publish(i) for i in range(6)] == [1] * 6
    assert [drain(q) for q in qs] == [[0, 3], [1, 4], [2, 5]]
    procs = [children.start(_publish_turns, ex.name, xs.mq.backend, 30) for _ in range(2)]
    children.join(30, procs)
    counts = [len(drain(q)) for q in qs]
    assert counts == [20, 20, 20], counts                 # 60 turns, shared counter


def test_random_delivers_each_message_to_exactly_one(xs):
    names, qs = xs.queues(3)
    ex = xs.create("random")
    for n in names:
        ex.bind(n)
    for i in range(90):
        assert ex.publish(i) == 1
    got = [drain(q) for q in qs]
    assert sorted(v for g in got for v in g) == list(range(90))
    assert all(g for g in got)                            # 90 draws reach all 3


# ----------------------------------------------------- shared bindings

def _bind_in_child(name, backend, queue, key):
    ex = fastmq.Exchange.open(name, _backend=backend)
    ex.bind(queue, key)
    ex.close()


def test_binding_made_in_one_process_is_used_by_another(xs, children):
    (a,), (qa,) = xs.queues(1)
    ex = xs.create("direct")
    assert ex.publish("before", "k") == 0
    children.join(20, [children.start(_bind_in_child, ex.name, xs.mq.backend, a, "k")])
    assert ex.bindings() == [(a, "k")]
    assert ex.publish("after", "k") == 1
    ex.unbind(a, "k")
    ex.unbind(a, "k")                                     # idempotent
    assert ex.publish("gone", "k") == 0
    assert drain(qa) == ["after"]


def test_many_bindings_keep_the_file_small(xs):
    not_on_redis(xs.mq.backend, "the size of the /dev/shm exchange file; bindings are in the "
                                "server")
    names, _ = xs.queues(2)
    ex = xs.create("direct")
    for i in range(300):
        ex.bind(names[i % 2], f"key.{i}")
    assert len(ex.bindings()) == 300
    size = os.path.getsize(f"/dev/shm/fastmq-x-{ex.name}")
    assert size < 64 + 2 * len(repr(ex.bindings())) + 4096, size
    for i in range(300):
        ex.unbind(names[i % 2], f"key.{i}")
    assert ex.bindings() == []


# ------------------------------------------------------------ errors

def test_errors_are_typed_and_say_what_to_do(xs):
    with pytest.raises(FileNotFoundError, match="create it"):
        fastmq.Exchange.open(unique_name("nope"))
    with pytest.raises(ValueError, match="unknown exchange kind"):
        fastmq.Exchange.create(unique_name("x"), "headers")
    with pytest.raises(ValueError, match="invalid queue name"):
        fastmq.Exchange.create("../etc", "direct")
    ex = xs.create("direct")
    with pytest.raises(fastmq.QueueExists):
        fastmq.Exchange.create(ex.name, "direct")
    again = fastmq.Exchange.create(ex.name, "direct", exist_ok=True)
    again.close()
    with pytest.raises(ValueError, match="exists with kind 'direct'"):
        fastmq.Exchange.create(ex.name, "fanout", exist_ok=True)
    with pytest.raises(fastmq.QueueNotFound, match="create it first"):
        ex.bind(unique_name("noqueue"), "k")
    with pytest.raises(TypeError, match="routing key must be a str"):
        ex.publish(1, key=5)
    with pytest.raises(TypeError):
        fastmq.Exchange("x")


def test_unlinked_queue_is_skipped_not_counted(xs, mq):
    (a, b), (qa, qb) = xs.queues(2)
    ex = xs.create("fanout")
    ex.bind(a)
    ex.bind(b)
    mq.unlink(b)
    fresh = xs.open(ex.name)                      # has never opened b
    assert fresh.publish("x") == 1
    assert drain(qa) == ["x"]


def test_full_queue_raises_full_saying_who_got_it(xs):
    not_on_redis(xs.mq.backend, "a Redis publish is one script: all its queues or, when one "
                                "stays full, none (documented in fastmq._redis.exchange)")
    (a, b), (qa, qb) = xs.queues(2, maxsize=1)
    ex = xs.create("fanout")
    ex.bind(a)
    ex.bind(b)
    qb.put("filler")
    with pytest.raises(fastmq.Full, match="went to 1 of 2"):
        ex.publish("m", timeout=0.2)
    assert drain(qa) == ["m"]


def test_publish_many_objects_or_key_pairs(xs):
    (a, b), (qa, qb) = xs.queues(2)
    ex = xs.create("direct")
    ex.bind(a, "x")
    ex.bind(b, "y")
    assert ex.publish_many([("x", 1), ("y", 2), ("x", 3)]) == 3
    assert ex.publish_many([4, 5], key="y") == 2
    assert drain(qa) == [1, 3] and drain(qb) == [2, 4, 5]


def test_exchange_handle_pickles_by_name(xs):
    import pickle
    (a,), (qa,) = xs.queues(1)
    ex = xs.create("fanout")
    ex.bind(a)
    clone = pickle.loads(pickle.dumps(ex))
    try:
        assert clone.kind == "fanout" and clone.publish("p") == 1
    finally:
        clone.close()
    assert drain(qa) == ["p"]


def test_kinds_listed_in_the_contract():
    assert set(KINDS) == {"direct", "fanout", "topic", "hash", "round_robin", "random"}


# ------------------------------------------------ a writer killed mid-change

_KILLED_WRITER = """
import os, signal, sys
import fastmq
from fastmq import exchange
name, queue, when = sys.argv[1], sys.argv[2], sys.argv[3]
real = os.pwrite
calls = []
def dying_pwrite(fd, data, offset):
    calls.append(offset)
    if when == "body" and offset != 0:          # half of the new body, then die
        real(fd, data[: len(data) // 2], offset)
        os.kill(os.getpid(), signal.SIGKILL)
    if when == "header" and offset == 0 and len(calls) > 1:
        os.kill(os.getpid(), signal.SIGKILL)    # body written, header not
    return real(fd, data, offset)
ex = fastmq.Exchange.open(name)
exchange.os.pwrite = dying_pwrite
ex.bind(queue, "new")
print("survived")
"""


@pytest.mark.parametrize("when", ["body", "header"])
def test_writer_killed_mid_bind_leaves_old_bindings_intact(xs, backend, when):
    if backend != "native":
        pytest.skip("one run is enough: the exchange file does not depend on the backend")
    (a,), (qa,) = xs.queues(1)
    ex = xs.create("direct")
    ex.bind(a, "old")
    res = subprocess.run([sys.executable, "-c", _KILLED_WRITER, ex.name, a, when],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, FASTMQ_BACKEND=backend))
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stdout, res.stderr)
    fresh = xs.open(ex.name)
    assert fresh.bindings() == [(a, "old")]
    assert fresh.publish("still routed", "old") == 1
    fresh.bind(a, "new")                                  # and it can change again
    assert fresh.bindings() == [(a, "old"), (a, "new")]
    assert drain(qa) == ["still routed"]


def test_cli_lists_and_removes_exchanges(xs, backend):
    if backend != "native":
        pytest.skip("one run is enough: the command reads the exchange file")
    (a,), _ = xs.queues(1)
    ex = xs.create("topic")
    ex.bind(a, "a.#")

    def fmq(*args):
        return subprocess.run([sys.executable, "-m", "fastmq", *args], capture_output=True,
                              text=True, timeout=60)
    res = fmq("ls")
    assert res.returncode == 0, res.stderr
    row = next(line.split() for line in res.stdout.splitlines()
               if line.split()[:1] == [ex.name])
    assert row[1:] == ["topic", "1", "ok"]
    assert fmq("rm", ex.name).returncode == 0
    with pytest.raises(FileNotFoundError):
        fastmq.Exchange.open(ex.name)
    res = fmq("rm", ex.name)
    assert res.returncode == 1 and "no fastmq queue or exchange" in res.stderr
