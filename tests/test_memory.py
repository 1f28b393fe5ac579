"""Memory follows use: a queue costs little while idle, grows with its
backlog up to its cap for any mix of sizes, gives memory back when the
backlog drains, and a full /dev/shm is a put that waits (or ``Full`` with the
reason), never a SIGBUS.

The small-/dev/shm tests run a child interpreter in a private mount
namespace (``unshare -m``) with a fresh tmpfs of a given size mounted over
/dev/shm, so they see exactly the space a container with Docker's default
64 MiB /dev/shm has, and cannot disturb other users of the host's /dev/shm.
That needs root (or CAP_SYS_ADMIN); without it those tests fail with a
message saying so unless FASTMQ_TEST_NO_UNSHARE=1 is set, which skips them
(a skip is not coverage: CI runs as root).

Every child is bounded (``timeout``) and reaped; every wait in the children
is bounded too.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastmq
from fastmq.queue import default_capacity_bytes, unbounded_slots

from conftest import native_only, unique_name

SHM = "/dev/shm"
# The documented idle footprint of Queue(): what its /dev/shm file(s) have
# allocated right after creation (README "Defaults of Queue()").
IDLE_FOOTPRINT_LIMIT = 512 << 10
# ... and what a drained queue keeps warm: capacity_bytes / 16, 4-16 MiB
KEEP_LIMIT = 16 << 20


def _segment_path(q):
    return os.path.join(SHM, q._ring.name)


def _allocated(path):
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------- a small tmpfs

def _unshare_ok():
    if os.environ.get("FASTMQ_TEST_NO_UNSHARE") == "1":
        pytest.skip("FASTMQ_TEST_NO_UNSHARE=1: private-tmpfs tests not run")
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("the private-tmpfs tests need `unshare` and root (mount a tmpfs over "
                    "/dev/shm in a private mount namespace); set FASTMQ_TEST_NO_UNSHARE=1 "
                    "to skip them")


PRELUDE = """
import json, os, sys, time, multiprocessing as mp
import fastmq
BE = os.environ["FASTMQ_TEST_BE"]
def shm_free():
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize
def shm_used():
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize
def join(p, timeout=60):
    p.join(timeout)
    if p.is_alive():
        p.kill(); p.join(5)
        raise SystemExit("child did not finish in time")
    return p.exitcode
