"""Blocking, timeouts, Ctrl-C and idle CPU: waits sleep, and wake for signals."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastmq
import _workers as W
from conftest import WITH_REDIS, not_on_redis

pytestmark = pytest.mark.backends(*WITH_REDIS)

TOL = 0.5  # seconds a timed call may overrun on a loaded 2-core machine


@pytest.mark.parametrize("timeout", [0.05, 0.3])
def test_get_timeout_respected(mq, timeout):
    q = mq.Queue()
    t0 = time.monotonic()
    with pytest.raises(fastmq.Empty):
        q.get(timeout=timeout)
    dt = time.monotonic() - t0
    assert timeout - 0.01 <= dt <= timeout + TOL, dt
    t0 = time.monotonic()
    with pytest.raises(fastmq.Empty):
        q.get_bytes(timeout=timeout)
    dt = time.monotonic() - t0
    assert timeout - 0.01 <= dt <= timeout + TOL, dt


@pytest.mark.parametrize("timeout", [0.05, 0.3])
def test_put_timeout_respected(mq, timeout):
    q = mq.Queue(maxsize=1)
    q.put("a")
    t0 = time.monotonic()
    with pytest.raises(fastmq.Full):
        q.put("b", timeout=timeout)
    dt = time.monotonic() - t0
    assert timeout - 0.01 <= dt <= timeout + TOL, dt
    t0 = time.monotonic()
    with pytest.raises(fastmq.Full):
        q.put_bytes(b"b", timeout=timeout)
    assert timeout - 0.01 <= time.monotonic() - t0 <= timeout + TOL
    assert q.get_nowait() == "a"


def test_get_many_timeout_raises_empty(mq):
    q = mq.Queue()
    t0 = time.monotonic()
    with pytest.raises(fastmq.Empty):
        q.get_many(5, timeout=0.2)
    assert 0.19 <= time.monotonic() - t0 <= 0.2 + TOL


def test_put_many_timeout_returns_count_not_full(mq):
    q = mq.Queue(maxsize=2)
    t0 = time.monotonic()
    assert q.put_many(["a", "b", "c", "d"], timeout=0.2) == 2
    assert 0.19 <= time.monotonic() - t0 <= 0.2 + TOL
    assert q.put_many(["e"], timeout=0.05) == 0
    assert q.get_many(10, block=False) == ["a", "b"]


def test_negative_timeout_is_one_nonblocking_try(mq):
    # As in multiprocessing.Queue (not queue.Queue's ValueError): a deadline
    # that has already passed makes one try without waiting.
    q = mq.Queue(maxsize=1)
    with pytest.raises(fastmq.Empty):
        q.get(timeout=-1)
    with pytest.raises(fastmq.Empty):
        q.get_bytes(timeout=-0.5)
    with pytest.raises(fastmq.Empty):
        q.get_many(3, timeout=-1)
    q.put("x", timeout=-1)
    with pytest.raises(fastmq.Full):
        q.put("x", timeout=-1)
    with pytest.raises(fastmq.Full):
        q.put_bytes(b"x", timeout=-1)
    assert q.put_many(["x"], timeout=-1) == 0
    assert q.get(timeout=-1) == "x"
    assert q.qsize() == 0


def test_block_false_ignores_timeout_and_never_waits(mq):
    q = mq.Queue(maxsize=1)
    t0 = time.monotonic()
    with pytest.raises(fastmq.Empty):
        q.get(block=False, timeout=5)
    with pytest.raises(fastmq.Empty):
        q.get_nowait()
    q.put_nowait(1)
    with pytest.raises(fastmq.Full):
        q.put(2, block=False, timeout=5)
    with pytest.raises(fastmq.Full):
        q.put_nowait(2)
    assert time.monotonic() - t0 < 1.0
    assert q.get(block=False) == 1


def test_exceptions_are_stdlib_compatible(mq):
    import queue
    q = mq.Queue(maxsize=1)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    q.put(1)
    with pytest.raises(queue.Full):
        q.put_nowait(1)


def _delayed(fn, delay):
    t = threading.Timer(delay, fn)
    t.start()
    return t


def test_blocked_get_wakes_on_put_from_other_process(mq, children):
    q = mq.Queue()
    ready = __import__("multiprocessing").get_context("fork").Event()

    def child(q, ready):
        ready.set()
        time.sleep(0.3)  # let the parent block first (not synchronisation: the test
        q.put("wake", timeout=10)  # passes either way, it only exercises the wake path)
        q.close()

    p = children.start(child, q, ready)
    assert ready.wait(10)
    t0 = time.monotonic()
    assert q.get(timeout=20) == "wake"
    assert time.monotonic() - t0 < 5
    children.join(10, [p])


def test_blocked_put_wakes_on_get_from_other_process(mq, children):
    q = mq.Queue(maxsize=1)
    q.put("first")
    import multiprocessing as mp
    got = mp.get_context("fork").Queue()

    def child(q, got):
        time.sleep(0.3)
        got.put(q.get(timeout=10))
        q.close()

    p = children.start(child, q, got)
    q.put("second", timeout=20)  # blocks until the child makes room
    assert got.get(timeout=10) == "first"
    assert q.get(timeout=5) == "second"
    children.join(10, [p])


def test_blocked_get_wakes_in_thread(mq):
    q = mq.Queue()
    t = _delayed(lambda: q.put_bytes(b"x"), 0.2)
    try:
        t0 = time.monotonic()
        assert q.get_bytes(timeout=20) == b"x"
        assert time.monotonic() - t0 < 5
    finally:
        t.cancel()
        t.join(5)


SIGINT_CHILD = r"""
import sys, time, fastmq
q = fastmq.Queue.open(sys.argv[1], _backend=sys.argv[2])
op = sys.argv[3]
if op in ("put", "put_bytes", "put_many"):
    while not q.full():
        q.put_nowait(0)
