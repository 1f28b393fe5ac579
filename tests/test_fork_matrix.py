"""The fork matrix: every object that holds shared memory x what a forked
child does with its inherited copy.

Objects: a ``recv()`` lease, a ``reserve()`` reservation, a ``reserve_array``
array, an array from ``get(zero_copy=True)``, a leased message from
``get_message`` (its payload pinned in a block), an asyncio waiter (a
coroutine of the parent parked in ``get_async``), an exchange handle.

What the child does (a real ``os.fork()`` of a process holding live views):

* ``drop``  -- deletes every reference it inherited, then stays alive while
  the parent checks;
* ``exit``  -- exits normally with the references still alive (interpreter
  shutdown: finalizers, ``atexit``, deallocation);
* ``kill``  -- is SIGKILLed while holding them;
* ``use``   -- keeps using the object where that makes sense (reads the
  bytes, tries to commit or ack what belongs to the parent, awaits, publishes).

After each, the parent fills the queue's block pool with other messages
(so a block wrongly given back is reused and overwritten), then checks that
its own view still shows its own bytes, finishes the object (commit, ack,
release) and checks what arrives, and finally that the pool has as much room
as before the object existed (nothing leaked, nothing double-freed).

Each case runs in a fresh interpreter (this file is its own driver, see
``main``) so that ``exit`` is a true interpreter exit and a case that
corrupts the queue cannot disturb the next one. Both backends.
"""
from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytestmark = pytest.mark.timeout(300)

KiB, MiB = 1024, 1024 * 1024
BIG = 200 * KiB                      # always a block, never inline in a slot
GEOMETRY = {"maxsize": 32, "max_message_size": 1 * MiB, "capacity_bytes": 4 * MiB}
OBJECTS = ["recv", "zero_copy", "reserve", "reserve_array", "message", "asyncio", "exchange"]
MODES = ["drop", "exit", "kill", "use"]
STEP = 20.0                          # bound on every wait for the other process


# ======================================================================== #
# the driver (runs in a child interpreter)                                 #
# ======================================================================== #