"""


def run_in_small_shm(backend, code, size="64m", timeout=240):
    """Run ``code`` in a child whose /dev/shm is a fresh tmpfs of ``size``.
    Returns the JSON object the child printed last."""
    _unshare_ok()
    script = PRELUDE + textwrap.dedent(code)
    env = dict(os.environ, FASTMQ_TEST_BE=backend)
    env.pop("FASTMQ_CRASH_AT", None)
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" -c "$1"',
           sys.executable, script]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"child timed out:\n{err.decode()[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != -signal.SIGBUS, "child died of SIGBUS"
    assert proc.returncode == 0, (proc.returncode, err.decode()[-3000:])
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert lines, err.decode()[-3000:]
    return json.loads(lines[-1])


# ---------------------------------------------------------------- idle cost

def test_idle_footprint_of_default_queue(mq):
    q = mq.Queue()
    got = _allocated(_segment_path(q))
    assert got <= IDLE_FOOTPRINT_LIMIT, got
    # and it is sparse: far more address space than memory
    assert os.stat(_segment_path(q)).st_size >= q.capacity_bytes


def test_many_default_queues_fit_64mib_shm(backend):
    res = run_in_small_shm(backend, """
        qs = [fastmq.Queue(_backend=BE) for _ in range(20)]
        used20 = shm_used()
        q = qs[0]
        import numpy as np
        arrays = [np.arange(1 << 17, dtype=np.float64) + i for i in range(20)]
        for i in range(1000):
            q.put(("task", i), timeout=10)
        for a in arrays:
            q.put(a, timeout=10)
        depth = q.qsize()
        def consume(q, out):
            ok = True
            for i in range(1000):
                ok &= q.get(timeout=30) == ("task", i)
            for i in range(20):
                a = q.get(timeout=30)
                ok &= a.shape == (1 << 17,) and bool((a == np.arange(1 << 17) + i).all())
            out.put_nowait(ok)
        out = fastmq.Queue(_backend=BE)
        p = mp.get_context("fork").Process(target=consume, args=(q, out))
        p.start()
        code = join(p)
        print(json.dumps({"used20": used20, "depth": depth, "code": code,
                          "ok": out.get(timeout=10), "empty": q.empty()}))
    """)
    assert res["used20"] <= 20 * IDLE_FOOTPRINT_LIMIT
    assert res["depth"] == 1020
    assert res["code"] == 0 and res["ok"] is True and res["empty"] is True


def test_filling_shm_to_the_last_page_blocks_or_raises_full_with_reason(backend):
    res = run_in_small_shm(backend, """
        q = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=1 << 30, _backend=BE)
        sent = []          # every payload that went in, in order
        reasons = []
        def fill(size):
            n = 0
            while True:
                payload = len(sent).to_bytes(8, "little") * (size // 8)
                try:
                    q.put_bytes(payload, block=False)
                except fastmq.Full as e:
                    reasons.append(str(e))
                    return n
                sent.append(payload)
                n += 1
        big = fill(1 << 20)
        mid = fill(4096)
        small = fill(64)
        free_after = shm_free()
        t0 = time.monotonic()
        try:
            q.put_bytes(b"x" * (1 << 20), timeout=0.3)
            timed = None
        except fastmq.Full as e:
            timed = [time.monotonic() - t0, str(e)]
        # a blocked put goes in once a consumer makes room
        def blocked_put(q):
            q.put_bytes(b"late" * (1 << 18), timeout=30)
        p = mp.get_context("fork").Process(target=blocked_put, args=(q,))
        p.start()
        time.sleep(0.3)
        alive_while_full = p.is_alive()
        got = [q.get_bytes(timeout=10) for _ in range(len(sent))]
        code = join(p)
        while True:
            try:
                got.append(q.get_bytes(timeout=1))
            except fastmq.Empty:
                break
        intact = got[:len(sent)] == sent and got[len(sent):] == [b"late" * (1 << 18)]
        print(json.dumps({"big": big, "mid": mid, "small": small, "reasons": reasons,
                          "free_after": free_after, "timed": timed,
                          "alive_while_full": alive_while_full, "code": code,
                          "intact": intact, "n": len(got), "sent": len(sent)}))
    """)
    assert res["big"] >= 55, res        # 64 MiB of /dev/shm, minus our own metadata
    assert "/dev/shm" in res["reasons"][0], res["reasons"]
    assert res["mid"] >= 1 or res["small"] >= 1
    assert res["free_after"] < 512 << 10, res      # filled to (nearly) the last page
    took, why = res["timed"]
    assert took >= 0.25 and "/dev/shm" in why, res["timed"]
    assert res["alive_while_full"] and res["code"] == 0
    assert res["intact"], (res["n"], res["sent"])


def test_footprint_comes_back_after_a_500mib_backlog_drains(backend):
    """The memory of a 500 MiB backlog comes back once it has drained and its
    demand is over (two windows, about 2 s), while a consumer waits on the
    empty queue."""
    res = run_in_small_shm(backend, """
        q = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=640 << 20, _backend=BE)
        path = os.path.join("/dev/shm", q._ring.name)
        idle = os.stat(path).st_blocks * 512
        chunk = b"m" * (1 << 20)
        for i in range(500):
            q.put_bytes(chunk, timeout=10)
        peak = os.stat(path).st_blocks * 512
        def drain(q):
            for _ in range(500):
                assert q.get_bytes(timeout=30) == chunk
        p = mp.get_context("fork").Process(target=drain, args=(q,))
        p.start()
        code = join(p, 120)
        after = os.stat(path).st_blocks * 512
        def wait_on_empty(q):
            try:
                q.get_bytes(timeout=8)
            except fastmq.Empty:
                pass
        w = mp.get_context("fork").Process(target=wait_on_empty, args=(q,))
        w.start()
        time.sleep(3.5)
        waiting = w.is_alive()
        during = os.stat(path).st_blocks * 512
        w.kill()
        join(w)
        print(json.dumps({"idle": idle, "peak": peak, "after": after, "code": code,
                          "during": during, "waiting": waiting}))
    """, size="800m")
    assert res["code"] == 0
    assert res["peak"] >= 500 << 20
    assert res["waiting"], res          # measured while the consumer was still waiting
    # back down to the idle footprint
    assert res["during"] <= res["idle"] + (1 << 20), res


def test_a_working_set_that_cycles_stays_warm(backend):
    """A queue that cycles ten 1 MiB messages (a stream a few deep, a backlog
    swinging between empty and its peak) keeps their pages between cycles
    instead of giving them back and faulting them in again for every message
    (the 1 MiB zero-copy throughput depends on it)."""
    depth, room = 10, (1 << 20) + (64 << 10)
    q = fastmq.Queue(maxsize=depth, max_message_size=room, capacity_bytes=2 * depth * room,
                     _backend=backend)
    try:
        path = _segment_path(q)
        idle = _allocated(path)
        import numpy as np
        a = np.ones(1 << 20, np.uint8)
        for cycle in range(5):
            for _ in range(depth):
                q.put(a, timeout=5)
            views = [q.get(zero_copy=True, timeout=5) for _ in range(depth)]
            assert all(v.nbytes == a.nbytes for v in views)
            del views
            # drained, and still holding the cycle's pages for the next one
            assert q.qsize() == 0
            assert _allocated(path) >= idle + depth * (1 << 20), (cycle, _allocated(path))
    finally:
        q.close()


def test_an_idle_queue_gives_memory_back_when_its_process_uses_another(backend):
    """Warm memory is not kept per queue forever: a drained queue that nobody
    touches any more gives it back once its demand is over, when any other
    queue of the same process is used."""
    a = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=64 << 20, _backend=backend)
    b = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=64 << 20, _backend=backend)
    try:
        path = _segment_path(a)
        idle = _allocated(path)
        for _ in range(32):
            a.put_bytes(b"a" * (1 << 20), timeout=5)
        for _ in range(32):
            a.get_bytes(timeout=5)
        assert _allocated(path) >= idle + (32 << 20)    # warm: its demand is recent
        time.sleep(2.3)                                  # two demand windows
        assert _allocated(path) >= idle + (32 << 20)    # nobody looked: still there
        b.put_bytes(b"b" * (1 << 20), timeout=5)
        assert b.get_bytes(timeout=5) == b"b" * (1 << 20)
        assert _allocated(path) <= idle + (1 << 20), _allocated(path)
        # and the queue works as before
        a.put_bytes(b"again" * 1000, timeout=5)
        assert a.get_bytes(timeout=5) == b"again" * 1000
    finally:
        a.close()
        b.close()


def test_a_full_shm_takes_the_warm_memory_of_the_processs_other_queues(backend):
    """/dev/shm full: a put sheds the warm blocks of every queue its process
    has open before it reports no room, so memory parked in a drained queue
    never makes another one's put wait."""
    res = run_in_small_shm(backend, """
        a = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=48 << 20, _backend=BE)
        b = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=128 << 20, _backend=BE)
        for _ in range(40):
            a.put_bytes(b"a" * (1 << 20), timeout=5)
        for _ in range(40):
            a.get_bytes(timeout=5)
        path = os.path.join("/dev/shm", a._ring.name)
        warm = os.stat(path).st_blocks * 512
        n = 0
        try:
            while True:
                b.put_bytes(n.to_bytes(8, "little") * (1 << 17), block=False)
                n += 1
        except fastmq.Full as e:
            why = str(e)
        ok = all(b.get_bytes(timeout=5) == i.to_bytes(8, "little") * (1 << 17)
                 for i in range(n))
        print(json.dumps({"warm": warm, "n": n, "why": why, "ok": ok,
                          "kept_after": os.stat(path).st_blocks * 512}))
    """)
    assert res["warm"] >= 40 << 20, res       # the drained queue held its blocks warm
    assert res["n"] >= 50, res                # ... and the other queue got them
    assert "/dev/shm" in res["why"] and res["ok"], res
    assert res["kept_after"] <= 1 << 20, res


