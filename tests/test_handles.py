"""Handles across processes, named queues, unlink, and /dev/shm hygiene."""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing as mp
import os
import pickle
import signal
import time

import pytest

import fastmq
import _workers as W
from conftest import ChildGroup, Shm, run_python, segment_name, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_anonymous_handle_passes_to_process(mq, backend, method):
    q = mq.Queue()
    reply = mq.Queue()
    g = ChildGroup(mp.get_context(method))
    try:
        p = g.start(W.echo_child, q, reply, backend)
        q.put(21)
        x, doubled, child_backend, _ = reply.get(timeout=60)
        assert (x, doubled) == (21, 42)
        assert child_backend == backend, "the child must use the parent's backend"
        g.join(60, [p])
    finally:
        g.reap()
    # the parent's handles still work after the child closed its copies
    q.put_bytes(b"still")
    assert q.get_bytes(timeout=5) == b"still"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_named_handle_passes_to_process(mq, qname, backend, method):
    q = mq.create(qname, maxsize=5)
    reply = mq.Queue()
    g = ChildGroup(mp.get_context(method))
    try:
        p = g.start(W.echo_child, q, reply, backend)
        q.put("n")
        assert reply.get(timeout=60)[:3] == ("n", "nn", backend)
        g.join(60, [p])
    finally:
        g.reap()
    assert q.stats()["capacity"] == 5


def test_raw_os_fork_child_uses_handle(mq):
    q = mq.Queue()
    back = mq.Queue()
    q.put("parent")
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            if q.get(timeout=10) == "parent":
                back.put("child")
                code = 0
        finally:
            os._exit(code)
    try:
        got = back.get(timeout=20)
    finally:
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("forked child hung")
            time.sleep(0.01)
    assert got == "child"
    assert os.waitstatus_to_exitcode(status) == 0
    q.put("parent still works")
    assert q.get(timeout=5) == "parent still works"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_handle_to_process_pool_initializer(mq, method):
    q = mq.Queue()
    with concurrent.futures.ProcessPoolExecutor(
            max_workers=2, mp_context=mp.get_context(method),
            initializer=W.pool_init, initargs=(q,)) as ex:
        results = list(ex.map(W.pool_task, range(10), timeout=60))
    assert results == [x * 3 for x in range(10)]
    got = [q.get(timeout=10) for _ in range(10)]
    assert sorted(x for _, x, _ in got) == list(range(10))
    assert all(tag == "from-pool" for tag, _, _ in got)
    with pytest.raises(fastmq.Empty):
        q.get_nowait()


def test_handle_through_queue_same_process(mq):
    outer = mq.Queue()
    inner = mq.Queue()
    outer.put(inner)
    inner2 = outer.get(timeout=5)
    try:
        inner.put("hello")
        assert inner2.get(timeout=5) == "hello"
        inner2.put_bytes(b"back")
        assert inner.get_bytes(timeout=5) == b"back"
    finally:
        inner2.close()
    # closing the received copy leaves the original working
    inner.put(1)
    assert inner.get(timeout=5) == 1


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_handle_through_queue_to_other_process(mq, backend, method):
    outer = mq.Queue()
    inner = mq.Queue()
    g = ChildGroup(mp.get_context(method))
    try:
        reply = mq.Queue()
        p = g.start(W.through_queue_child, outer, backend)
        outer.put((inner, reply))
        inner.put({"n": 7})
        assert reply.get(timeout=60) == ("ack", {"n": 7})
        g.join(60, [p])
    finally:
        g.reap()


def test_handle_through_queue_after_all_handles_closed(mq):
    """API: an anonymous queue lives until its last open handle is closed; a
    pickled handle still in flight is not an open handle.  Unpickling it after
    every handle closed is a clear QueueNotFound, never a crash or a zombie
    segment."""
    outer = mq.Queue()
    inner = mq.Queue()
    inner.put("lost with the queue")
    outer.put(inner)
    inner.close()
    with pytest.raises(fastmq.QueueNotFound):
        outer.get(timeout=5)


