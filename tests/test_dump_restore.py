"""``fastmq dump`` / ``fastmq restore``: backup, restore and migration of queues.

Every test drives the real command line in a subprocess (``python -m fastmq``)
against real queues: shared memory on both backends, and a private
``redis-server`` (``conftest``'s session server). The file format itself is
checked in-process (``fastmq._dump``): every truncation and every single-bit
flip of a dump is refused.

Crash safety: the dumping process is killed with SIGKILL at each of its
crash points (``FASTMQ_DUMP_CRASHPOINT``) and at random moments within the
time a dump takes; after the killed process's leases came back, every
message is in the queue or in a complete dump file -- never lost, never
torn -- and a file named FILE is always a complete dump.
"""
from __future__ import annotations

import collections
import glob
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest

import fastmq
from fastmq import _dump
import conftest
from conftest import WITH_REDIS, assert_one_line_error, unique_name
from redis_support import fresh_server  # noqa: F401 - a fixture

# Durable file:// queues join every test (and the moves) where this tree has
# them: conftest then knows the "file" location.
HAVE_FILE = hasattr(conftest, "durable_url")
pytestmark = pytest.mark.backends(*WITH_REDIS, *(("file",) if HAVE_FILE else ()))


# ----------------------------------------------------------------- helpers

class Loc:
    """A location as the tests address it: shared memory of one backend
    (``FASTMQ_BACKEND`` for the command line), a Redis server or a durable
    directory (``--url``)."""

    def __init__(self, kind, url=None):
        self.kind, self.url = kind, url
        self.names = []

    def kw(self):
        return {"url": self.url} if self.url else {"_backend": self.kind}

    def env(self):
        env = dict(os.environ)
        env.pop("FASTMQ_URL", None)
        env.pop("FASTMQ_DUMP_CRASHPOINT", None)
        if self.kind == "redis":
            env.pop("FASTMQ_BACKEND", None)
        else:
            env["FASTMQ_BACKEND"] = "native" if self.kind == "file" else self.kind
        return env

    def args(self):
        return ["--url", self.url] if self.url else []

    def create(self, name, **kw):
        q = fastmq.Queue.create(name, **self.kw(), **kw)
        self.names.append(name)
        return q

    def open(self, name):
        return fastmq.Queue.open(name, **self.kw())

    def forget(self, name):
        self.names.append(name)

    def cleanup(self):
        for name in self.names:
            try:
                fastmq.Queue.unlink(name, **self.kw())
            except Exception:  # noqa: BLE001 - already gone
                pass


def _make_loc(request, kind):
    url = None
    if kind == "redis":
        url = request.getfixturevalue("_redis_session").url
    elif kind == "file":
        url = conftest.durable_url()
    loc = Loc(kind, url)
    request.addfinalizer(loc.cleanup)
    return loc


@pytest.fixture
def loc(request, backend):
    return _make_loc(request, backend)