def test_a_short_shm_keeps_no_warm_memory(backend):
    """With /dev/shm nearly full, a drained queue gives its pages back at
    once rather than parking them where other queues need room: it keeps
    warm memory only while an eighth of /dev/shm stays free."""
    res = run_in_small_shm(backend, """
        q = fastmq.Queue(max_message_size=1 << 20, capacity_bytes=48 << 20, _backend=BE)
        path = os.path.join("/dev/shm", q._ring.name)
        idle = os.stat(path).st_blocks * 512
        for _ in range(30):
            q.put_bytes(b"q" * (1 << 20), timeout=5)
        # something else takes nearly all that is left
        with open("/dev/shm/filler", "wb") as f:
            left = shm_free()
            f.write(bytes(left - (3 << 20)))
        time.sleep(0.05)
        for _ in range(30):
            q.get_bytes(timeout=5)
        st = os.statvfs("/dev/shm")
        print(json.dumps({"after": os.stat(path).st_blocks * 512, "free": shm_free(),
                          "size": st.f_blocks * st.f_frsize,
                          "kept": os.stat(path).st_blocks * 512 - idle}))
    """)
    # one 1 MiB block of slack: the free that crossed the line kept its block;
    # "kept" also counts the ring and in-flight pages the traffic touched (a
    # few KiB, not warm memory), which the bound allows for separately
    assert res["free"] >= res["size"] // 8 - (1 << 20), res
    assert res["kept"] <= (30 << 20) - res["size"] // 8 + (2 << 20) + (64 << 10), res


