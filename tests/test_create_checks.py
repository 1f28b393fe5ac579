"""A create's parameter checks, on both media: a queue in shared memory and a
durable queue's file.

Both creates in the C core (fmq_region_create, fmq_durable_create) run the
same checks before they touch anything: the permission bits, the geometry
(maxsize, slot_size, max_message_size, capacity_bytes) and the dead-letter
name's length. Each bad value must raise ValueError naming the parameter,
leave nothing behind (no queue, no temporary file), and, when a queue of
that name exists (exist_ok=True), leave it as it was: same file, same
messages. The native core is driven at its Ring level here, where every
value reaches the C checks (the Queue layer checks most of them itself
first: the last test runs the same values through it, on every backend).
"""
from __future__ import annotations

import json
import os
import uuid

import pytest

import fastmq
from conftest import SHM_DIR, durable_dir, unique_name, wait_until, where

pytestmark = [pytest.mark.timeout(60)]

GEOMETRY = dict(maxsize=4, max_message_size=64, capacity_bytes=4096)

#: (keyword overrides, the start of the C core's message for them)
BAD = [
    ({"maxsize": 0}, "maxsize must be between 1 and"),
    ({"maxsize": (1 << 24) + 1}, "maxsize must be between 1 and"),
    ({"slot_size": 100}, "slot_size must be a multiple of 64"),
    ({"slot_size": 32}, "slot_size must be a multiple of 64"),
    ({"slot_size": 65536 + 64}, "slot_size must be a multiple of 64"),
    ({"max_message_size": 0}, "max_message_size must be between 1 and"),
    ({"capacity_bytes": 63}, "capacity_bytes must be at least max_message_size"),
    ({"capacity_bytes": (4 << 40) + 1}, "capacity_bytes must be at least max_message_size"),
    ({"dead_letter": "d" * 256}, "dead_letter name too long"),
    ({"mode": 0o1000}, "mode must be permission bits only"),
    ({"mode": 0o4600}, "mode must be permission bits only"),
]
IDS = [",".join(f"{k}={v if len(str(v)) < 12 else '...'}" for k, v in kw.items())
       for kw, _ in BAD]


def _ring():
    from fastmq import _backend
    return _backend.ring_module("native").Ring


class Medium:
    """One place a queue lives: create a ring there, and list what is there."""

    def __init__(self, kind, tmp_dir):
        self.kind = kind
        self.segment = f"fastmq-q-ctest-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        if kind == "file":
            self.dir = tmp_dir
            self.path = os.path.join(tmp_dir, self.segment + ".fmq")
        else:
            self.dir = SHM_DIR
            self.path = os.path.join(SHM_DIR, self.segment)

    def create(self, **kw):
        params = dict(GEOMETRY)
        params.update(kw)
        if self.kind == "file":
            return _ring().create_durable(self.segment, self.path, sync="none", **params)
        return _ring().create(self.segment, **params)

    def ours(self):
        """What this test has in the medium's directory: the queue's file
        and any temporary file a create of it (by this process) made."""
        if self.kind == "file":
            base = os.path.basename(self.path)
            return sorted(n for n in os.listdir(self.dir) if n.startswith(base))
        tmp = f"fastmq-tmp-{os.getpid()}-"
        return sorted(n for n in os.listdir(self.dir)
                      if n == self.segment or n.startswith(tmp))

    def remove(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@pytest.fixture(params=["shm", "file"])
def medium(request):
    pytest.importorskip("fastmq._core")
    d = None
    if request.param == "file":
        d = os.path.join(durable_dir(), f"ctest-{uuid.uuid4().hex[:10]}")
        os.makedirs(d)
    m = Medium(request.param, d)
    yield m
    m.remove()
    if d is not None:
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)


@pytest.mark.parametrize("kw,message", BAD, ids=IDS)
def test_bad_parameter_is_refused_and_creates_nothing(medium, kw, message):
    before = medium.ours()
    assert before == []
    with pytest.raises(ValueError, match=message):
        medium.create(**kw)
    with pytest.raises(ValueError, match=message):
        medium.create(exist_ok=True, **kw)
    assert medium.ours() == []


@pytest.mark.parametrize("kw,message", BAD, ids=IDS)
def test_bad_parameter_leaves_an_existing_queue_as_it_was(medium, kw, message):
    """The checks come before the name is looked at: exist_ok=True with a bad
    value is refused too, and the queue already there keeps its file and its
    messages."""
    q = medium.create()
    try:
        q.put_bytes(b"kept-1")
        q.put_bytes(b"kept-2")
        inode = os.stat(medium.path).st_ino
        with pytest.raises(ValueError, match=message):
            medium.create(exist_ok=True, **kw)
        with pytest.raises(ValueError, match=message):
            medium.create(**kw)
        assert os.stat(medium.path).st_ino == inode
        assert medium.ours() == [os.path.basename(medium.path)]
        assert q.get_bytes(timeout=5) == b"kept-1"
        assert q.get_bytes(timeout=5) == b"kept-2"
    finally:
        q.close()