def pattern(n, seed):
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(251))
    return (block * (n // 251 + 1))[:n]


def churn(q, seed):
    """Fill the queue with distinct messages until Full, then drain and check
    each: every block the pool hands out is written."""
    import fastmq
    sent = []
    while True:
        data = pattern(BIG, seed + len(sent))
        try:
            q.put_bytes(data, block=False)
        except fastmq.Full:
            break
        sent.append(data)
    for i, data in enumerate(sent):
        got = q.get_bytes(timeout=5)
        assert got == data, f"churn message {i} came back with foreign bytes"
    return len(sent)


class _Pipe:
    """One direction of parent/child talk, with bounded reads."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def send(self, text):
        os.write(self.w, text.encode() + b"\n")

    def recv(self, timeout=STEP):
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError(f"no word from the other process in {timeout}s")
            chunk = os.read(self.r, 4096)
            if not chunk:
                raise EOFError("the other process closed the pipe")
            buf += chunk
        return buf.decode().strip()


# ---- the objects: make (parent), check (parent), use (child), finish (parent)

class Case:
    """held: every reference to shared memory the parent holds (the child
    inherits exactly these, and drops them by clearing the dict)."""

    def __init__(self, q, name, backend):
        self.q, self.name, self.backend = q, name, backend
        self.data = pattern(BIG, 7)
        self.held = {}

    def check(self):
        pass

    def drop(self):
        """In the child: let go of every inherited reference."""
        self.held.clear()
        gc.collect()

    def use(self):
        """In the child: use the inherited object; returns a short report."""
        return "ok"

    def finish(self):
        pass

    def cleanup(self):
        pass


class RecvCase(Case):
    def make(self):
        self.q.put_bytes(self.data)
        rx = self.q.recv(timeout=5)
        self.held.update(rx=rx, view=rx.data)

    def check(self):
        assert bytes(self.held["view"]) == self.data, "the parent's recv() view changed"

    def drop(self):
        self.held.pop("view").release()
        self.held.pop("rx").release()        # explicitly, not only by refcount
        gc.collect()

    def use(self):
        assert bytes(self.held["rx"].data) == self.data, "the child's inherited view differs"
        self.held["rx"].__exit__(None, None, None)     # the child is done with it
        return "ok"

    def finish(self):
        rx = self.held.pop("rx")
        del self.held["view"]
        rx.release()


class ZeroCopyCase(Case):
    def make(self):
        import numpy as np
        self.q.put(np.frombuffer(self.data, np.uint8).copy())
        arr = self.q.get(timeout=5, zero_copy=True)
        assert not arr.flags.owndata
        self.held.update(arr=arr)

    def check(self):
        assert self.held["arr"].tobytes() == self.data, "the parent's zero-copy array changed"

    def use(self):
        assert self.held["arr"].tobytes() == self.data
        return "ok"

    def finish(self):
        self.held.clear()


class ReserveCase(Case):
    def make(self):
        ctx = self.q.reserve(BIG, timeout=5)
        view = ctx.__enter__()
        view[:] = self.data
        self.held.update(ctx=ctx, view=view)

    def check(self):
        assert bytes(self.held["view"]) == self.data, "the parent's reservation was overwritten"

    def use(self):
        # The reservation is the parent's: the child can neither publish nor
        # abort it (that would hand the parent's block to someone else).
        res = self.held["ctx"]._reservation
        out = []
        for op in (res.commit, res.abort):
            try:
                op()
                out.append(f"{op.__name__} succeeded")
            except ValueError as exc:
                if "fork" not in str(exc):
                    out.append(f"{op.__name__}: {exc}")
        return "; ".join(out) or "ok"

    def finish(self):
        assert self.q.qsize() == 0, "something was published besides the parent's commit"
        ctx = self.held.pop("ctx")
        del self.held["view"]
        ctx.__exit__(None, None, None)           # commit
        assert self.q.get_bytes(timeout=5) == self.data


class ReserveArrayCase(Case):
    def make(self):
        import numpy as np
        arr = self.q.reserve_array((BIG,), np.uint8, timeout=5)
        arr[:] = np.frombuffer(self.data, np.uint8)
        self.held.update(arr=arr)

    def check(self):
        assert self.held["arr"].tobytes() == self.data, "the parent's reserve_array was overwritten"

    def use(self):
        arr = self.held["arr"]
        try:
            self.q.commit(arr)
        except ValueError as exc:
            return "ok" if "fork" in str(exc) else f"commit: {exc}"
        return "commit succeeded"

    def finish(self):
        assert self.q.qsize() == 0, "something was published besides the parent's commit"
        arr = self.held.pop("arr")
        self.q.commit(arr)
        del arr
        got = self.q.get(timeout=5)
        assert got.tobytes() == self.data


class MessageCase(Case):
    def make(self):
        self.q.put_bytes(self.data)
        m = self.q.get_message(timeout=5, lease=60)
        self.held.update(m=m, view=m.data)

    def check(self):
        assert bytes(self.held["view"]) == self.data, "the parent's leased message changed"

    def use(self):
        import fastmq
        m = self.held["m"]
        assert bytes(m.data) == self.data
        try:
            m.ack()
            return "the child acked the parent's message"
        except (ValueError, fastmq.LeaseLost):
            pass
        self.q.close()            # the child's handle goes: the parent's lease stays
        return "ok"

    def finish(self):
        import fastmq
        with pytest.raises(fastmq.Empty):
            self.q.get_message(block=False)      # still leased by the parent
        m = self.held.pop("m")
        m.ack()
        del self.held["view"], m


class AsyncioCase(Case):
    """The parent has a coroutine parked in get_async (its waiter thread
    sleeps in the ring's wait) when it forks."""

    def make(self):
        import asyncio
        import threading
        loop = asyncio.new_event_loop()
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        self.loop, self.thread = loop, t
        self.fut = asyncio.run_coroutine_threadsafe(self.q.get_async(timeout=3 * STEP), loop)
        self._wait_parked()

    def _wait_parked(self):
        deadline = time.monotonic() + STEP
        while not self._parked():
            assert time.monotonic() < deadline, "get_async never parked"
            time.sleep(0.01)

    def _parked(self):
        state = self.q.__dict__.get("_async_waiters")
        return state is not None and bool(state[1]._parked)

    def check(self):
        if not self.fut.done():
            self.q.put(self.data)
        assert self.fut.result(STEP) == self.data, "the parent's awaiting get lost its message"

    def use(self):
        import asyncio
        import fastmq
        t0 = time.monotonic()
        try:
            asyncio.run(self.q.get_async(timeout=0.3))
            return "the child got a message"
        except fastmq.Empty:
            pass
        assert time.monotonic() - t0 < STEP
        return "ok"

    def finish(self):
        # The parent's waiter still serves a new await after all that.
        import asyncio
        self.fut = asyncio.run_coroutine_threadsafe(self.q.get_async(timeout=3 * STEP),
                                                    self.loop)
        self._wait_parked()
        self.check()

    def cleanup(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ExchangeCase(Case):
    def make(self):
        import fastmq
        self.ename = "fmqtest-fx-" + uuid.uuid4().hex[:10]
        ex = fastmq.Exchange.create(self.ename, "fanout", _backend=self.backend)
        ex.bind(self.name)
        assert ex.publish(b"warm") == 1       # the handle caches the bound queue
        assert self.q.get(timeout=5) == b"warm"
        self.held.update(ex=ex)
        self.bindings = ex.bindings()

    def use(self):
        ex = self.held["ex"]
        assert ex.publish(pattern(BIG, 99)) == 1
        ex.close()
        return "ok"

    def check(self):
        if self.mode == "use" and not getattr(self, "seen", False):
            assert self.q.get(timeout=5) == pattern(BIG, 99)
            self.seen = True

    def finish(self):
        ex = self.held["ex"]
        assert ex.bindings() == self.bindings
        assert ex.publish(self.data) == 1
        assert self.q.get(timeout=5) == self.data
        ex.close()

    def cleanup(self):
        import fastmq
        try:
            fastmq.Exchange.unlink(self.ename)
        except Exception:
            pass


CASES = {"recv": RecvCase, "zero_copy": ZeroCopyCase, "reserve": ReserveCase,
         "reserve_array": ReserveArrayCase, "message": MessageCase, "asyncio": AsyncioCase,
         "exchange": ExchangeCase}


def _child(case, mode, to_parent, from_parent):
    """The forked child. Never returns into the parent's code: it ends in
    os._exit, SIGKILL, or (mode exit) a normal interpreter exit."""
    try:
        if mode == "drop":
            case.drop()
            to_parent.send("ready")
        elif mode == "use":
            to_parent.send(case.use())
        else:
            to_parent.send("ready")
        if mode == "exit":
            raise SystemExit(0)          # the references are still alive
        if mode == "kill":
            time.sleep(3 * STEP)         # the parent SIGKILLs us
        from_parent.recv(3 * STEP)       # drop/use: stay alive while the parent checks
    except SystemExit:
        raise
    except BaseException as exc:         # report, never run the parent's code
        try:
            to_parent.send(f"child failed: {exc!r}")
        finally:
            os._exit(1)
    os._exit(0)


def _reap(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    return None


def run_case(backend, obj, mode):
    import fastmq
    from conftest import pool_room
    name = "fmqtest-fm-" + uuid.uuid4().hex[:12]
    q = fastmq.Queue.create(name, _backend=backend, **GEOMETRY)
    me = os.getpid()
    case = CASES[obj](q, name, backend)
    case.mode = mode
    pid = None
    try:
        base = pool_room(q, BIG)
        case.make()
        to_parent, from_parent = _Pipe(), _Pipe()
        pid = os.fork()
        if pid == 0:
            _child(case, mode, to_parent, from_parent)
        word = to_parent.recv()
        assert word in ("ready", "ok"), f"child: {word}"
        if mode == "kill":
            os.kill(pid, signal.SIGKILL)
        if mode in ("exit", "kill"):
            status = _reap(pid, STEP)
            assert status is not None, "the child did not exit"
            pid = None
            if mode == "exit":
                assert os.waitstatus_to_exitcode(status) == 0, status
        case.check()
        churn(q, 1000)
        case.check()
        if pid is not None:                       # drop/use: now let it go
            from_parent.send("bye")
            status = _reap(pid, STEP)
            assert status is not None, "the child did not exit"
            pid = None
            assert os.waitstatus_to_exitcode(status) == 0, status
            churn(q, 2000)
            case.check()
        case.finish()
        case.held.clear()
        gc.collect()
        room = pool_room(q, BIG)
        assert room == base, f"block pool room {room}, {base} before: a block leaked"
    finally:
        if os.getpid() == me:                    # (a child exiting normally skips this)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _reap(pid, STEP)
            case.cleanup()
            q.close()
            try:
                fastmq.Queue.unlink(name, _backend=backend)
            except Exception:
                pass


def run_drop_in_process(backend, obj):
    """No fork: the same objects, dropped without finishing them, give their
    memory back (the baseline the matrix's drop row is measured against)."""
    import fastmq
    from conftest import pool_room
    name = "fmqtest-fm-" + uuid.uuid4().hex[:12]
    q = fastmq.Queue.create(name, _backend=backend, **GEOMETRY)
    case = CASES[obj](q, name, backend)
    try:
        base = pool_room(q, BIG)
        case.make()
        assert pool_room(q, BIG) == base - 1, "the object does not hold a block"
        case.drop()
        assert q.qsize() == 0
        room = pool_room(q, BIG)
        assert room == base, f"block pool room {room}, {base} before: a dropped object leaked"
    finally:
        q.close()
        fastmq.Queue.unlink(name, _backend=backend)


def main(argv):
    backend, obj, mode = argv
    if mode == "none":
        run_drop_in_process(backend, obj)
    else:
        run_case(backend, obj, mode)
    print("FORK-MATRIX-OK", flush=True)


# ======================================================================== #
# the tests                                                                #
# ======================================================================== #

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("obj", OBJECTS)
def test_fork_matrix(backend, obj, mode):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), backend, obj, mode],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "FORK-MATRIX-OK" in proc.stdout, (
        f"{obj} x {mode} on {backend}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")


@pytest.mark.parametrize("obj", ["recv", "zero_copy", "reserve", "reserve_array"])
def test_dropped_object_gives_its_block_back(obj):
    # Native only: in the pure backend these objects are private copies.
    backend = "native"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), backend, obj, "none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "FORK-MATRIX-OK" in proc.stdout, (
        f"{obj} dropped on {backend}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")


def test_forked_child_takes_its_own_exchange_locks(backend):
    """An exchange handle inherited through fork(): the child's changes are
    excluded by the parent's file lock (not merged into it), and a thread of
    the parent holding the handle's lock at fork time (a publish waiting on a
    full queue) does not wedge the child."""
    import threading
    from fcntl import LOCK_EX, LOCK_UN, flock

    import fastmq
    from conftest import unique_name
    qname_ = unique_name("fe")
    ename = unique_name("fe")
    q2name = qname_ + "-2"
    q = fastmq.Queue.create(qname_, _backend=backend, maxsize=2, max_message_size=4 * KiB)
    q2 = fastmq.Queue.create(q2name, _backend=backend, maxsize=2, max_message_size=4 * KiB)
    ex = fastmq.Exchange.create(ename, "fanout", _backend=backend)
    pid = publisher = None
    try:
        ex.bind(qname_)
        while True:
            try:
                q.put_bytes(b"x", block=False)
            except fastmq.Full:
                break
        publisher = threading.Thread(target=lambda: _quietly(ex.publish, "blocked"),
                                     daemon=True)
        publisher.start()                  # holds the handle's lock while it waits
        time.sleep(0.2)
        assert publisher.is_alive()
        to_parent = _Pipe()
        flock(ex._fd, LOCK_EX)             # and the parent holds the file lock
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    ex.bind(q2name)                # must wait for the parent's lock
                    to_parent.send(repr(time.monotonic()))
                finally:
                    os._exit(0)
            time.sleep(0.5)
            released = time.monotonic()
        finally:
            flock(ex._fd, LOCK_UN)
        done = float(to_parent.recv())
        assert done >= released, "the child changed the exchange while the parent held its lock"
        assert _reap(pid, STEP) is not None
        pid = None
        q.get_bytes(timeout=5)             # room: the publisher's put goes in ...
        publisher.join(STEP)
        assert not publisher.is_alive()
        assert (q2name, "") in ex.bindings()   # ... and with it the handle's lock
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _reap(pid, STEP)
        # Each step runs even if one before it raises: none may leave a file.
        for step in (q.close,                  # frees the publisher (QueueClosed)
                     ex.close,
                     lambda: publisher is not None and publisher.join(STEP),
                     q2.close,
                     lambda: fastmq.Queue.unlink(qname_, _backend=backend),
                     lambda: fastmq.Queue.unlink(q2name, _backend=backend),
                     lambda: fastmq.Exchange.unlink(ename)):
            try:
                step()
            except Exception:
                pass


def _quietly(fn, *args):
    try:
        fn(*args)
    except Exception:
        pass


IDLE_CHILD_PRODUCER = """
import os, sys, time
import fastmq
q = fastmq.Queue.open(sys.argv[1], _backend="native")
q.put_bytes(b"first")                  # crash point hit 1: registered, a producer
pid = os.fork()
if pid == 0:                           # idle: never touches the queue
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
q.put_bytes(b"second")                 # hit 2: SIGKILLed holding a claimed slot
"""


def test_idle_forked_child_does_not_keep_a_dead_producer_alive(tmp_path):
    """A producer forks a child that never uses the queue, then dies in the
    middle of a put. The child lives on, yet the dead producer's slot is
    repaired and the queue moves: the child must not hold the parent's
    liveness (native: the participant lock of an inherited file description)."""
    import fastmq
    from conftest import unique_name
    name = unique_name("fi")
    q = fastmq.Queue.create(name, _backend="native", **GEOMETRY)
    script = tmp_path / "producer.py"
    script.write_text(IDLE_CHILD_PRODUCER)
    env = dict(os.environ, FASTMQ_CRASH_AT="ring.reserve.claimed:2")
    idle = None
    try:
        proc = subprocess.Popen([sys.executable, str(script), name], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            idle = int(proc.stdout.readline())
            assert proc.wait(STEP) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(STEP)
        os.kill(idle, 0)                       # the idle child is still alive
        q.put_bytes(b"third")                  # queued behind the dead slot
        assert q.get_bytes(timeout=5) == b"first"
        assert q.get_bytes(timeout=10) == b"third", "wedged behind the dead producer"
        os.kill(idle, 0)                       # ... and was alive all along
    finally:
        if idle is not None:
            try:
                os.kill(idle, signal.SIGKILL)  # not our child (reparented): no reap
            except ProcessLookupError:
                pass
        q.close()
        fastmq.Queue.unlink(name, _backend="native")


if __name__ == "__main__":
    main(sys.argv[1:])


# ---- a lock a parent thread holds at fork time -----------------------------

@pytest.mark.parametrize("reentrant", [False, True])
def test_a_fork_safe_lock_held_by_a_parent_thread_is_free_in_the_child(reentrant):
    from _fork_support import fork_while_held

    from fastmq import _lifetime
    lock = _lifetime.ForkSafeLock(reentrant=reentrant)
    assert fork_while_held(lock, lambda: lock.acquire(timeout=3)) == "True"


@pytest.mark.parametrize("lock", ["queue", "rejected-count"])
def test_a_handle_lock_a_parent_thread_held_at_fork_does_not_wedge_the_child(backend, lock):
    """A forked child uses a handle whose lock a thread of the parent held at
    fork time: the call completes (before, it waited for ever)."""
    from _fork_support import fork_while_held

    import fastmq
    from conftest import unique_name
    from fastmq import _auth
    name = unique_name("fl")
    key = b"k" * 32
    if lock == "queue":
        np = pytest.importorskip("numpy")
        q = fastmq.Queue.create(name, _backend=backend, maxsize=4)
        held = q._lock                      # reserve_array/commit's bookkeeping

        def action():
            arr = q.reserve_array((4,), np.uint8)
            arr[:] = 7
            q.commit(arr)
            return q.get(timeout=5).tolist()
        expect = repr([7, 7, 7, 7])
    else:
        if backend != "native":
            pytest.skip("the pure ring counts rejected messages itself, without a lock")
        q = fastmq.Queue.create(name, _backend=backend, maxsize=4, authkey=key)
        held = _auth._counter_lock          # the shared count of rejected messages
        plain = fastmq.Queue.open(name, _backend=backend)
        plain.put_bytes(b"no tag")
        plain.close()

        def action():
            try:
                q.get(timeout=5)
            except fastmq.AuthenticationError:
                return q.stats()["rejected"]
        expect = "1"
    try:
        assert fork_while_held(held, action) == expect
    finally:
        q.close()
        fastmq.Queue.unlink(name, _backend=backend)