def test_handle_through_queue_while_sender_open(mq):
    outer = mq.Queue()
    inner = mq.Queue()
    inner.put("kept")
    outer.put(inner)
    inner2 = outer.get(timeout=5)
    inner.close()  # the receiver's handle keeps the queue alive now
    try:
        assert inner2.get(timeout=5) == "kept"
        inner2.put("again")
        assert inner2.get(timeout=5) == "again"
    finally:
        inner2.close()


def test_named_queue_opened_by_unrelated_process(mq, qname, backend):
    q = mq.create(qname)
    q.put({"from": "parent"})
    code = f"""
        import fastmq
        q = fastmq.Queue.open({qname!r}, _backend={backend!r})
        m = q.get(timeout=30)
        q.put(("child saw", m))
        q.put_bytes(b"raw from child")
        q.close()
        print("OK")
    """
    res = run_python(code, timeout=60)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr
    assert q.get(timeout=5) == ("child saw", {"from": "parent"})
    assert q.get_bytes(timeout=5) == b"raw from child"


def test_named_queue_created_by_unrelated_process(mq, qname, backend):
    code = f"""
        import fastmq
        q = fastmq.Queue.create({qname!r}, maxsize=7, _backend={backend!r})
        q.put_many(["a", "b", "c"])
        q.close()
        print("OK")
    """
    res = run_python(code, timeout=60)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr
    mq.names.append(qname)
    q = mq.open(qname)
    assert q.get_many(10, timeout=5) == ["a", "b", "c"]
    assert q.stats()["capacity"] == 7


def test_unlink_semantics(mq, qname):
    q = mq.create(qname)
    q2 = mq.open(qname)
    q.put("before")
    mq.unlink(qname)
    with pytest.raises(fastmq.QueueNotFound):
        mq.open(qname)
    with pytest.raises(fastmq.QueueNotFound):
        mq.unlink(qname)
    assert not os.path.exists(Shm.path(f"fastmq-q-{qname}"))
    # open handles keep working, and still share the (now nameless) queue
    assert q2.get(timeout=5) == "before"
    q2.put("after")
    assert q.get(timeout=5) == "after"
    # the name can be reused for a new, independent queue
    q3 = mq.create(qname)
    q3.put("new")
    with pytest.raises(fastmq.Empty):
        q.get_nowait()
    assert q3.get(timeout=5) == "new"


def test_unlink_missing_is_queue_not_found(mq):
    with pytest.raises(fastmq.QueueNotFound):
        mq.unlink("fmqtest-never-existed-" + str(os.getpid()))
    with pytest.raises(FileNotFoundError):
        mq.unlink("fmqtest-never-existed-" + str(os.getpid()))


def test_named_queue_persists_after_handles_close(mq, qname):
    q = mq.create(qname)
    q.put("persist")
    q.close()
    q2 = mq.open(qname)
    assert q2.get(timeout=5) == "persist"


LEFTOVER_CHILD = r"""
import json, multiprocessing as mp, os, sys
SHM = "/dev/shm"
def anon():
    return {n for n in os.listdir(SHM) if n.startswith("fastmq-anon-")}
before = anon()
import fastmq
q = fastmq.Queue(_backend=sys.argv[1])
q2 = fastmq.Queue(maxsize=3, _backend=sys.argv[1])
# our segments (other fastmq processes may be creating theirs concurrently)
mine = sorted(n for n in anon() - before if n in (q._ring.name, q2._ring.name))
assert len(mine) == 2, (mine, q._ring.name, q2._ring.name)
import _workers
ctx = mp.get_context(sys.argv[2])
p = ctx.Process(target=_workers.relay, args=(q, q2))
p.start()
q2.put("x")
assert q.get(timeout=30) == "x"
p.join(30)
assert p.exitcode == 0, p.exitcode
print(json.dumps(mine))
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_shm_leftovers_after_normal_exit(backend, method):
    """Two anonymous queues used by a parent and its child; both exit without
    closing anything explicitly: nothing of theirs remains in /dev/shm."""
    import sys
    import subprocess
    import textwrap
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LEFTOVER_CHILD),
                           backend, method], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    mine = json.loads(proc.stdout.strip().splitlines()[-1])
    assert mine, "the anonymous queues created no fastmq-anon-* segment in /dev/shm"
    left = [n for n in mine if os.path.exists(Shm.path(n))]
    assert not left, f"leftovers in /dev/shm after normal exit: {left}"


def test_no_shm_leftovers_after_close_in_process(mq):
    q = mq.Queue()
    q.put(1)
    mine = {segment_name(q)}
    assert all(os.path.exists(Shm.path(n)) for n in mine)
    q.close()
    assert not [n for n in mine if os.path.exists(Shm.path(n))]


def test_gc_of_handle_removes_anonymous_segment(mq):
    import gc
    q = fastmq.Queue(_backend=mq.backend)
    mine = {segment_name(q)}
    assert all(os.path.exists(Shm.path(n)) for n in mine)
    del q
    gc.collect()
    assert not [n for n in mine if os.path.exists(Shm.path(n))]


KILLED_CHILD = r"""
import json, multiprocessing as mp, os, sys, time
SHM = "/dev/shm"
def anon():
    return {n for n in os.listdir(SHM) if n.startswith("fastmq-anon-")}
