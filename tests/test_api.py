"""Queue API semantics: close, context manager, stats, sizes, batches,
serializer, threads."""
from __future__ import annotations

import collections
import json
import pickle
import threading
import time

import pytest

import fastmq
from conftest import WITH_REDIS, not_on_redis

pytestmark = pytest.mark.backends(*WITH_REDIS)

STATS_KEYS = {"depth", "capacity", "enqueued", "dequeued", "bytes_in_use", "producers",
              "consumers", "redelivered", "abandoned", "dead_lettered"}


def test_module_surface():
    assert isinstance(fastmq.__version__, str) and fastmq.__version__
    assert fastmq.backend in ("native", "pure")
    for name in ("Empty", "Full", "QueueClosed", "MessageTooLarge", "QueueNotFound",
                 "QueueExists", "CorruptQueue", "LeaseLost", "Error", "Queue", "cleanup"):
        assert hasattr(fastmq, name), name
    import queue
    assert issubclass(fastmq.Empty, queue.Empty)
    assert issubclass(fastmq.Full, queue.Full)
    assert issubclass(fastmq.QueueClosed, ValueError)
    assert issubclass(fastmq.MessageTooLarge, ValueError)
    assert issubclass(fastmq.QueueNotFound, FileNotFoundError)
    assert issubclass(fastmq.QueueExists, FileExistsError)
    assert issubclass(fastmq.CorruptQueue, fastmq.Error)
    assert issubclass(fastmq.LeaseLost, fastmq.Error)


def test_backend_env_var_selects_backend(backend):
    not_on_redis(backend, "FASTMQ_BACKEND picks a shared-memory ring; redis is chosen by url")
    from conftest import run_python
    res = run_python("import fastmq; print(fastmq.backend)", env={"FASTMQ_BACKEND": backend})
    assert res.stdout.strip() == backend, res.stderr


def test_backend_env_var_rejects_unknown():
    from conftest import run_python
    res = run_python("import fastmq", env={"FASTMQ_BACKEND": "bogus"})
    assert res.returncode != 0 and "ImportError" in res.stderr, res.stderr


def test_roundtrip_objects_exactly(mq):
    q = mq.Queue()
    objs = [None, True, 0, -1, 2 ** 100, 1.5, float("inf"), "text", "ü€𝄞", b"", b"\x00" * 10,
            bytearray(b"ba"), [1, [2, [3]]], (1, "a"), {"k": {"n": [1]}}, {1, 2, 3},
            frozenset({"x"}), complex(1, 2), range(3), collections.OrderedDict(a=1),
            ValueError("boom")]
    for o in objs:
        q.put(o)
    for o in objs:
        got = q.get(timeout=5)
        if isinstance(o, Exception):
            assert type(got) is type(o) and got.args == o.args
        else:
            assert got == o and type(got) is type(o)


def test_close_semantics(mq, qname):
    q = mq.create(qname)
    other = mq.open(qname)
    q.put("x")
    q.close()
    q.close()  # idempotent
    for call in (lambda: q.put(1), lambda: q.get(block=False), lambda: q.put_bytes(b"x"),
                 lambda: q.get_bytes(block=False), lambda: q.put_nowait(1),
                 lambda: q.get_nowait(), lambda: q.put_many([1]), lambda: q.get_many(2),
                 lambda: q.qsize(), lambda: q.stats()):
        with pytest.raises(fastmq.QueueClosed):
            call()
        with pytest.raises(ValueError):
            call()
    # the other handle is unaffected
    assert other.get(timeout=5) == "x"
    other.put("y")
    assert other.get(timeout=5) == "y"


def test_close_anonymous_copy_leaves_original(mq):
    q = mq.Queue()
    copy = pickle.loads(pickle.dumps(q))
    copy.put("from copy")
    copy.close()
    assert q.get(timeout=5) == "from copy"


def test_join_thread_and_cancel_join_thread_accepted(mq):
    q = mq.Queue()
    q.put(1)
    q.cancel_join_thread()
    q.close()
    q.join_thread()


def test_context_manager(mq):
    with mq.Queue() as q:
        q.put(1)
        assert q.get(timeout=5) == 1
    with pytest.raises(fastmq.QueueClosed):
        q.put(2)


def test_context_manager_closes_on_exception(mq):
    with pytest.raises(RuntimeError):
        with mq.Queue() as q:
            raise RuntimeError("inside")
    with pytest.raises(fastmq.QueueClosed):
        q.get_nowait()