# ---------------------------------------------------------------- one pool for all sizes

@pytest.mark.parametrize("lo, hi", [(1000, 100_000), (20_000, 100_000)])
def test_byte_sized_queue_holds_what_its_bytes_allow(mq, lo, hi):
    """faster-fifo users size queues in bytes: capacity_bytes ==
    max_message_size == 8 MiB. Messages of 1-100 KB fill (nearly) all of it."""
    cap = 8 << 20
    q = mq.Queue(max_message_size=cap, capacity_bytes=cap)
    rnd = random.Random(lo)
    sent = []
    while True:
        data = rnd.randbytes(rnd.randint(lo, hi))
        try:
            q.put_bytes(data, block=False)
        except fastmq.Full as e:
            assert "capacity_bytes" in str(e) or "memory cap" in str(e), str(e)
            break
        sent.append(data)
    held = sum(map(len, sent))
    # what is lost is under one page per message (block pages) or one record
    # header (pure byte ring), plus the one message that did not fit
    assert held >= cap - len(sent) * 4096 - hi, (held, len(sent))
    assert len(sent) >= cap // (hi + 4096)
    for data in sent:
        assert q.get_bytes(timeout=5) == data


def test_one_size_can_use_the_whole_cap(mq):
    """No class has a fixed share: 1 MiB arrays alone fill the cap."""
    np = pytest.importorskip("numpy")
    q = mq.Queue(capacity_bytes=64 << 20)
    n = 0
    a = np.ones(1 << 17)
    while True:
        try:
            q.put(a, block=False)
        except fastmq.Full:
            break
        n += 1
    assert n >= 60, n                 # 64 MiB / (1 MiB + pickle header, paged)
    assert not q.full()               # a small message still fits (inline / ring)
    q.put("small", block=False)


