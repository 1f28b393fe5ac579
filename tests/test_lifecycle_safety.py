"""Creating, opening, cleaning up and routing: what other processes (dead,
frozen, slow, careless or hostile) can do to a segment or an exchange file.

Children are real interpreters (``subprocess``), stopped and killed with real
signals; every child is reaped in a ``finally``. Each test checks only the
files it made (other runs share /dev/shm).
"""
from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import SHM_DIR, unique_name

# ----------------------------------------------------------------- helpers


class Child:
    """A ``python -c`` child with line-based stdin/stdout; always reaped."""

    def __init__(self, code, env=None):
        full = dict(os.environ)
        full.update(env or {})
        self.p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=full,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)
        self.pid = self.p.pid

    def line(self, timeout=30):
        out = []

        def read():
            out.append(self.p.stdout.readline())
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not out:
            raise AssertionError(f"child {self.pid} said nothing within {timeout}s")
        return out[0].strip()

    def send(self, text="go"):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def wait(self, timeout=30):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"child {self.pid} still running after {timeout}s") from None

    def stderr(self):
        self.reap()
        return self.p.stderr.read()

    def reap(self):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                self.p.kill()
            except ProcessLookupError:
                pass
            self.p.wait(10)


@pytest.fixture
def child():
    made = []

    def start(code, env=None):
        c = Child(code, env)
        made.append(c)
        return c
    try:
        yield start
    finally:
        for c in made:
            c.reap()