def test_stats_keys_and_counters(mq):
    q = mq.Queue(maxsize=10)
    st = q.stats()
    assert STATS_KEYS <= set(st), STATS_KEYS - set(st)
    assert st["capacity"] == 10
    assert st["depth"] == st["enqueued"] == st["dequeued"] == 0
    for k in STATS_KEYS:
        assert isinstance(st[k], int) and st[k] >= 0, (k, st[k])
    q.put(1)
    q.put(b"x" * 5000)
    q.put_many([2, 3])
    q.get()
    st = q.stats()
    assert (st["enqueued"], st["dequeued"], st["depth"]) == (4, 1, 3)
    assert st["bytes_in_use"] > 0
    q.get_many(10)
    st = q.stats()
    assert (st["enqueued"], st["dequeued"], st["depth"]) == (4, 4, 0)
    assert st["redelivered"] == st["abandoned"] == st["dead_lettered"] == 0
    # this process both put and got: it counts as a live producer and consumer
    assert st["producers"] >= 1 and st["consumers"] >= 1


def test_stats_shared_between_handles(mq, qname):
    a = mq.create(qname)
    b = mq.open(qname)
    a.put_many(range(5))
    assert b.stats()["enqueued"] == 5
    b.get()
    assert a.stats()["dequeued"] == 1
    assert a.qsize() == b.qsize() == 4


def test_qsize_empty_full(mq):
    q = mq.Queue(maxsize=3)
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)
    q.put(1)
    assert (q.qsize(), q.empty(), q.full()) == (1, False, False)
    q.put(2)
    q.put(3)
    assert (q.qsize(), q.empty(), q.full()) == (3, False, True)
    q.get()
    assert (q.qsize(), q.empty(), q.full()) == (2, False, False)


def test_put_many_get_many_return_values(mq):
    q = mq.Queue(maxsize=3)
    assert q.put_many([], block=False) == 0
    assert q.put_many(iter(["a", "b", "c", "d", "e"]), block=False) == 3
    assert q.put_many(["f"], block=False) == 0
    assert q.get_many(2, block=False) == ["a", "b"]
    assert q.get_many(10, block=False) == ["c"]
    with pytest.raises(fastmq.Empty):
        q.get_many(10, block=False)
    assert q.put_many((x for x in range(2))) == 2  # blocking, room for all
    got = q.get_many(100, timeout=1)
    assert got == [0, 1] and isinstance(got, list)


def test_get_many_default_max_returns_at_least_one(mq):
    q = mq.Queue()
    q.put_many(range(5))
    got = q.get_many()
    assert 1 <= len(got) <= 5 and got == list(range(len(got)))


def test_get_many_does_not_wait_for_more(mq):
    q = mq.Queue()
    q.put("only")
    t0 = time.monotonic()
    assert q.get_many(10, timeout=5) == ["only"]
    assert time.monotonic() - t0 < 1.0


def test_put_many_blocking_returns_all(mq):
    """Blocking put_many without timeout puts all, waiting for room."""
    q = mq.Queue(maxsize=4)
    out = []

    def consume():
        while len(out) < 50:
            out.extend(q.get_many(7, timeout=10))

    t = threading.Thread(target=consume)
    t.start()
    try:
        assert q.put_many(range(50)) == 50
    finally:
        t.join(20)
    assert not t.is_alive()
    assert out == list(range(50))


def test_put_many_partial_with_timeout_keeps_order(mq):
    q = mq.Queue(maxsize=5)
    q.put_many(["x", "y"])
    assert q.put_many(range(10), timeout=0.05) == 3
    assert q.get_many(10, block=False) == ["x", "y", 0, 1, 2]


def test_get_bytes_and_put_bytes_raw(mq):
    q = mq.Queue()
    q.put_bytes(b"\x80raw not a pickle")
    q.put_bytes(b"")
    got = q.get_bytes(timeout=5)
    assert got == b"\x80raw not a pickle" and isinstance(got, bytes)
    assert q.get_bytes(timeout=5) == b""


def test_put_is_pickle_protocol_5_by_default(mq):
    q = mq.Queue()
    q.put({"a": 1})
    raw = q.get_bytes(timeout=5)
    assert pickle.loads(raw) == {"a": 1}
    assert raw[:2] == b"\x80\x05", "default serializer is pickle protocol 5"


def _json_serializer(calls):
    def dumps(o):
        calls.append("dumps")
        return json.dumps(o).encode()

    def loads(b):
        calls.append("loads")
        return json.loads(bytes(b))

    return dumps, loads


def test_custom_serializer(mq):
    calls = []
    q = mq.Queue(serializer=_json_serializer(calls))
    q.put({"a": [1, 2]})
    assert calls == ["dumps"]
    assert q.get(timeout=5) == {"a": [1, 2]}
    assert calls == ["dumps", "loads"]
    q.put(("tuple", 1))
    assert q.get_bytes(timeout=5) == b'["tuple", 1]'
    q.put_many([1, 2])
    assert q.get_many(5, timeout=5) == [1, 2]


def test_custom_serializer_on_named_queue(mq, qname):
    calls = []
    a = mq.create(qname, serializer=_json_serializer(calls))
    b = mq.open(qname, serializer=_json_serializer(calls))
    plain = mq.open(qname)
    a.put([1, "two"])
    assert b.get(timeout=5) == [1, "two"]
    a.put({"k": None})
    assert plain.get_bytes(timeout=5) == b'{"k": null}'