print("READY", flush=True)
t0 = time.monotonic()
try:
    if op == "put":
        q.put(1, timeout={timeout})
    elif op == "put_bytes":
        q.put_bytes(b"1", timeout={timeout})
    elif op == "put_many":
        q.put_many([1, 2], timeout={timeout})
    elif op == "recv":
        q.recv(timeout={timeout})
    elif op == "get_many":
        q.get_many(4, timeout={timeout})
    else:
        getattr(q, op)(timeout={timeout})
    print("RETURNED", flush=True)
except KeyboardInterrupt:
    print("KBI %.3f" % (time.monotonic() - t0), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["get", "get_bytes", "get_many", "recv", "put", "put_bytes",
                                "put_many"])
@pytest.mark.parametrize("timeout", [None, 30])
def test_sigint_interrupts_blocked_call(mq, qname, backend, timeout, op):
    if op == "recv":
        not_on_redis(backend, "recv() is zero-copy; over Redis it is a NotImplementedError")
    mq.create(qname, maxsize=4)
    code = textwrap.dedent(SIGINT_CHILD.format(timeout=timeout))
    proc = subprocess.Popen([sys.executable, "-c", code, qname, backend, op],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() else "")
        time.sleep(0.3)  # let it get into the blocking call (it prints READY right before)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        dt = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (proc.returncode, out, err)
    assert "KBI" in out, (out, err)
    assert dt < 1.0, f"KeyboardInterrupt took {dt:.3f}s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["get", "get_bytes", "get_many", "put"])
def test_timeout_holds_while_other_thread_uses_handle(mq, how):
    """A blocked call with a timeout returns on time even while another thread
    hammers the same handle (wake-ups for others must not extend the deadline)."""
    q = mq.Queue(maxsize=1)
    if how == "put":
        q.put(0)
    stop = threading.Event()

    def noise():
        while not stop.is_set():
            try:
                q.qsize()
            except Exception:
                return
            time.sleep(0.001)

    t = threading.Thread(target=noise)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(fastmq.Full if how == "put" else fastmq.Empty):
            if how == "put":
                q.put(1, timeout=0.3)
            elif how == "get_many":
                q.get_many(4, timeout=0.3)
            else:
                getattr(q, how)(timeout=0.3)
        assert time.monotonic() - t0 <= 0.3 + TOL
    finally:
        stop.set()
        t.join(5)