def _stopped(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def _wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def _files_of(pid):
    """fastmq files in /dev/shm whose name carries ``pid`` (anon/temp names)."""
    return sorted(n for n in os.listdir(SHM_DIR)
                  if n.startswith("fastmq-") and f"-{pid}-" in n)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# A child that creates a queue and stops (or dies) in the middle of its
# initialization. The pure backend writes its magic last, so the child stops
# itself there; the native creator is stopped by the parent while it sizes a
# large segment (or killed at its "init.before_ready" crash point).
_SLOW_CREATOR = """
    import os, signal, sys
    import fastmq
    backend, how, name = sys.argv[1:4]
    if backend == "pure":
        real = os.pwrite
        from fastmq._pure import ring
        def pwrite(fd, data, offset):
            if offset == 0 and bytes(data[:8]) == ring.MAGIC:
                os.kill(os.getpid(), signal.SIGSTOP if how == "stop" else signal.SIGKILL)
            return real(fd, data, offset)
        os.pwrite = pwrite
    print("start", flush=True)
    if name == "-":
        q = fastmq.Queue(2 ** 22, _backend=backend)
    else:
        q = fastmq.Queue.create(name, maxsize=2 ** 22, _backend=backend)
    q.put("made")
    print("created", flush=True)
    sys.stdin.readline()
"""


def _start_slow_creator(child, backend, how, name):
    env = {}
    if backend == "native":
        # Its crash point stops (or kills) it in the middle of initializing:
        # creating a sparse segment is far too quick to catch from outside.
        env = {"FASTMQ_CRASH_AT": "init.before_ready"}
        if how == "stop":
            env["FASTMQ_CRASH_SIGNAL"] = "STOP"
    code = _SLOW_CREATOR.replace("sys.argv[1:4]", repr([backend, how, name]))
    c = child(code, env)
    assert c.line() == "start"
    if how == "stop":
        _wait_until(lambda: _stopped(c.pid), 30, "the creator to stop")
    else:
        assert c.wait(60) == -signal.SIGKILL, c.stderr()
    return c


# ================================================= item: slow creator (open)

def test_open_waits_while_creator_is_alive_and_initializing(backend, child):
    """open() of a queue whose creator is alive but still initializing never
    calls the queue dead (nor tells the user to unlink it); it succeeds once
    the creator finishes."""
    import fastmq
    name = unique_name("slow")
    try:
        c = _start_slow_creator(child, backend, "stop", name)
        errors = []
        deadline = time.monotonic() + 3.0          # > the 2 s open() used to allow
        while time.monotonic() < deadline:
            try:
                fastmq.Queue.open(name, _backend=backend).close()
                errors.append("opened before the creator finished")
            except fastmq.QueueNotFound:
                pass                                   # not there yet: fine
            except Exception as exc:                   # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")
                break
            time.sleep(0.05)
        assert _stopped(c.pid)
        os.kill(c.pid, signal.SIGCONT)
        assert c.line(60) == "created"
        assert not errors, errors
        q = fastmq.Queue.open(name, _backend=backend)
        assert q.get(timeout=5) == "made"
        q.close()
        c.send()
        assert c.wait() == 0
    finally:
        try:
            fastmq.Queue.unlink(name, _backend=backend)
        except Exception:
            pass


# ================================================= item: cleanup grace

_ANON_THEN_DIE = """
    import os, fastmq, sys
    q = fastmq.Queue(4, _backend=sys.argv[1])
    if os.fork() == 0:                     # a second user, killed with it
        q.put(1)
        print(q._ring.name, flush=True)
        os.kill(os.getpid(), 9)
    os.wait()
    print(q._ring.name, flush=True)
    os.kill(os.getpid(), 9)
"""


def test_cleanup_after_kill9_of_every_user_leaves_nothing_at_once(backend, child):
    """Every user of an anonymous queue SIGKILLed: the very next cleanup()
    removes its segment -- no grace period to wait out."""
    import fastmq
    c = child(_ANON_THEN_DIE.replace("sys.argv[1]", repr(backend)))
    seg = c.line()
    path = os.path.join(SHM_DIR, seg)
    try:
        assert c.wait() == -signal.SIGKILL
        assert os.path.exists(path), "nobody closed it: it must still be there"
        fastmq.cleanup()
        assert not os.path.exists(path), f"{seg} survived cleanup() right after the kill"
    finally:
        _unlink_quietly(path)


def test_next_process_start_removes_abandoned_segment_at_once(backend, child):
    c = child(_ANON_THEN_DIE.replace("sys.argv[1]", repr(backend)))
    seg = c.line()
    path = os.path.join(SHM_DIR, seg)
    try:
        assert c.wait() == -signal.SIGKILL
        res = subprocess.run([sys.executable, "-c", "import fastmq"], timeout=60,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert not os.path.exists(path), f"{seg} survived the next fastmq import"
    finally:
        _unlink_quietly(path)


@pytest.mark.parametrize("anonymous", [True, False], ids=["anonymous", "named"])
def test_cleanup_never_removes_a_queue_being_set_up(backend, child, anonymous):
    """cleanup() (and a fresh `import fastmq`) while a creator is frozen in
    the middle of initializing: the creator finishes and its queue works."""
    import fastmq
    name = "-" if anonymous else unique_name("setup")
    try:
        c = _start_slow_creator(child, backend, "stop", name)
        fastmq.cleanup()
        res = subprocess.run([sys.executable, "-c", "import fastmq; fastmq.cleanup()"],
                             timeout=60, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        os.kill(c.pid, signal.SIGCONT)
        assert c.line(60) == "created", c.stderr()
        c.send()
        assert c.wait() == 0, c.stderr()
    finally:
        if not anonymous:
            try:
                fastmq.Queue.unlink(name, _backend=backend)
            except Exception:
                pass


@pytest.mark.parametrize("anonymous", [True, False], ids=["anonymous", "named"])
def test_creator_killed_during_init_leaves_nothing_after_cleanup(backend, child,
                                                                 anonymous):
    """A creator SIGKILLed half-way through initializing: cleanup() removes
    whatever it left (its temporary file); a named queue was never linked in,
    so the name is free and can be created."""
    import fastmq
    name = "-" if anonymous else unique_name("died")
    try:
        c = _start_slow_creator(child, backend, "kill", name)
        fastmq.cleanup()
        assert _files_of(c.pid) == [], "files of the dead creator survived cleanup()"
        if not anonymous:
            q = fastmq.Queue.create(name, maxsize=4, _backend=backend)
            q.put(1)
            assert q.get(timeout=5) == 1
            q.close()
    finally:
        if not anonymous:
            try:
                fastmq.Queue.unlink(name, _backend=backend)
            except Exception:
                pass


def test_cleanup_spares_files_that_are_not_fastmq_segments(monkeypatch):
    """A file that merely has the anonymous prefix is not fastmq's to delete,
    however old and unlocked it is."""
    import fastmq
    from fastmq import _lifetime
    monkeypatch.setattr(_lifetime, "ORPHAN_AGE", -1.0, raising=False)
    path = os.path.join(SHM_DIR, f"fastmq-anon-{os.getpid()}-notours{os.urandom(4).hex()}")
    with open(path, "wb") as f:
        f.write(b"somebody else's data" * 100)
    old = time.time() - 3600
    os.utime(path, (old, old))
    try:
        fastmq.cleanup()
        assert os.path.exists(path), "cleanup() deleted a file that is not a fastmq segment"
    finally:
        _unlink_quietly(path)


# ======================================================== item: blocking open

_OPEN_ANON = """
    import pickle, sys, threading, time
    import fastmq
    blob = bytes.fromhex(sys.argv[1])
    ticks = [0]
    done = threading.Event()
    def tick():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.001)
    threading.Thread(target=tick, daemon=True).start()
    time.sleep(0.1)
    t0 = time.monotonic(); n0 = ticks[0]
    print("opening", flush=True)
    try:
        q = pickle.loads(blob)
        outcome = "opened"
    except Exception as exc:
        outcome = type(exc).__name__
    took = time.monotonic() - t0
    done.set()
    print(outcome, round(took, 2), ticks[0] - n0, flush=True)
"""


def _orphan_anon(child, backend):
    """An anonymous segment nobody holds (its only user was SIGKILLed) and a
    pickle of a handle on it."""
    c = child(f"""
        import os, pickle, fastmq
        q = fastmq.Queue(4, _backend={backend!r})
        print(q._ring.name, pickle.dumps(q).hex(), flush=True)
        os.kill(os.getpid(), 9)
    """)
    seg, blob = c.line().split()
    assert c.wait() == -signal.SIGKILL
    return os.path.join(SHM_DIR, seg), blob


def test_anonymous_open_has_a_deadline_and_releases_the_gil(backend, child):
    """A process holding the segment's exclusive lock (as a closer does for a
    moment) cannot make an opener hang, nor freeze the opener's other
    threads."""
    path, blob = _orphan_anon(child, backend)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)             # and keep it
        c = child(_OPEN_ANON.replace("sys.argv[1]", repr(blob)))
        assert c.line() == "opening"
        outcome, took, ticks = c.line(timeout=20).split()
        assert outcome == "QueueNotFound", outcome
        assert float(took) < 10
        assert int(ticks) >= 20, f"other threads made {ticks} steps while open() waited"
        assert c.wait() == 0
    finally:
        os.close(fd)
        _unlink_quietly(path)


def test_anonymous_open_racing_the_last_close_does_not_attach_to_an_unlinked_segment(
        backend, child):
    """The last closer takes the exclusive lock, unlinks and lets go: an opener
    that was waiting for the lock must see that the name is gone."""
    path, blob = _orphan_anon(child, backend)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        c = child(_OPEN_ANON.replace("sys.argv[1]", repr(blob)))
        assert c.line() == "opening"
        time.sleep(0.3)
        os.unlink(path)                           # what the last closer does ...
        os.close(fd)                              # ... before it lets go
        fd = -1
        outcome = c.line(timeout=20).split()[0]
        assert outcome == "QueueNotFound", f"opener {outcome} an unlinked segment"
        assert c.wait() == 0
    finally:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(path)


# ==================================================== item: other backend

def test_opening_a_segment_of_the_other_backend_names_the_backend(backend, qname):
    import fastmq
    other = "pure" if backend == "native" else "native"
    q = fastmq.Queue.create(qname, maxsize=4, _backend=other)
    try:
        with pytest.raises(fastmq.CorruptQueue) as info:
            fastmq.Queue.open(qname, _backend=backend)
        msg = str(info.value)
        assert f"FASTMQ_BACKEND={other}" in msg, msg
        assert "init state" not in msg, msg
    finally:
        q.close()
        fastmq.Queue.unlink(qname, _backend=other)


# ================================================= item: names and modes

@pytest.mark.parametrize("segment", ["../fastmq-q-x", "fastmq-q-a/../../etc", ".hidden",
                                     "", "a/b", "fastmq-q-\0x"])
def test_ring_refuses_segment_names_that_leave_dev_shm(backend, segment):
    """What a pickled handle carries is a segment name; reopening it must not
    reach outside /dev/shm, on either backend."""
    from fastmq import _backend
    ring = _backend.ring_module(backend).Ring
    with pytest.raises(ValueError):
        ring.open(segment)
    with pytest.raises(ValueError):
        ring.create(segment, maxsize=4, max_message_size=64, capacity_bytes=4096)


def test_unpickling_a_handle_with_a_traversal_name_is_refused(backend, mq):
    q = mq.Queue(4)
    blob = pickle.dumps(q)
    seg = q._ring.name
    evil = blob.replace(seg.encode(), ("../" + seg[3:]).encode())   # same length
    assert evil != blob
    with pytest.raises(ValueError):
        pickle.loads(evil)


@pytest.mark.parametrize("mode", [0o7777, 0o4600, 0o1777, 0o2600, -1, 0o1000])
def test_create_refuses_modes_beyond_permission_bits(backend, qname, mode):
    import fastmq
    from fastmq import _backend
    ring = _backend.ring_module(backend).Ring
    with pytest.raises(ValueError):
        ring.create("fastmq-q-" + qname, maxsize=4, max_message_size=64,
                    capacity_bytes=4096, mode=mode)
    with pytest.raises(ValueError):
        fastmq.Queue.create(qname, maxsize=4, mode=mode, _backend=backend)
    assert not os.path.exists(os.path.join(SHM_DIR, "fastmq-q-" + qname))


def test_create_keeps_exact_permission_mode(backend, qname):
    import fastmq
    q = fastmq.Queue.create(qname, maxsize=4, mode=0o640, _backend=backend)
    try:
        assert os.stat(os.path.join(SHM_DIR, "fastmq-q-" + qname)).st_mode & 0o7777 == 0o640
    finally:
        q.close()


# ============================================ queues: what a name may hold

def _head(path, n=1 << 20):
    """The first n bytes of a segment (header, control lines, participants:
    where an opener that followed the link would register). A segment is
    sparse and may be tens of GiB long: never read it whole."""
    with open(path, "rb") as f:
        return f.read(n)


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_queue_open_of_a_name_that_is_no_regular_file_is_corrupt_queue(backend, mq, planted):
    """A symbolic link to a live queue or a FIFO planted under a queue's name:
    open() raises CorruptQueue naming what it found (without hanging on the
    FIFO), follows no link, and create(exist_ok=True) does the same; the
    queue the link points at is untouched and still works."""
    import fastmq
    real = mq.create(unique_name("real"), maxsize=4)
    real.put_bytes(b"kept")
    victim = os.path.join(SHM_DIR, "fastmq-q-" + real.name)
    name = unique_name(planted)
    path = os.path.join(SHM_DIR, "fastmq-q-" + name)
    try:
        if planted == "symlink":
            os.symlink(victim, path)
        else:
            os.mkfifo(path)
        before = _head(victim)
        for attempt in (lambda: fastmq.Queue.open(name, _backend=backend),
                        lambda: fastmq.Queue.create(name, maxsize=4, exist_ok=True,
                                                    _backend=backend)):
            with pytest.raises(fastmq.CorruptQueue) as info:
                attempt()
            assert name in str(info.value)
            assert ("symlink" if planted == "symlink" else "not a regular file") in \
                str(info.value).replace("symbolic link", "symlink")
        assert _head(victim) == before
        assert real.get_bytes(timeout=5) == b"kept"
    finally:
        _unlink_quietly(path)
        real.close()


# ===================================================== exchanges: symlinks

@pytest.fixture
def xname():
    import fastmq
    names = []

    def make(tag="x"):
        n = unique_name(tag)
        names.append(n)
        return n
    yield make
    for n in names:
        _unlink_quietly(os.path.join(SHM_DIR, "fastmq-x-" + n))


def test_exchange_open_does_not_follow_a_planted_symlink(backend, mq, xname):
    import fastmq
    real = fastmq.Exchange.create(xname("real"), "fanout", _backend=backend)
    victim = os.path.join(SHM_DIR, "fastmq-x-" + real.name)
    before = open(victim, "rb").read()
    planted = xname("planted")
    os.symlink(victim, os.path.join(SHM_DIR, "fastmq-x-" + planted))
    q = mq.create(unique_name("xq"), maxsize=4)
    try:
        with pytest.raises(fastmq.CorruptQueue):
            ex = fastmq.Exchange.open(planted, _backend=backend)
            ex.bind(q.name)                      # would write through the link
        with pytest.raises(fastmq.CorruptQueue):
            fastmq.Exchange.create(planted, "fanout", exist_ok=True, _backend=backend)
        assert open(victim, "rb").read() == before
    finally:
        real.close()


def test_exchange_open_of_a_fifo_does_not_hang(backend, xname):
    import fastmq
    name = xname("fifo")
    os.mkfifo(os.path.join(SHM_DIR, "fastmq-x-" + name))
    with pytest.raises(fastmq.CorruptQueue):
        fastmq.Exchange.open(name, _backend=backend)


# ================================================= exchanges: corruption

_TRUNCATED_PUBLISHER = """
    import sys, fastmq
    ex = fastmq.Exchange.open(sys.argv[1], _backend=sys.argv[2])
    print("published", ex.publish("one"), flush=True)
    sys.stdin.readline()
    for _ in range(3):
        try:
            ex.publish("two")
            print("ok", flush=True)
        except fastmq.CorruptQueue:
            print("CorruptQueue", flush=True)
        sys.stdin.readline()
"""


@pytest.mark.parametrize("size", [0, 20, 64])
def test_exchange_file_truncated_under_a_publisher_does_not_kill_it(backend, mq, xname,
                                                                    child, size):
    """Whoever can write the exchange file can truncate it; a publisher that
    has it open gets CorruptQueue (or routes nowhere), never a SIGBUS."""
    import fastmq
    name = xname("trunc")
    ex = fastmq.Exchange.create(name, "fanout", _backend=backend)
    q = mq.create(unique_name("tq"), maxsize=16)
    ex.bind(q.name)
    path = os.path.join(SHM_DIR, "fastmq-x-" + name)
    c = child(_TRUNCATED_PUBLISHER.replace("sys.argv[1]", repr(name))
              .replace("sys.argv[2]", repr(backend)))
    try:
        assert c.line() == "published 1"
        os.truncate(path, size)
        for _ in range(3):
            c.send()
            said = c.line()
            assert said in ("CorruptQueue", "ok"), said
        c.send()
        rc = c.wait()
        assert rc == 0, f"publisher died (rc={rc}): {c.stderr()}"
    finally:
        ex.close()


_HDR = struct.Struct("<8sQQQQ")


def _exchange_with_bindings(backend, name, mq):
    import fastmq
    ex = fastmq.Exchange.create(name, "topic", _backend=backend)
    q = mq.create(unique_name("cq"), maxsize=64)
    ex.bind(q.name, "a.*")
    ex.bind(q.name, "#")
    ex.close()
    return q


def _exercise(backend, name, qname, q=None):
    """Every exchange entry point: each succeeds or raises CorruptQueue."""
    import fastmq
    while q is not None:                      # room for what is published below
        try:
            q.get_bytes(block=False)
        except fastmq.Empty:
            break
    try:
        ex = fastmq.Exchange.open(name, _backend=backend)
    except fastmq.CorruptQueue:
        return
    try:
        for op in (lambda: ex.bindings(), lambda: ex.publish("m", "a.b"),
                   lambda: ex.publish_many([("a.c", 1), ("z", 2)]),
                   lambda: ex.bind(qname, "b.#"), lambda: ex.unbind(qname, "a.*"),
                   lambda: ex.publish("m", "q")):
            try:
                op()
            except fastmq.CorruptQueue:
                pass
    finally:
        ex.close()


@pytest.mark.parametrize("header", [
    dict(offset=2 ** 63 + 5), dict(offset=2 ** 64 - 1), dict(offset=1 << 40),
    dict(length=2 ** 64 - 1), dict(version=2 ** 64 - 1), dict(turn=2 ** 64 - 1),
    dict(version=2 ** 64 - 2), dict(offset=63), dict(length=0),
], ids=lambda h: ",".join(f"{k}={v:#x}" for k, v in h.items()))
def test_exchange_header_extremes_raise_corrupt_queue(backend, mq, xname, header):
    name = xname("hdr")
    q = _exchange_with_bindings(backend, name, mq)
    path = os.path.join(SHM_DIR, "fastmq-x-" + name)
    with open(path, "r+b") as f:
        magic, version, turn, offset, length = _HDR.unpack(f.read(_HDR.size))
        fields = dict(version=version, turn=turn, offset=offset, length=length)
        fields.update(header)
        f.seek(0)
        f.write(_HDR.pack(magic, fields["version"], fields["turn"], fields["offset"],
                          fields["length"]))
    _exercise(backend, name, q.name, q)


@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,
    json.dumps({"kind": "topic", "bindings": [["../../etc/passwd", "#"]]}).encode(),
    json.dumps({"kind": "topic", "bindings": [[["x"], "#"]]}).encode(),
    json.dumps({"kind": ["topic"], "bindings": []}).encode(),
    json.dumps({"kind": "topic", "bindings": [[1, 2, 3]]}).encode(),
    json.dumps({"kind": "topic", "bindings": 7}).encode(),
    b"\xff\xfe\x00garbage", b"null", b'"str"', b"1e999999",
], ids=range(10))
def test_exchange_body_garbage_raises_corrupt_queue(backend, mq, xname, body):
    name = xname("body")
    q = _exchange_with_bindings(backend, name, mq)
    path = os.path.join(SHM_DIR, "fastmq-x-" + name)
    with open(path, "r+b") as f:
        magic, version, turn, _, _ = _HDR.unpack(f.read(_HDR.size))
        f.seek(64)
        f.write(body)
        f.seek(0)
        f.write(_HDR.pack(magic, version + 7, turn, 64, len(body)))
    _exercise(backend, name, q.name, q)