def test_mixed_sizes_use_the_cap_and_drain_intact(mq):
    cap = 32 << 20
    q = mq.Queue(max_message_size=1 << 20, capacity_bytes=cap)
    rnd = random.Random(7)
    sent = []
    while True:
        data = rnd.randbytes(int(64 * (2 ** rnd.uniform(0, 14))))   # 64 B .. 1 MiB
        try:
            q.put_bytes(data, block=False)
        except fastmq.Full:
            break
        sent.append(data)
    big = sum(len(d) for d in sent if len(d) > 256)
    assert big >= 0.85 * cap, (big, len(sent))
    for data in sent:
        assert q.get_bytes(timeout=5) == data


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("maxsize", [0, -1, -100])
def test_maxsize_le_0_is_unbounded_by_count(mq, maxsize):
    q = mq.Queue(maxsize)
    assert q.maxsize == unbounded_slots(q.capacity_bytes) >= 1 << 16
    n = 20_000                         # far past the old 8192 default
    assert q.put_many(range(n), block=False) == n
    assert not q.full()
    assert q.qsize() == n
    assert q.get_many(n, timeout=5) == list(range(n))


def test_default_cap_is_a_share_of_shm_never_below_64mib(mq):
    q = mq.Queue()
    st = os.statvfs(SHM)
    share = st.f_frsize * st.f_blocks // 4
    assert q.capacity_bytes == max(64 << 20, 2 * q.max_message_size, min(share, 1 << 30))
    assert q.capacity_bytes == default_capacity_bytes()
    assert q.max_message_size >= 1 << 20
    q.put(b"x" * (1 << 20), timeout=5)     # a 1 MiB message
    assert len(q.get(timeout=5)) == 1 << 20


def test_full_is_true_exactly_when_a_small_put_would_block(mq):
    q = mq.Queue(3)
    for i in range(3):
        assert not q.full()
        q.put(i, block=False)
    assert q.full()
    with pytest.raises(fastmq.Full, match="maximum of 3 messages"):
        q.put(99, block=False)
    q.get(timeout=5)
    assert not q.full()
    q.put(3, block=False)
    # memory-bound: a big message may not fit while a small one does
    m = mq.Queue(capacity_bytes=1 << 20, max_message_size=1 << 20)
    m.put_bytes(b"b" * 900_000, block=False)
    with pytest.raises(fastmq.Full, match="capacity_bytes"):
        m.put_bytes(b"b" * 300_000, block=False)
    assert not m.full()
    m.put("small", block=False)


def test_full_and_empty_carry_readable_messages(mq):
    q = mq.Queue(1)
    with pytest.raises(fastmq.Empty) as e:
        q.get(block=False)
    assert "empty" in str(e.value)
    with pytest.raises(fastmq.Empty) as e:
        q.get(timeout=0.05)
    assert "empty" in str(e.value)
    q.put(1)
    with pytest.raises(fastmq.Full) as f:
        q.put(2, timeout=0.05)
    assert "full" in str(f.value) and "1 messages" in str(f.value)


# ---------------------------------------------------------------- crash safety of growth

def _child(code, crash, timeout=60):
    env = dict(os.environ, FASTMQ_CRASH_AT=crash, FASTMQ_BACKEND="native")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(), err.decode()