def fmq(loc, *args, timeout=120, crashpoint=None):
    env = loc.env()
    if crashpoint:
        env["FASTMQ_DUMP_CRASHPOINT"] = crashpoint
    return subprocess.run([sys.executable, "-m", "fastmq", *args, *loc.args()],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_ok(res):
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert res.stderr == "", res.stderr


def payloads(n, seed=0, big_every=0):
    """``n`` distinct payloads of mixed sizes (one of ``big_every`` is 150 KB:
    a pool block on the native backend, not an inline slot)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        size = 150_000 if big_every and i % big_every == big_every - 1 else rnd.randrange(0, 300)
        out.append(b"%07d|" % i + rnd.randbytes(size))
    return out


def fill(q, items):
    for i in range(0, len(items), 500):
        assert q.put_many_bytes(items[i:i + 500], timeout=30) == len(items[i:i + 500])


def drain(q):
    out = []
    while True:
        try:
            out += q.get_many_bytes(1000, block=False)
        except fastmq.Empty:
            return out


def wait_leases_back(q, timeout=30.0):
    """Until no message of ``q`` is in flight (a killed dump's leases came back)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q.redeliver_expired()
        if not q.pending():
            return
        time.sleep(0.1)
    raise AssertionError(f"leases still out after {timeout} s: {q.pending()[:3]}")


def dump_payloads(path):
    return [bytes(p) for _, p in _dump.read_dump(path).records]


def small_dump(tmp_path, n=3):
    """A dump file made by the writer, for the format tests."""
    path = tmp_path / "small.dump"
    with open(path, "wb") as f:
        w = _dump.DumpWriter(f, {"format": "fastmq-dump", "name": "x", "queue": {
            "maxsize": 10, "max_message_size": 1000, "capacity_bytes": None,
            "max_deliveries": 5, "dead_letter": None, "file_mode": None}})
        for i in range(n):
            w.add(b"payload-%d" % i * (i + 1), deliveries=i)
        w.finish()
    return path


def rewrite_version(data, version):
    """``data`` with another format version and every checksum made right
    again: only the version is wrong."""
    data = bytearray(data)
    struct.pack_into("<H", data, 8, version)
    (hlen,) = struct.unpack_from("<I", data, 12)
    hend = 16 + hlen
    struct.pack_into("<I", data, hend, zlib.crc32(bytes(data[:hend])))
    import hashlib
    dpos = len(data) - 32 - len(_dump.END)
    data[dpos:dpos + 32] = hashlib.sha256(bytes(data[:dpos])).digest()
    return bytes(data)


# ------------------------------------------------------------- the format

def test_format_round_trip_keeps_order_lengths_and_delivery_counts(tmp_path):
    path = small_dump(tmp_path, 4)
    d = _dump.read_dump(path)
    assert [bytes(p) for _, p in d.records] == [b"payload-%d" % i * (i + 1) for i in range(4)]
    assert [n for n, _ in d.records] == [0, 1, 2, 3]
    assert d.count == 4 and d.header["queue"]["max_deliveries"] == 5
    data = path.read_bytes()
    assert data.startswith(_dump.MAGIC) and data.endswith(_dump.END)


def test_every_truncation_is_refused(tmp_path):
    data = small_dump(tmp_path).read_bytes()
    for cut in range(len(data)):
        with pytest.raises(_dump.CorruptDump) as info:
            _dump.parse_dump(data[:cut])
        assert "nothing was restored" in str(info.value)


def test_every_single_bit_flip_is_refused(tmp_path):
    data = small_dump(tmp_path).read_bytes()
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            with pytest.raises(_dump.CorruptDump):
                _dump.parse_dump(bytes(damaged))


def test_padding_other_versions_and_other_files_are_refused(tmp_path):
    data = small_dump(tmp_path).read_bytes()
    with pytest.raises(_dump.CorruptDump, match="after the end"):
        _dump.parse_dump(data + b"\0")
    with pytest.raises(_dump.CorruptDump, match="format version 2.*newer"):
        _dump.parse_dump(rewrite_version(data, 2))
    _dump.parse_dump(rewrite_version(data, 1))          # the rewrite itself is sound
    with pytest.raises(_dump.CorruptDump, match="not a fastmq dump"):
        _dump.parse_dump(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(_dump.CorruptDump, match="not a fastmq dump"):
        _dump.parse_dump(b"")


# ------------------------------------------------------------ round trips

def test_copy_leaves_the_queue_as_it_was_and_restores_elsewhere(loc, tmp_path):
    name, copy = unique_name("src"), unique_name("dst")
    q = loc.create(name, maxsize=5000, max_message_size=200_000, max_deliveries=7,
                   dead_letter=unique_name("dlq"))
    items = payloads(300, big_every=50)
    fill(q, items)
    q.put({"an": "object", "n": [1, 2, 3]})
    path = tmp_path / "q.dump"
    res = fmq(loc, "dump", name, "-o", str(path))
    assert_ok(res)
    assert "dumped 301 message(s)" in res.stdout
    assert not glob.glob(str(path) + ".*.partial")
    # The queue: the same messages in the same order, each delivered once more.
    ms = []
    while len(ms) < 301:
        ms += q.get_messages(301 - len(ms), timeout=5, lease=60.0)
    assert [bytes(m.data) for m in ms[:300]] == items
    assert ms[300].value == {"an": "object", "n": [1, 2, 3]}
    assert {m.delivery_count for m in ms} == {2}
    for m in ms:
        m.nack()
    assert q.stats()["dead_lettered"] == 0
    # The dump restores into a new queue with the same options and contents.
    res = fmq(loc, "restore", str(path), copy)
    assert_ok(res)
    loc.forget(copy)
    assert "restored 301 message(s)" in res.stdout and "new queue" in res.stdout
    r = loc.open(copy)
    try:
        assert r.maxsize == 5000 and r.max_message_size == 200_000
        assert _dump.queue_options(r)["max_deliveries"] == 7
        got = r.get_many_bytes(300, timeout=5)
        while len(got) < 300:
            got += r.get_many_bytes(300 - len(got), timeout=5)
        assert got == items
        assert r.get(timeout=5) == {"an": "object", "n": [1, 2, 3]}
    finally:
        r.close()
        q.close()


def test_drain_moves_every_message_exactly(loc, tmp_path):
    name, copy = unique_name("src"), unique_name("dst")
    q = loc.create(name)
    items = payloads(1200, seed=3, big_every=100)
    fill(q, items)
    path = tmp_path / "q.dump"
    res = fmq(loc, "dump", name, "-o", str(path), "--drain")
    assert_ok(res)
    assert "dumped 1200 message(s)" in res.stdout and "drained" in res.stdout
    assert q.qsize() == 0 and q.pending() == []
    assert dump_payloads(path) == items
    d = _dump.read_dump(path)
    assert d.header["mode"] == "drain" and {n for n, _ in d.records} == {0}
    assert_ok(fmq(loc, "restore", str(path), copy))
    loc.forget(copy)
    r = loc.open(copy)
    try:
        assert drain(r) == items
    finally:
        r.close()
        q.close()


def test_empty_queue_round_trip_recreates_its_options(loc, tmp_path):
    name, copy = unique_name("src"), unique_name("dst")
    q = loc.create(name, maxsize=17, max_message_size=4096, max_deliveries=3)
    q.close()
    path = tmp_path / "e.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path)))
    res = fmq(loc, "restore", str(path), copy)
    assert_ok(res)
    loc.forget(copy)
    r = loc.open(copy)
    try:
        assert (r.maxsize, r.max_message_size) == (17, 4096)
        assert _dump.queue_options(r)["max_deliveries"] == 3
        assert r.qsize() == 0
    finally:
        r.close()


def test_unbounded_queue_stays_unbounded(loc, tmp_path):
    name = unique_name("src")
    q = loc.create(name)                     # maxsize=0: no message bound
    q.put_bytes(b"x")
    try:
        path = tmp_path / "u.dump"
        assert_ok(fmq(loc, "dump", name, "-o", str(path)))
        assert _dump.read_dump(path).header["queue"]["maxsize"] == 0
    finally:
        q.close()


MOVES = [("native", "pure"), ("pure", "native"), ("native", "redis"), ("redis", "native"),
         ("pure", "redis"), ("redis", "pure")]
if HAVE_FILE:
    MOVES += [("native", "file"), ("file", "native"), ("pure", "file"), ("file", "redis"),
              ("redis", "file")]


@pytest.mark.parametrize("src,dst", MOVES)
def test_move_between_locations(request, tmp_path, src, dst):
    a, b = _make_loc(request, src), _make_loc(request, dst)
    name = unique_name("mv")
    q = a.create(name, maxsize=2000, max_message_size=300_000, max_deliveries=4)
    items = payloads(400, seed=7, big_every=40)
    fill(q, items)
    q.put(("a tuple", 1.5, None))
    path = tmp_path / "mv.dump"
    res = fmq(a, "dump", name, "-o", str(path), "--drain")
    assert_ok(res)
    assert q.qsize() == 0
    q.close()
    fastmq.Queue.unlink(name, **a.kw())           # a migration: the old one goes
    res = fmq(b, "restore", str(path), name)      # the same name, elsewhere
    assert_ok(res)
    b.forget(name)
    r = b.open(name)
    try:
        assert (r.maxsize, r.max_message_size) == (2000, 300_000)
        assert _dump.queue_options(r)["max_deliveries"] == 4
        got = drain_n(r, 400)
        assert got == items
        assert r.get(timeout=5) == ("a tuple", 1.5, None)
    finally:
        r.close()


def drain_n(q, n):
    got = []
    while len(got) < n:
        got += q.get_many_bytes(n - len(got), timeout=5)
    return got


# ---------------------------------------------------- last delivery (copy)

def test_copy_of_a_message_on_its_last_delivery_keeps_it(loc, tmp_path):
    name, dlq = unique_name("src"), unique_name("dlq")
    q = loc.create(name, max_deliveries=2, dead_letter=dlq)
    loc.forget(dlq)
    q.put_bytes(b"tired")
    q.put_bytes(b"fresh")
    m = q.get_message(timeout=5, lease=60.0)       # "tired": delivery 1 of 2
    m.nack()                                       # -> back of the queue, 1 delivery used
    path = tmp_path / "c.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path)))
    assert dump_payloads(path) == [b"fresh", b"tired"]
    # The dump was "tired"'s 2nd and last delivery: a nack would have
    # dead-lettered it; it is back as a fresh copy instead.
    assert drain_n(q, 2) == [b"fresh", b"tired"]
    assert q.stats()["dead_lettered"] == 0
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open(dlq, **loc.kw())
    q.close()


def test_copy_killed_between_the_fresh_copy_and_its_ack_loses_nothing(loc, tmp_path):
    name, dlq = unique_name("src"), unique_name("dlq")
    q = loc.create(name, max_deliveries=1, dead_letter=dlq)
    loc.forget(dlq)
    q.put_bytes(b"only")
    path = tmp_path / "k.dump"
    res = fmq(loc, "dump", name, "-o", str(path), crashpoint="copy-put")
    assert res.returncode == -signal.SIGKILL, (res.stdout, res.stderr)
    assert dump_payloads(path) == [b"only"]            # the file was already complete
    deadline = time.monotonic() + 30
    while q.pending() and time.monotonic() < deadline:
        q.redeliver_expired()
        time.sleep(0.1)
    # The copy is in the queue; the original, whose holder died on its last
    # delivery, went to the dead-letter queue, as for any consumer.
    assert drain_n(q, 1) == [b"only"]
    wait_for_dead_letter = time.monotonic() + 30
    got = []
    while not got and time.monotonic() < wait_for_dead_letter:
        q.redeliver_expired()
        try:
            d = fastmq.Queue.open(dlq, **loc.kw())
        except fastmq.QueueNotFound:
            time.sleep(0.1)
            continue
        try:
            got = d.get_many_bytes(10, timeout=0.2)
        except fastmq.Empty:
            pass
        finally:
            d.close()
    assert got == [b"only"]
    q.close()


# --------------------------------------------------------- kill -9 anywhere

DRAIN_POINTS = ["leased-some", "written", "published", "drain-acked-some"]
COPY_POINTS = ["leased-some", "written", "published"]


def _check_after_kill(q, path, items, drained):
    """After a killed dump: every message is in the queue or in a complete
    FILE; FILE, if it exists, is complete; a partial file left behind is
    refused unless it happens to be complete (killed between writing its
    last byte and naming it), and then it is the whole dump too."""
    for partial in glob.glob(str(path) + ".*.partial"):
        try:
            assert dump_payloads(partial) == items
        except _dump.CorruptDump:
            pass
        os.unlink(partial)
    in_file = dump_payloads(path) if os.path.exists(path) else []
    if in_file:
        assert in_file == items                 # complete, in order
    wait_leases_back(q)
    in_queue = drain(q)
    counts = collections.Counter(in_queue)
    # A copy gives messages back one nack at a time, and a queue requeues a
    # message before it frees the old entry: killed inside a nack, that one
    # message may be there twice. A drain never nacks once it has leased.
    twice = [p for p, c in counts.items() if c > 1]
    assert max(counts.values(), default=1) <= 2, "a message is in the queue three times"
    assert len(twice) <= (0 if drained else 1), f"{len(twice)} message(s) in the queue twice"
    assert set(in_queue) <= set(items), "the queue holds something it was never given"
    missing = set(items) - set(in_queue) - set(in_file)
    assert not missing, f"{len(missing)} message(s) lost"
    if not drained or not in_file:
        assert set(counts) == set(items)               # nothing left the queue
    if os.path.exists(path):
        os.unlink(path)


def _killed_dump(loc, name, path, drain_flag, crashpoint=None, delay=None):
    """Run a dump; with ``delay``, SIGKILL it ``delay`` seconds after its
    temporary file appeared (the dump's own work starts then, after the
    interpreter's start-up). Returns (exit status, seconds from the
    temporary file's appearance to the exit, or None)."""
    args = [sys.executable, "-m", "fastmq", "dump", name, "-o", str(path), *loc.args()]
    if drain_flag:
        args.append("--drain")
    env = loc.env()
    if crashpoint:
        env["FASTMQ_DUMP_CRASHPOINT"] = crashpoint
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = None
    try:
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            if started is None and glob.glob(str(path) + ".*.partial"):
                started = time.monotonic()
            if started is not None and delay is not None and \
                    time.monotonic() - started >= delay:
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert b"Traceback" not in err, err
    return p.returncode, None if started is None else time.monotonic() - started


@pytest.mark.parametrize("drain_flag", [True, False], ids=["drain", "copy"])
def test_sigkill_of_the_dump_at_every_crash_point_loses_nothing(loc, tmp_path, drain_flag):
    name = unique_name("kill")
    q = loc.create(name, max_deliveries=1000)
    items = payloads(1500, seed=11, big_every=300)     # > one lease batch, > one ack batch
    path = tmp_path / "k.dump"
    try:
        for point in (DRAIN_POINTS if drain_flag else COPY_POINTS):
            fill(q, items)
            rc, _ = _killed_dump(loc, name, path, drain_flag, crashpoint=point)
            assert rc == -signal.SIGKILL, point
            assert os.path.exists(path) == (point in ("published", "drain-acked-some")), point
            _check_after_kill(q, path, items, drain_flag)
    finally:
        q.close()


@pytest.mark.parametrize("drain_flag", [True, False], ids=["drain", "copy"])
def test_sigkill_of_the_dump_at_random_moments_loses_nothing(loc, tmp_path, drain_flag):
    name = unique_name("kill")
    q = loc.create(name, max_deliveries=1000)
    items = payloads(3000, seed=13, big_every=500)
    path = tmp_path / "r.dump"
    seed = int(os.environ.get("FASTMQ_TEST_SEED") or random.randrange(1 << 30))
    rnd = random.Random(seed)
    try:
        # How long the dump's own work takes here (from its temporary file
        # on), so that the kills land within it:
        fill(q, items)
        rc, span = _killed_dump(loc, name, path, False)
        assert rc == 0 and span is not None
        os.unlink(path)
        assert drain(q) == items
        # A dead redis consumer takes 5 s to notice; a durable dump flushes.
        rounds = 3 if loc.kind in ("redis", "file") else 10
        for _ in range(rounds):
            fill(q, items)
            delay = rnd.uniform(0, span)
            _killed_dump(loc, name, path, drain_flag, delay=delay)
            try:
                _check_after_kill(q, path, items, drain_flag)
            except AssertionError as exc:
                raise AssertionError(f"killed {delay:.3f} s into the dump "
                                     f"(FASTMQ_TEST_SEED={seed}): {exc}") from None
    finally:
        q.close()


# -------------------------------------------------------------- refusals

def _damaged(kind, data):
    if kind == "truncated":
        return data[:len(data) * 2 // 3]
    if kind == "bit-flipped":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x10
        return bytes(b)
    return rewrite_version(data, 9)


@pytest.mark.parametrize("kind,needle", [("truncated", "truncated"),
                                         ("bit-flipped", "damaged"),
                                         ("wrong-version", "format version 9")])
def test_damaged_dump_restores_nothing(loc, tmp_path, kind, needle):
    name = unique_name("src")
    q = loc.create(name)
    fill(q, payloads(50, seed=5))
    good = tmp_path / "good.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(good)))
    bad = tmp_path / f"{kind}.dump"
    bad.write_bytes(_damaged(kind, good.read_bytes()))
    # Into a new queue: refused, and the queue is not even created.
    fresh = unique_name("new")
    loc.forget(fresh)
    res = fmq(loc, "restore", str(bad), fresh)
    assert_one_line_error(res, "CorruptDump", needle, "nothing was restored")
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open(fresh, **loc.kw())
    # Into an existing queue, even with --append: it is left as it was.
    other = loc.create(unique_name("old"))
    other.put_bytes(b"kept")
    res = fmq(loc, "restore", str(bad), other.name, "--append")
    assert_one_line_error(res, "CorruptDump", needle)
    assert drain(other) == [b"kept"]
    other.close()
    q.close()


def test_restore_refuses_a_queue_that_holds_messages_unless_append(loc, tmp_path):
    name = unique_name("src")
    q = loc.create(name)
    fill(q, [b"a", b"b"])
    path = tmp_path / "a.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path)))
    res = fmq(loc, "restore", str(path), name)
    assert_one_line_error(res, "already holds 2 message(s)", "--append", "nothing was restored")
    assert drain(q) == [b"a", b"b"]
    # In flight counts as holding messages too.
    q.put_bytes(b"z")
    m = q.get_message(timeout=5, lease=60.0)
    res = fmq(loc, "restore", str(path), name)
    assert_one_line_error(res, "already holds 1 message(s)")
    m.ack()
    # An existing empty queue is restored into; --append adds behind.
    assert_ok(fmq(loc, "restore", str(path), name))
    q.put_bytes(b"c")
    res = fmq(loc, "restore", str(path), name, "--append")
    assert_ok(res)
    assert drain(q) == [b"a", b"b", b"c", b"a", b"b"]
    q.close()


def test_restore_refuses_messages_the_queue_cannot_take(loc, tmp_path):
    name, small = unique_name("src"), unique_name("small")
    q = loc.create(name, max_message_size=10_000)
    q.put_bytes(b"x" * 5000)
    path = tmp_path / "big.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path)))
    s = loc.create(small, max_message_size=1000)
    res = fmq(loc, "restore", str(path), small)
    assert_one_line_error(res, "at most 1000 bytes", "nothing was restored")
    assert s.qsize() == 0
    s.close()
    q.close()


def test_dump_never_overwrites_without_force(loc, tmp_path):
    name = unique_name("src")
    q = loc.create(name)
    q.put_bytes(b"new")
    path = tmp_path / "exists.dump"
    path.write_bytes(b"precious")
    res = fmq(loc, "dump", name, "-o", str(path))
    assert_one_line_error(res, "exists", "--force")
    assert path.read_bytes() == b"precious"
    assert drain(q) == [b"new"]                  # the refused dump took nothing
    q.put_bytes(b"new")
    assert_ok(fmq(loc, "dump", name, "-o", str(path), "--force"))
    assert dump_payloads(path) == [b"new"]
    q.close()


def test_errors_and_usage_exit_codes(loc, tmp_path):
    missing = unique_name("none")
    res = fmq(loc, "dump", missing, "-o", str(tmp_path / "m.dump"))
    assert_one_line_error(res, "QueueNotFound", missing)
    assert not os.listdir(tmp_path)              # no file, not even a partial one
    res = fmq(loc, "restore", str(tmp_path / "absent.dump"), missing)
    assert_one_line_error(res, "absent.dump")
    (tmp_path / "text.dump").write_text("hello\n")
    res = fmq(loc, "restore", str(tmp_path / "text.dump"), missing)
    assert_one_line_error(res, "not a fastmq dump")
    for args in (["dump", "x"], ["restore", "f"], ["dump", "x", "-o", "f", "--lease", "0"],
                 ["restore", "f", "x", "--timeout", "nan"], ["dump", "-o", "f"]):
        res = fmq(loc, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr
    res = fmq(loc, "dump", "bad/name", "-o", str(tmp_path / "b.dump"))
    assert_one_line_error(res)


def test_credentials_are_never_printed_or_stored(request, fresh_server, tmp_path):
    secret = "dump-S3cret-77"
    server = fresh_server(password="other-" + secret, acl_user=("fmq", secret))
    url = server.url
    assert secret in url
    loc = Loc("redis", url)
    request.addfinalizer(loc.cleanup)
    q = loc.create("credq")
    fill(q, [b"1", b"2"])
    path = tmp_path / "c.dump"
    texts = []
    for args in (["dump", "credq", "-o", str(path)], ["restore", str(path), "credq2"],
                 ["restore", str(path), "credq2"],
                 ["dump", "missing", "-o", str(tmp_path / "m.dump")]):
        res = fmq(loc, *args)
        texts += [res.stdout, res.stderr]
    loc.forget("credq2")
    assert texts[1] == "" and texts[3] == "" and "already holds" in texts[5]
    assert "QueueNotFound" in texts[7]
    wrong = Loc("redis", url.replace(secret, "wrong"))
    res = fmq(wrong, "dump", "credq", "-o", str(tmp_path / "w.dump"))
    assert res.returncode == 1
    texts += [res.stdout, res.stderr]
    assert _dump.read_dump(path).header["source"].startswith("redis://***@127.0.0.1:")
    texts.append(path.read_bytes().decode("latin-1"))
    for t in texts:
        assert secret not in t, t
    q.close()


def test_fastmq_url_in_the_environment_is_the_default_location(request, tmp_path):
    r = _make_loc(request, "redis")
    name = unique_name("env")
    q = r.create(name)
    fill(q, [b"over", b"there"])
    env = dict(os.environ, FASTMQ_URL=r.url)
    env.pop("FASTMQ_BACKEND", None)
    path = tmp_path / "env.dump"
    for args in (["dump", name, "-o", str(path), "--drain"], ["rm", name],
                 ["restore", str(path), name]):
        res = subprocess.run([sys.executable, "-m", "fastmq", *args], capture_output=True,
                             text=True, timeout=60, env=env)
        assert_ok(res)
    q.close()
    q = r.open(name)
    assert drain(q) == [b"over", b"there"]
    q.close()
    with pytest.raises(fastmq.QueueNotFound):       # nothing went to shared memory
        fastmq.Queue.open(name)


def test_authenticated_messages_stay_sealed(loc, tmp_path):
    if loc.kind == "redis":
        pytest.skip("not on redis: authkey= is a shared-memory feature")
    key = b"k" * 32
    name, copy = unique_name("src"), unique_name("dst")
    q = loc.create(name, authkey=key)
    q.put({"signed": True})
    path = tmp_path / "a.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path), "--drain"))   # the dump has no key
    assert_ok(fmq(loc, "restore", str(path), copy))
    loc.forget(copy)
    r = fastmq.Queue.open(copy, authkey=key, **loc.kw())
    assert r.get(timeout=5) == {"signed": True}                     # the tag survived
    r.close()
    q.close()


def test_restore_larger_than_one_atomic_batch_goes_in_order(loc, tmp_path):
    name, copy = unique_name("src"), unique_name("dst")
    q = loc.create(name)
    items = payloads(_dump.ATOMIC_MAX + 904, seed=17)
    fill(q, items)
    path = tmp_path / "big.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path), "--drain"))
    res = fmq(loc, "restore", str(path), copy)
    assert_ok(res)
    loc.forget(copy)
    assert "atomic" not in res.stdout
    r = loc.open(copy)
    assert drain(r) == items
    # A small one goes in as one atomic batch wherever the location has them.
    fill(r, items[:10])
    small = tmp_path / "small.dump"
    assert_ok(fmq(loc, "dump", copy, "-o", str(small)))
    other = unique_name("dst2")
    res = fmq(loc, "restore", str(small), other)
    assert_ok(res)
    loc.forget(other)
    assert ("as one atomic batch" in res.stdout) == _dump._supports_atomic(r), res.stdout
    r.close()
    q.close()


def test_messages_leased_by_a_consumer_are_not_dumped_and_stay(loc, tmp_path):
    name = unique_name("src")
    q = loc.create(name)
    fill(q, [b"held", b"ready"])
    m = q.get_message(timeout=5, lease=60.0)
    path = tmp_path / "l.dump"
    res = fmq(loc, "dump", name, "-o", str(path), "--drain")
    assert_ok(res)
    assert "1 message(s) leased by consumers are not in it" in res.stdout
    assert dump_payloads(path) == [b"ready"]
    assert bytes(m.data) == b"held"
    m.nack()                                      # still the queue's: it comes back
    assert drain(q) == [b"held"]
    q.close()


def test_a_full_in_flight_table_is_reported_not_hidden(loc, tmp_path):
    if loc.kind == "redis":
        pytest.skip("not on redis: its in-flight entries have no fixed table")
    name = unique_name("src")
    q = loc.create(name, maxsize=4)
    fill(q, [b"0", b"1", b"2", b"3"])
    held = q.get_messages(2, timeout=5, lease=60.0)        # 2 of the 4 table entries
    fill(q, [b"4", b"5"])                                    # 4 ready again
    path = tmp_path / "t.dump"
    res = fmq(loc, "dump", name, "-o", str(path))
    assert_ok(res)
    assert "2 ready message(s) are not in it" in res.stdout, res.stdout
    assert "2 message(s) leased by consumers are not in it" in res.stdout, res.stdout
    assert dump_payloads(path) == [b"2", b"3"]
    for m in held:
        m.nack()
    # Nothing lost (the nacked ones may wait for room before they are back).
    deadline = time.monotonic() + 10
    got = []
    while len(got) < 6 and time.monotonic() < deadline:
        q.redeliver_expired()
        got += drain(q)
        time.sleep(0.05)
    assert sorted(got) == [b"0", b"1", b"2", b"3", b"4", b"5"]
    q.close()


def test_file_mode_is_kept_on_shared_memory(loc, tmp_path):
    if loc.kind in ("redis", "file"):
        pytest.skip("shared memory only: a dump records the mode of a segment")
    name, copy = unique_name("src"), unique_name("dst")
    q = loc.create(name, mode=0o640)
    q.close()
    path = tmp_path / "m.dump"
    assert_ok(fmq(loc, "dump", name, "-o", str(path)))
    assert _dump.read_dump(path).header["queue"]["file_mode"] == 0o640
    assert_ok(fmq(loc, "restore", str(path), copy))
    loc.forget(copy)
    r = loc.open(copy)
    assert _dump.queue_options(r)["file_mode"] == 0o640
    r.close()
    assert oct(os.stat(str(path)).st_mode & 0o777) == oct(0o600)   # the dump: owner only