before = anon()
import fastmq
q = fastmq.Queue(_backend=sys.argv[1])
mine = sorted(n for n in anon() - before if n == q._ring.name)
def child(q):
    q.put("child alive")
    time.sleep(300)
p = mp.get_context("fork").Process(target=child, args=(q,))
p.start()
assert q.get(timeout=30) == "child alive"
print(json.dumps({"mine": mine, "pids": [os.getpid(), p.pid]}), flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(120)
def test_cleanup_after_all_users_sigkilled(backend, monkeypatch):
    import subprocess
    import sys
    import textwrap
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_CHILD), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        pids, mine = info["pids"], info["mine"]
        assert mine
        assert all(os.path.exists(Shm.path(n)) for n in mine)
        # a live user keeps the segment: cleanup must not touch it
        _age_guard_off(monkeypatch)
        fastmq.cleanup()
        assert all(os.path.exists(Shm.path(n)) for n in mine), "cleanup removed a live segment"
        for pid in reversed(pids):
            os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        assert wait_until(lambda: not _alive(pids[1]), 10)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    still = [n for n in mine if os.path.exists(Shm.path(n))]
    if still:
        fastmq.cleanup()
    left = [n for n in mine if os.path.exists(Shm.path(n))]
    assert not left, f"fastmq.cleanup() left {left} after all users were SIGKILLed"


@pytest.mark.timeout(120)
def test_next_fastmq_process_cleans_after_sigkill(backend, monkeypatch):
    """"at the latest when the next fastmq process starts": a fresh
    `import fastmq` (after the documented age guard) removes the orphan."""
    import subprocess
    import sys
    import textwrap
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_CHILD), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = []
    try:
        info = json.loads(proc.stdout.readline() or "{}")
        pids, mine = info["pids"], info["mine"]
        for pid in reversed(pids):
            os.kill(pid, signal.SIGKILL)
        proc.wait(30)
        assert wait_until(lambda: not _alive(pids[1]), 10)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    age = _orphan_age()
    code = f"""
        import os, time
        deadline = time.time() + {age} + 1
        # wait until the orphan is older than the documented age guard
        while time.time() < deadline:
            time.sleep(0.2)
        import fastmq
        print("imported")
    """
    res = run_python(code, timeout=age + 60)
    assert "imported" in res.stdout, res.stderr
    left = [n for n in mine if os.path.exists(Shm.path(n))]
    assert not left, f"a new fastmq process did not clean the orphans {left}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists"; read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _orphan_age():
    try:
        from fastmq import _lifetime
        return float(getattr(_lifetime, "ORPHAN_AGE", 0.0))
    except ImportError:
        return 0.0


def _age_guard_off(monkeypatch):
    """cleanup() spares segments younger than ORPHAN_AGE (a documented guard
    for a creator between creating and locking); the test's segment is fresh."""
    try:
        from fastmq import _lifetime
    except ImportError:
        return
    if hasattr(_lifetime, "ORPHAN_AGE"):
        monkeypatch.setattr(_lifetime, "ORPHAN_AGE", 0.0)