def _pages(n):
    return -(-n // 4096) * 4096


# Longer than two demand windows of the native pool (1 s each): a queue idle
# that long keeps no warm memory.
SLEEP_WINDOWS = "__import__('time').sleep(2.2)"
IDLE_THEN_FREE = ("[q.put_bytes(b'd' * (1 << 20)) for _ in range(8)];"
                  " [q.get_bytes() for _ in range(8)];"
                  f" {SLEEP_WINDOWS}; q.put_bytes(b'd' * (1 << 20)); q.get_bytes()")

# (crash point, what the child does before it dies there)
GROWTH_STEPS = [
    ("ring.grow.reserved:2", "for i in range(600): q.put_bytes(b'%06d' % i)"),
    ("pool.grow.reserved", "q.put_bytes(b'a' * 5000)"),
    ("pool.grow.carved", "q.put_bytes(b'a' * 5000)"),
    ("pool.alloc.popped:2", "q.put_bytes(b'a' * 5000); q.put_bytes(b'b' * 5000)"),
    ("pool.commit.reserved:2", "q.put_bytes(b'a' * 5000); q.put_bytes(b'b' * 70000)"),
    ("pool.commit.trimmed",
     "q.put_bytes(b'a' * (1 << 20)); q.get_bytes(); q.put_bytes(b'c' * 300000)"),
    # a free punches once the demand that kept its block warm is over
    ("pool.free.unrecorded", IDLE_THEN_FREE),
    ("pool.free.punched", IDLE_THEN_FREE),
    ("pool.free.before_push",
     "[q.put_bytes(b'd' * (1 << 20)) for _ in range(8)]; [q.get_bytes() for _ in range(8)]"),
    # warm blocks cooled: past the demand at a free, by a consumer that finds
    # the queue empty, and for a block of another size
    ("pool.cool.popped", IDLE_THEN_FREE),
    ("pool.cool.popped",
     "[q.put_bytes(b'e' * (1 << 20)) for _ in range(8)]; [q.get_bytes() for _ in range(8)];"
     f" {SLEEP_WINDOWS}; q.get_bytes(timeout=0.3)"),
    ("pool.cool.popped",
     "[q.put_bytes(b'e' * (1 << 20)) for _ in range(8)]; [q.get_bytes() for _ in range(8)];"
     " q.put_bytes(b'f' * 200000); q.get_bytes()"),
    ("lease.grow.reserved",
     "q.put_many_bytes([b'%06d' % i for i in range(300)]) if hasattr(q, 'put_many_bytes') "
     "else [q.put_bytes(b'%06d' % i) for i in range(300)];"
     " ms = [q.get_message(lease=60) for _ in range(300)]"),
]


@pytest.mark.parametrize("point, action", GROWTH_STEPS,
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(GROWTH_STEPS)])
def test_killed_at_each_growth_and_shrink_step_leaks_and_wedges_nothing(backend, point, action):
    native_only(backend, "crash points are compiled into the C core")
    name = unique_name("mem")
    cap = 32 << 20
    fastmq.Queue.create(name, maxsize=16384, max_message_size=1 << 20, capacity_bytes=cap,
                        _backend="native").close()
    try:
        rc, out, err = _child(f"""
            import fastmq
            q = fastmq.Queue.open({name!r})
            {action}
            print("survived")
        """, point)
        assert rc == -signal.SIGKILL, (rc, out, err[-2000:])
        # Alone now: opening reaps the dead child and audits the pool.
        q = fastmq.Queue.open(name, _backend="native")
        try:
            # whatever the child committed is intact and countable
            left = []
            while True:
                try:
                    left.append(q.get_bytes(timeout=2 if point.startswith("lease") else 0.2))
                except fastmq.Empty:
                    break
            for data in left:
                assert len(set(data)) <= 10 or data[:6].isdigit(), data[:16]
            mem = q._ring.memory()
            assert mem["blocks_in_use"] == 0, mem          # counters recomputed
            carved, free, held = q._ring._pool_census()
            assert carved == free + held and held == 0, (carved, free, held)   # none lost
            assert mem["blocks_kept"] <= KEEP_LIMIT
            # nothing leaked: for every size class the child used, the whole
            # cap is usable again (a block lost from a free stack would be
            # missing from its class's count), and it drains
            for size in (1 << 20, 5000, 300):
                data = b"z" * size
                n = 0
                while True:
                    try:
                        q.put_bytes(data, block=False)
                    except fastmq.Full as e:
                        assert "capacity_bytes" in str(e), str(e)
                        break
                    n += 1
                assert n == cap // _pages(size), (size, n)
                for _ in range(n):
                    assert q.get_bytes(timeout=5) == data
                assert q._ring.memory()["blocks_in_use"] == 0
            # and the file holds no pages beyond the records (the audit punched
            # them), except at most one ring or lease chunk a grower killed
            # after its fallocate reserved ahead (the next growth uses it)
            mem = q._ring.memory()
            chunk = 256 * (256 + 64)
            assert _allocated(os.path.join(SHM, q._ring.name)) <= mem["reserved"] + chunk
        finally:
            q.close()
    finally:
        try:
            fastmq.Queue.unlink(name, _backend="native")
        except fastmq.QueueNotFound:
            pass