@pytest.mark.timeout(60)
def test_cpu_of_blocked_get_is_near_zero(mq, children, tmp_path):
    q = mq.Queue()
    res = str(tmp_path / "cpu.pickle")
    p = children.start(W.blocked_get_cpu, q, 2.0, res)
    children.join(20, [p])
    with open(res, "rb") as f:
        r = pickle.load(f)
    assert r["outcome"] == "empty"
    assert 1.95 <= r["wall"] <= 2.0 + TOL, r
    assert r["cpu"] < 0.2, f"a get blocked for 2 s used {r['cpu']:.3f} s of CPU"


@pytest.mark.timeout(60)
def test_cpu_of_blocked_get_forever_is_near_zero(mq, children, tmp_path):
    """timeout=None: the child blocks ~2 s until the parent puts."""
    q = mq.Queue()
    res = str(tmp_path / "cpu.pickle")
    p = children.start(W.blocked_get_cpu, q, None, res)
    time.sleep(2.0)  # the quantity under test is CPU used while blocked for 2 s
    q.put("done")
    children.join(20, [p])
    with open(res, "rb") as f:
        r = pickle.load(f)
    assert r["outcome"] == "got"
    assert r["wall"] >= 1.5
    assert r["cpu"] < 0.2, f"a get blocked for {r['wall']:.1f} s used {r['cpu']:.3f} s of CPU"


@pytest.mark.timeout(60)
def test_cpu_of_blocked_put_is_near_zero(mq):
    q = mq.Queue(maxsize=1)
    q.put(0)
    t0 = os.times()
    with pytest.raises(fastmq.Full):
        q.put(1, timeout=2.0)
    t1 = os.times()
    cpu = (t1.user - t0.user) + (t1.system - t0.system)
    assert cpu < 0.2, f"a put blocked for 2 s used {cpu:.3f} s of CPU"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["get", "put"])
def test_signal_handler_exception_escapes_blocked_call(mq, op):
    """Python signal handlers run while a call is blocked (not only Ctrl-C):
    an exception raised by the handler ends the call promptly."""
    class Alarm(Exception):
        pass

    def handler(signum, frame):
        raise Alarm()

    q = mq.Queue(maxsize=1)
    if op == "put":
        q.put(0)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t0 = time.monotonic()
        with pytest.raises(Alarm):
            if op == "get":
                q.get(timeout=20)
            else:
                q.put(1, timeout=20)
        dt = time.monotonic() - t0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert dt < 1.3, f"the handler's exception took {dt:.2f}s to surface"
    # the queue is intact afterwards
    if op == "get":
        q.put("ok")
    assert q.get(timeout=5) in ("ok", 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["get", "get_many", "recv", "put"])
def test_blocked_call_releases_the_gil(mq, backend, op):
    if op == "recv":
        not_on_redis(backend, "recv() is zero-copy; over Redis it is a NotImplementedError")
    q = mq.Queue(maxsize=1)
    if op == "put":
        q.put(0)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.05)
        before = count[0]
        with pytest.raises(fastmq.Full if op == "put" else fastmq.Empty):
            if op == "put":
                q.put(1, timeout=1.0)
            elif op == "get_many":
                q.get_many(5, timeout=1.0)
            elif op == "recv":
                q.recv(timeout=1.0)
            else:
                q.get(timeout=1.0)
        during = count[0] - before
    finally:
        stop.set()
        t.join(5)
    # a thread that holds the GIL for the whole second lets the spinner do
    # (almost) nothing; with the GIL released it runs millions of loops
    assert during > 100_000, f"the other thread only ran {during} loops in 1 s"