def test_a_good_create_after_refusals_works(medium):
    """The refusals above leave nothing half-made that would stop the name
    from being created afterwards."""
    for kw, message in BAD:
        with pytest.raises(ValueError, match=message):
            medium.create(**kw)
    q = medium.create()
    try:
        q.put_bytes(b"x")
        assert q.get_bytes(timeout=5) == b"x"
    finally:
        q.close()


#: What the Queue layer takes of BAD (it has no slot_size); it may refuse them
#: itself, before the core, with its own wording: ValueError either way.
QUEUE_BAD = [{"maxsize": (1 << 24) + 1}, {"max_message_size": 0}, {"capacity_bytes": 63},
             {"dead_letter": "d" * 256}, {"mode": 0o1000}, {"mode": 0o4600}]


@pytest.mark.backends("native", "pure", "file")
@pytest.mark.parametrize("kw", QUEUE_BAD, ids=repr)
def test_queue_create_refuses_bad_parameters_on_every_location(backend, kw):
    name = unique_name("badcreate")
    params = dict(maxsize=4, max_message_size=64, capacity_bytes=4096)
    params.update(kw)
    with pytest.raises(ValueError):
        fastmq.Queue.create(name, **where(backend), **params)
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open(name, **where(backend))
    place = durable_dir() if backend == "file" else SHM_DIR
    assert [n for n in os.listdir(place) if name in n] == []


# ------------------------------------------------- losing the race for the name

#: Where each medium's create stops, complete and registered, just before it
#: links its temporary file into place.
BEFORE_LINK = {"shm": "init.before_link", "file": "durable.create.before_link"}

_LOSER = r"""
import json, sys, fastmq
kind, name, where, exist_ok = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
place = {"url": where} if kind == "file" else {"_backend": "native"}
try:
    q = fastmq.Queue.create(name, maxsize=8, max_message_size=4096, capacity_bytes=1 << 20,
                            exist_ok=exist_ok, **place)
except fastmq.QueueExists as e:
    print(json.dumps(["exists", str(e)]))
else:
    print(json.dumps(["opened", q.get_bytes(timeout=5).decode()]))
    q.close()
"""


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _leftovers(kind, pid, where):
    """The temporary files a create by pid left: none, once it is over."""
    if kind == "file":
        return [n for n in os.listdir(where) if ".tmp-" in n]
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"fastmq-tmp-{pid}-")]


@pytest.mark.parametrize("exist_ok", [False, True], ids=["exclusive", "exist_ok"])
@pytest.mark.parametrize("kind", ["shm", "file"])
def test_create_that_loses_the_link_race(kind, exist_ok):
    """A creator frozen just before its link while another process creates
    the same name: when it goes on, its link fails. Exclusive, it raises
    QueueExists; with exist_ok it opens the winner's queue (and gets the
    winner's message). Either way its temporary file is gone and the
    winner's queue is untouched."""
    import signal
    import subprocess
    import sys
    pytest.importorskip("fastmq._core")
    name = unique_name("linkrace")
    where_ = None
    if kind == "file":
        where_ = os.path.join(durable_dir(), f"linkrace-{uuid.uuid4().hex[:10]}")
        os.makedirs(where_)
        place = {"url": "file://" + where_}
    else:
        place = {"_backend": "native"}
    env = dict(os.environ, FASTMQ_CRASH_AT=BEFORE_LINK[kind], FASTMQ_CRASH_SIGNAL="STOP")
    child = subprocess.Popen(
        [sys.executable, "-c", _LOSER, kind, name, place.get("url", ""), "1" if exist_ok else "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    q = None
    try:
        assert wait_until(lambda: _state(child.pid) == "T", 30), "the creator never stopped"
        assert _leftovers(kind, child.pid, where_), "the frozen creator has no temporary file?"
        q = fastmq.Queue.create(name, maxsize=8, max_message_size=4096,
                                capacity_bytes=1 << 20, **place)
        q.put_bytes(b"winner's")
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        outcome = json.loads(out.strip().splitlines()[-1])
        if exist_ok:
            assert outcome == ["opened", "winner's"]
        else:
            assert outcome[0] == "exists" and "already exists" in outcome[1]
            assert q.get_bytes(timeout=5) == b"winner's"
        assert _leftovers(kind, child.pid, where_) == []
        q.put_bytes(b"after")
        assert q.get_bytes(timeout=5) == b"after"
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
        if q is not None:
            q.close()
            fastmq.Queue.unlink(name, **place)
        if where_ is not None:
            for n in os.listdir(where_):
                os.unlink(os.path.join(where_, n))
            os.rmdir(where_)