def test_growth_soak_backlog_swings_from_empty_to_cap(mq):
    """A backlog that swings between empty and the cap, several times, with a
    consumer process: every swing fills the whole cap and drains intact, and
    the memory comes back after each drain."""
    cap = 16 << 20
    q = mq.Queue(max_message_size=1 << 20, capacity_bytes=cap)
    rnd = random.Random(3)
    path = _segment_path(q)
    idle = _allocated(path)
    import multiprocessing as mp
    for swing in range(3):
        sent = []
        while True:
            data = bytes([swing]) * rnd.randint(300, 1 << 20)
            try:
                q.put_bytes(data, block=False)
            except fastmq.Full:
                break
            sent.append(len(data))
        assert sum(sent) >= 0.85 * cap
        out = mq.Queue()
        p = mp.get_context("fork").Process(target=_drain_sizes, args=(q, out, len(sent)))
        p.start()
        try:
            got = out.get(timeout=60)
        finally:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        assert got == sent
        assert _allocated(path) <= idle + KEEP_LIMIT + (1 << 20)


def _drain_sizes(q, out, n):
    out.put([len(q.get_bytes(timeout=30)) for _ in range(n)])


def test_stats_show_the_memory_reserved(mq):
    q = mq.Queue(capacity_bytes=64 << 20, max_message_size=1 << 20)
    path = _segment_path(q)
    idle = q.stats()["memory"]["reserved"]
    assert idle <= IDLE_FOOTPRINT_LIMIT
    for _ in range(8):
        q.put_bytes(b"x" * (1 << 20), timeout=5)
    busy = q.stats()["memory"]["reserved"]
    assert busy >= idle + (8 << 20)
    assert abs(busy - _allocated(path)) <= 256 << 10     # what the file really holds
    assert q.stats()["memory"]["virtual_size"] == os.stat(path).st_size


# ---------------------------------------------------------------- ring pages

RING_TRAFFIC = """
import fastmq, sys
q = fastmq.Queue.open(sys.argv[1])
for k in range(70):                      # more than one lap of a 65,536-slot ring
    q.put_many_bytes([b"r" * 100] * 1000)
    for _ in range(1000):
        q.get_bytes(timeout=5)
for i in range(int(sys.argv[2])):        # and leave this many queued
    q.put_bytes(b"left %d" % i)
print("ready", flush=True)
if sys.argv[3] == "die":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
q.close()
"""


def _ring_queue(backend):
    name = unique_name("ring")
    q = fastmq.Queue.create(name, capacity_bytes=64 << 20, _backend=backend)
    path = _segment_path(q)
    q.close()
    return name, path


def _traffic(name, left=0, how="close"):
    proc = subprocess.run([sys.executable, "-c", RING_TRAFFIC, name, str(left), how],
                          capture_output=True, timeout=120)
    assert b"ready" in proc.stdout, proc.stderr.decode()[-2000:]
    return proc.returncode


def _ring_alive(q, n=3000):
    """The queue still works across laps: n messages in order."""
    for i in range(n):
        q.put_bytes(b"%d" % i, timeout=5)
    assert [q.get_bytes(timeout=5) for _ in range(n)] == [b"%d" % i for i in range(n)]