def test_serializer_must_be_a_pair(mq):
    with pytest.raises((TypeError, ValueError)):
        mq.Queue(serializer=json.dumps)


def test_threads_share_one_handle(mq):
    q = mq.Queue(maxsize=16)
    n_prod, n_cons, per = 4, 4, 500
    results = [[] for _ in range(n_cons)]
    errors = []

    def producer(p):
        try:
            for i in range(per):
                if i % 3 == 0:
                    q.put_bytes(f"{p}:{i}".encode(), timeout=20)
                else:
                    q.put((p, i), timeout=20)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def consumer(c):
        try:
            while True:
                # raw and pickled messages are mixed: read raw, then decode
                raw = q.get_bytes(timeout=20)
                if raw == b"STOP":
                    return
                if raw[:1] == b"\x80":
                    results[c].append(pickle.loads(raw))
                else:
                    p, i = raw.decode().split(":")
                    results[c].append((int(p), int(i)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    cons = [threading.Thread(target=consumer, args=(c,)) for c in range(n_cons)]
    prods = [threading.Thread(target=producer, args=(p,)) for p in range(n_prod)]
    for t in cons + prods:
        t.start()
    for t in prods:
        t.join(60)
    for _ in range(n_cons):
        q.put_bytes(b"STOP", timeout=20)
    for t in cons:
        t.join(60)
    assert not any(t.is_alive() for t in cons + prods)
    assert not errors, errors
    all_got = [m for r in results for m in r]
    assert sorted(all_got) == sorted((p, i) for p in range(n_prod) for i in range(per))
    for r in results:  # per-producer order within each consumer
        last = {}
        for p, i in r:
            assert i > last.get(p, -1)
            last[p] = i


def test_works_in_forked_child_after_use_in_parent(mq, children):
    import multiprocessing as mp
    q = mq.Queue()
    q.put("before fork")
    ok = mp.get_context("fork").Value("i", 0)

    def child(q, ok):
        assert q.get(timeout=10) == "before fork"
        q.put("from child")
        ok.value = 1

    p = children.start(child, q, ok)
    children.join(30, [p])
    assert ok.value == 1
    assert q.get(timeout=5) == "from child"


def test_get_many_bad_max_messages(mq):
    q = mq.Queue()
    q.put(1)
    with pytest.raises(ValueError):
        q.get_many(0)
    with pytest.raises(ValueError):
        q.get_many(-3)
    with pytest.raises(TypeError):
        q.get_many("3")
    assert q.get_many(1, timeout=5) == [1]


def test_named_queue_file_mode(mq, qname, backend):
    not_on_redis(backend, "file modes of /dev/shm segments; a Redis queue has no file")
    import os
    import stat
    from conftest import Shm
    mq.create(qname)
    assert stat.S_IMODE(os.stat(Shm.segment_of_named(qname)).st_mode) == 0o600
    other = qname + "-m"
    old = os.umask(0o022)
    try:
        mq.create(other, mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(Shm.segment_of_named(other)).st_mode) == 0o640


def test_forcing_missing_native_backend_is_import_error_that_says_why():
    from conftest import run_python
    code = """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fastmq._core":
                    raise ImportError("extension hidden by the test")
        sys.meta_path.insert(0, Block())
        try:
            import fastmq
        except ImportError as e:
            print("IMPORTERROR", e)
        else:
            print("IMPORTED", fastmq.backend)
    """
    res = run_python(code, env={"FASTMQ_BACKEND": "native"})
    assert "IMPORTERROR" in res.stdout, res.stdout + res.stderr
    assert "native" in res.stdout or "_core" in res.stdout
    # without the variable, a missing extension falls back to pure
    res = run_python(code, env={"FASTMQ_BACKEND": ""})
    assert "IMPORTED pure" in res.stdout, res.stdout + res.stderr


def _drain(q):
    """Everything q still delivers (errors for undecodable messages counted)."""
    got, errors = [], 0
    while True:
        try:
            got += q.get_many(10, timeout=0.2)
        except fastmq.Empty:
            return got, errors
        except pickle.UnpicklingError:
            errors += 1


def test_undecodable_message_in_batch_loses_nothing(mq):
    q = mq.Queue()
    q.put(1)
    q.put_bytes(b"\x00not a pickle")
    q.put(2)
    q.put(3)
    got, errors = _drain(q)
    assert got == [1, 2, 3]
    assert errors == 1


def test_undecodable_message_then_close_loses_nothing_for_others(mq, qname):
    """Nothing committed is lost: a message get_many() has not returned was not handed
    over; if its consumer goes away, it is still there for the others."""
    a = mq.create(qname)
    b = mq.open(qname)
    a.put(1)
    a.put_bytes(b"\x00not a pickle")
    a.put(2)
    a.put(3)
    try:
        first = b.get_many(10, timeout=5)
    except pickle.UnpicklingError:
        first = []
    b.close()
    rest, _ = _drain(a)
    assert sorted(first + rest) == [1, 2, 3], (first, rest)