def test_exchange_random_corruption_raises_only_corrupt_queue(backend, mq, xname):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    name = xname("fuzz")
    q = _exchange_with_bindings(backend, name, mq)
    path = os.path.join(SHM_DIR, "fastmq-x-" + name)
    pristine = open(path, "rb").read()

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(st.lists(st.tuples(st.integers(0, len(pristine) + 8),
                                         st.binary(min_size=1, max_size=9)),
                               min_size=1, max_size=6),
                      st.one_of(st.none(), st.integers(0, len(pristine) + 8)))
    def fuzz(edits, cut):
        data = bytearray(pristine)
        for at, raw in edits:
            data[at:at + len(raw)] = raw
        if cut is not None:
            del data[cut:]
        with open(path, "wb") as f:
            f.write(bytes(data))
        _exercise(backend, name, q.name, q)

    fuzz()


# ================================================= exchanges: routing

def test_publish_reaches_a_queue_that_was_removed_and_created_again(backend, mq, xname):
    import fastmq
    ex = fastmq.Exchange.create(xname("recreate"), "direct", _backend=backend)
    qn = unique_name("rq")
    q1 = mq.create(qn, maxsize=16)
    try:
        ex.bind(qn, "k")
        assert ex.publish("first", "k") == 1
        assert q1.get(timeout=5) == "first"
        q1.close()
        fastmq.Queue.unlink(qn, _backend=backend)
        q2 = mq.create(qn, maxsize=16)
        time.sleep(0.1)
        assert ex.publish("second", "k") == 1
        assert ex.publish_many(["third"], "k") == 1
        assert q2.get(timeout=5) == "second"
        assert q2.get(timeout=5) == "third"
    finally:
        ex.close()


def test_publish_mandatory_raises_unroutable(backend, mq, xname):
    import fastmq
    assert issubclass(fastmq.Unroutable, fastmq.Error)
    ex = fastmq.Exchange.create(xname("mand"), "direct", _backend=backend)
    q = mq.create(unique_name("mq"), maxsize=16)
    try:
        ex.bind(q.name, "hit")
        assert ex.publish("a", "hit", mandatory=True) == 1
        assert ex.publish("b", "miss") == 0
        with pytest.raises(fastmq.Unroutable) as info:
            ex.publish("c", "miss", mandatory=True)
        assert "miss" in str(info.value)
        with pytest.raises(fastmq.Unroutable):
            ex.publish_many([("hit", 1), ("miss", 2)], mandatory=True)
        assert ex.publish_many([("hit", 3)], mandatory=True) == 1
        # a binding whose queue was unlinked routes nowhere either
        q.close()
        fastmq.Queue.unlink(q.name, _backend=backend)
        time.sleep(0.1)                       # > the publisher's recheck interval
        with pytest.raises(fastmq.Unroutable):
            ex.publish("d", "hit", mandatory=True)
    finally:
        ex.close()