@pytest.mark.parametrize("how", ["close", "die"])
def test_ring_pages_come_back_once_a_drained_queue_is_left_alone(backend, how):
    """A queue that has passed more messages than its ring has slots holds
    the whole ring (16 MiB for a 64 MiB cap); once it is drained and nobody
    uses it (its last handle closed, or the last user killed and the queue
    opened again), the ring's pages come back, and the queue works as
    before."""
    native_only(backend, "the pure backend's byte ring restarts at 0 and punches past its "
                         "warm part at every drain (the 500 MiB test)")
    name, path = _ring_queue(backend)
    idle = _allocated(path)
    try:
        rc = _traffic(name, 0, how)
        assert rc == (0 if how == "close" else -signal.SIGKILL)
        if how == "close":
            assert _allocated(path) <= idle + (64 << 10), _allocated(path)
        else:
            assert _allocated(path) >= 16 << 20    # the dead user left it all
        q = fastmq.Queue.open(name, _backend=backend)
        try:
            assert _allocated(path) <= idle + (64 << 10), _allocated(path)
            assert q.stats()["memory"]["slots_reserved"] <= 512
            _ring_alive(q)
            m = q.get_message if hasattr(q, "get_message") else None
            q.put_bytes(b"leased", timeout=5)
            msg = m(timeout=5)
            assert bytes(msg.data) == b"leased"
            msg.ack()
        finally:
            q.close()
    finally:
        fastmq.Queue.unlink(name, _backend=backend)


def test_ring_pages_stay_while_the_queue_holds_messages_or_has_users(backend):
    """Ring pages are given back only when that cannot touch a message:
    not while another process has the queue open, not with a backlog."""
    native_only(backend, "the pure backend's byte ring restarts at 0 and punches past its "
                         "warm part at every drain (the 500 MiB test)")
    name, path = _ring_queue(backend)
    try:
        # a backlog, and nobody else: the last close keeps every message
        assert _traffic(name, 5, "close") == 0
        assert _allocated(path) >= 16 << 20
        q = fastmq.Queue.open(name, _backend=backend)      # alone, not empty: kept
        assert _allocated(path) >= 16 << 20
        assert [q.get_bytes(timeout=5) for _ in range(5)] == [b"left %d" % i for i in range(5)]
        # drained, but another process has it open: closing one handle keeps it
        holder = subprocess.Popen(
            [sys.executable, "-c", "import fastmq, sys; q = fastmq.Queue.open(sys.argv[1]);"
             " print('open', flush=True); sys.stdin.readline();"
             " q.put_bytes(b'from holder'); q.close()", name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline().strip() == b"open"
            q.close()
            assert _allocated(path) >= 16 << 20
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
            assert holder.wait(timeout=30) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        # the holder's message went in and was kept through its (last) close
        q = fastmq.Queue.open(name, _backend=backend)
        try:
            assert q.get_bytes(timeout=5) == b"from holder"
            _ring_alive(q)
        finally:
            q.close()
        assert _allocated(path) <= 512 << 10
    finally:
        fastmq.Queue.unlink(name, _backend=backend)


@pytest.mark.parametrize("point", ["ring.compact.begun", "ring.compact.punched"])
def test_killed_while_giving_the_ring_back_leaves_a_working_queue(backend, point):
    """A process killed at any step of giving the ring back: the next opener
    finishes the job before anyone uses the ring; nothing is wedged."""
    native_only(backend, "crash points are compiled into the C core")
    name, path = _ring_queue(backend)
    try:
        assert _traffic(name, 0, "die") == -signal.SIGKILL
        rc, out, err = _child(f"""
            import fastmq
            q = fastmq.Queue.open({name!r})
            print("survived")
        """, point)
        assert rc == -signal.SIGKILL, (rc, out, err[-2000:])
        q = fastmq.Queue.open(name, _backend=backend)
        try:
            assert _allocated(path) <= 512 << 10, _allocated(path)
            _ring_alive(q)
            assert q.qsize() == 0
        finally:
            q.close()
    finally:
        fastmq.Queue.unlink(name, _backend=backend)
