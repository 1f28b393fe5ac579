"""A live scribbler: a helper process overwrites random words of a live
segment while a producer and consumers run, for a bounded time.

What must hold however the words are damaged: no process dies by a signal
(segfault, SIGBUS), nothing hangs (every child finishes within its bound),
only fastmq's typed exceptions surface, and no message longer than the
queue's max_message_size is ever handed out (no read past what a slot or a
block holds). A ``CorruptQueue``, a lost or a repeated message are
acceptable outcomes of the damage. Every payload carries its own length and
checksum, and what a consumer receives is checked against them:

* ``control`` -- the words that order the queue: slot words, the head/tail
  hints, in-flight entry words and deadlines, block state words, the
  free-stack tops and the wait words. A torn message must never be
  delivered.
* ``lengths`` -- also the stored lengths and block references of queued and
  in-flight messages. Without a checksum of the payload in the queue, a
  plausible but wrong length cannot be told from a right one, so a message
  with wrong bytes may be delivered: like changing payload bytes, that is
  what a process with write access can do to a reader (README "Security").
  What must hold is the rest: no crash, no hang, no over-read.
* ``lengths`` and ``payload`` with ``authkey=``: the scribbler also changes
  payload bytes in slots and blocks, and every handle has the key. Now a
  changed message must be rejected (``AuthenticationError``), never
  delivered: every message received must verify.

Offsets come from the segment's header (``csrc/fmq_layout.h``). NATIVE ONLY:
the pure backend's file has another layout (its damaged-record tests are in
``test_promises_core.py``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import fastmq
from conftest import native_only

DURATION = float(os.environ.get("FASTMQ_SCRIBBLE_SECONDS", "6"))

_COMMON = """
import os, random, struct, sys, time, zlib
import fastmq
NAME, BACKEND, DURATION, SEED = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
MODE, KEY = sys.argv[5], (bytes.fromhex(sys.argv[6]) or None)
MAX_MESSAGE = 32768
rng = random.Random(SEED)
TYPED = (fastmq.Error, fastmq.Full, fastmq.Empty, ValueError)
end = time.monotonic() + DURATION

def pack(seq, size):
    body = rng.randbytes(size)
    return struct.pack("<QI", seq, zlib.crc32(body)) + body

def verify(data):
    data = bytes(data)
    if len(data) < 12:
        return False
    seq, crc = struct.unpack_from("<QI", data)
    return zlib.crc32(data[12:]) == crc
"""

_PRODUCER = _COMMON + """
q = fastmq.Queue.open(NAME, _backend=BACKEND, authkey=KEY)
sent = errors = 0
kinds = {}
while time.monotonic() < end:
    size = rng.choice([4, 100, 200, 3000, 20000])
    try:
        q.put_bytes(pack(sent, size), timeout=0.05)
        sent += 1
    except TYPED as exc:
        errors += 1
        kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
q.close()
print("sent", sent, "errors", errors, kinds, flush=True)
"""

_CONSUMER = _COMMON + """
q = fastmq.Queue.open(NAME, _backend=BACKEND, authkey=KEY)
read = sys.argv[7]
got = torn = errors = 0
while time.monotonic() < end:
    try:
        if read == "get":
            items = [q.get_bytes(timeout=0.05)]
        elif read == "many":
            # Without a key, the ring's own batch read; with one, the checked one.
            items = (q.get_many_bytes(8, timeout=0.05) if KEY else
                     q._ring.get_many(8, 0.05, None))
        else:
            msgs = q.get_messages(8, timeout=0.05, lease=0.5)
            items = [bytes(m.data) for m in msgs]
            for m in msgs:
                try:
                    m.ack()
                except TYPED:
                    errors += 1
    except fastmq.Empty:
        continue
    except TYPED:
        errors += 1
        continue
    for data in items:
        got += 1
        if len(data) > MAX_MESSAGE:
            print("OVERREAD", len(data), flush=True)
        if not verify(data):
            torn += 1
            print("TORN", len(data), bytes(data[:16]).hex(), flush=True)
q.close()
print("got", got, "torn", torn, "errors", errors, flush=True)
"""

_SCRIBBLER = _COMMON + """
import mmap
fd = os.open("/dev/shm/" + sys.argv[7], os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size)
(slots, stride, ncls, _mms, _cap, nparts, _md, ctl, parts, ring, lease) = \\
    struct.unpack_from("<QIIQQIIQQQQ", m, 32)
classes = [struct.unpack_from("<QQQQ", m, 112 + 32 * c) for c in range(ncls)]
targets = []
targets += [ctl + 0, ctl + 128, ctl + 256, ctl + 384]            # tail, head, data, space
targets += [ctl + 512 + 128 * c for c in range(ncls)]            # free-stack tops
targets += [ring + i * stride for i in range(slots)]             # slot words
targets += [lease + i * (stride + 64) + k for i in range(slots) for k in (0, 8, 48)]
for size, nblocks, meta, data in classes:                        # block state words
    targets += [meta + 16 * b for b in range(min(nblocks, 64))]
if MODE in ("lengths", "payload"):
    # len | block of each slot (offset 8) and of each in-flight entry (32)
    targets += [ring + i * stride + 8 for i in range(slots)] * 4
    targets += [lease + i * (stride + 64) + 32 for i in range(slots)] * 4
if MODE == "payload":
    # payload bytes: inline in slots (past their 32-byte header), in entries
    # (past 64), and in the first blocks of each class
    inline = [ring + i * stride + 32 + 8 * k for i in range(slots)
              for k in range((stride - 32) // 8)]
    inline += [lease + i * (stride + 64) + 64 + 8 * k for i in range(slots)
               for k in range((stride - 32) // 8)]
    blocks = [data + b * size + 8 * k for size, nblocks, meta, data in classes
              for b in range(min(nblocks, 16)) for k in range(0, min(size, 4096) // 8)]
    payload = inline + blocks
    targets += rng.sample(payload, min(len(payload), 4 * len(targets)))
flips = 0
while time.monotonic() < end:
    off = rng.choice(targets)
    old = struct.unpack_from("<Q", m, off)[0]
    how = rng.random()
    if how < 0.5:
        new = old ^ (1 << rng.randrange(64))
    elif how < 0.8:
        new = (old + rng.choice([-8, -4, -1, 1, 2, 4, 8, 64])) % 2 ** 64
    else:
        new = rng.getrandbits(64)
    struct.pack_into("<Q", m, off, new)
    flips += 1
    time.sleep(rng.uniform(0.001, 0.01))
print("flips", flips, flush=True)
"""


def _start(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


SCRIBBLES = [("control", False, 1), ("control", False, 2), ("lengths", False, 3),
             ("lengths", True, 4), ("payload", True, 5)]


@pytest.mark.parametrize("mode,keyed,seed", SCRIBBLES,
                         ids=[f"{m}-{'authkey' if k else 'nokey'}-{s}" for m, k, s in SCRIBBLES])
def test_a_live_scribbler_never_crashes_hangs_or_tears_a_delivery(mq, backend, qname, mode,
                                                                  keyed, seed):
    native_only(backend, "writes into the native segment's words")
    key = os.urandom(32) if keyed else None
    q = mq.create(qname, maxsize=32, max_message_size=32768, capacity_bytes=1 << 20,
                  authkey=key)
    segment = q._ring.name
    common = (qname, backend, DURATION)
    tail = (mode, key.hex() if key else "")
    procs = []
    try:
        procs.append(("producer", _start(_PRODUCER, *common, seed, *tail)))
        for i, read in enumerate(["get", "many", "lease"]):
            procs.append((f"consumer-{read}",
                          _start(_CONSUMER, *common, seed * 10 + i, *tail, read)))
        procs.append(("scribbler", _start(_SCRIBBLER, *common, seed, *tail, segment)))
        bound = time.monotonic() + DURATION + 30
        outs = {}
        for name, p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, bound - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                pytest.fail(f"{name} hung (still running {DURATION + 30:.0f} s after "
                            f"start)\n{out}\n{err}")
            outs[name] = (p.returncode, out, err)
        for name, (rc, out, err) in outs.items():
            assert rc >= 0, (f"{name} died by signal "
                             f"{signal.Signals(-rc).name}\n{out}\n{err[-3000:]}")
            assert rc == 0, f"{name} raised an untyped exception (rc {rc})\n{err[-3000:]}"
            assert "OVERREAD" not in out, f"{name} received more than a message holds:\n{out}"
            if mode == "control" or keyed:
                assert "TORN" not in out, f"{name} received a torn message:\n{out}"
        print({n: o[1].strip() for n, o in outs.items()})
        got = sum(int(out.split()[-5]) for name, (rc, out, err) in outs.items()
                  if name.startswith("consumer"))
        assert int(outs["scribbler"][1].split()[-1]) > 100     # it really scribbled
        assert got > 0                                          # and traffic flowed
        if mode == "payload":                                   # changed ones were caught
            assert q.stats()["rejected"] > 0
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    # A process that opens the damaged queue afterwards gets a handle or a
    # CorruptQueue, never a crash.
    code = textwrap.dedent(f"""
        import fastmq
        try:
            q = fastmq.Queue.open({qname!r}, _backend={backend!r},
                                  authkey={key!r})
            for _ in range(50):
                try:
                    q.get_bytes(timeout=0.01)
                except (fastmq.Empty, fastmq.Error, ValueError):
                    pass
            q.close()
        except fastmq.Error:
            pass
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------- one damaged word at a time
#
# Each test below writes one word the scribbler above can write, at a known
# state of a live segment, then drives the path that trusted it. In-flight
# entry fields (csrc/fmq_layout.h, fmq_lease): word 0, deadline_ns 8, len 32,
# block 36, holder 44, pin 48; entry word = token << 32 | state << 24 | owner.

import gc     # noqa: E402
import mmap   # noqa: E402
import struct  # noqa: E402

BLOCK = 10_000          # a block message (more than a slot holds)
SMALL = 3_000           # one of the smallest block class: block 0 is the first
LS_FREE, LS_LEASED = 0, 2
PIN_NONE, PIN_PINNED, PIN_HANDED = 0, 1, 2


class _Entries:
    """The in-flight entries of a live native segment."""

    def __init__(self, q):
        self.fd = os.open("/dev/shm/" + q._ring.name, os.O_RDWR)
        self.map = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        (_slots, stride, *_rest, self.lease) = struct.unpack_from("<QIIQQIIQQQQ", self.map, 32)
        self.stride = stride + 64

    def close(self):
        self.map.close()
        os.close(self.fd)

    def u64(self, index, field, value=None):
        off = self.lease + index * self.stride + field
        if value is None:
            return struct.unpack_from("<Q", self.map, off)[0]
        struct.pack_into("<Q", self.map, off, value)


@pytest.fixture
def entries_of():
    made = []

    def make(q):
        made.append(_Entries(q))
        return made[-1]
    yield make
    for e in made:
        e.close()


def _drain(q, tries=6):
    """Every message still to be had -> (payloads, CorruptQueue count)."""
    got, corrupt = [], 0
    for _ in range(tries):
        try:
            got.append(q.get_bytes(timeout=0.2))
        except fastmq.Empty:
            break
        except fastmq.CorruptQueue:
            corrupt += 1
    return got, corrupt


DEAD_TAG = (1000 << 14) | 7   # owner tag of a participant that never registered


@pytest.mark.parametrize("how", ["one-bit", "never-used", "other-token", "no-share"])
def test_a_free_entry_turned_leased_never_redelivers_another_messages_block(
        mq, backend, entries_of, how):
    """A FREE entry's word is damaged into a lease. Its len and block are
    what its last use left -- an acked message, whose block now holds another
    message -- or zeros (never used: block 0, len 0). Redelivering it copied
    the other message (or an empty one) and then dropped that message's
    block share, which the next put reused: a queued message came out with
    foreign bytes. Each case passes every check but one: one bit (an orphan,
    owner 0, that is not due), a never-used entry (token 0), a random word
    (another token than its pin's), a lease whose block holds no share for
    it (the other message is leased, not queued)."""
    native_only(backend, "writes into the native in-flight table")
    q = mq.Queue(maxsize=8)
    ents = entries_of(q)
    if how == "never-used":
        q.put_bytes(b"a" * 8)
        q.get_message(timeout=5, lease=30).ack()   # the table exists
        index = 5
        assert ents.u64(index, 0) == 0           # never used: all zero
    else:
        q.put_bytes(b"a" * SMALL)
        m = q.get_message(timeout=5, lease=0.3)
        index = m.id
        m.ack()
        del m
        time.sleep(0.4)                          # its old deadline has passed
    q.put_bytes(b"b" * SMALL)                    # in the acked message's block (block 0)
    held = q.get_message(timeout=5, lease=30) if how == "no-share" else None
    word = ents.u64(index, 0)
    assert (word >> 24) & 0xFF == LS_FREE and word & 0xFFFFFF == 0
    token = word >> 32
    if how in ("one-bit", "never-used"):
        damaged = word | (LS_LEASED << 24)
    elif how == "other-token":
        damaged = ((token ^ 0x5A5A5A) << 32) | (LS_LEASED << 24) | DEAD_TAG
    else:
        damaged = (token << 32) | (LS_LEASED << 24) | DEAD_TAG
    ents.u64(index, 0, damaged)
    q.redeliver_expired()
    q.put_bytes(b"c" * SMALL)                    # would reuse a block dropped wrongly
    got, corrupt = _drain(q)
    expect = [b"c" * SMALL] if held else [b"b" * SMALL, b"c" * SMALL]
    assert got == expect and corrupt == 0, ([g[:1] + b"x%d" % len(g) for g in got], corrupt)
    if held:
        assert bytes(held.data) == b"b" * SMALL
        held.ack()
    assert q.stats()["abandoned"] == 1          # the damaged entry, counted


@pytest.mark.parametrize("damage", ["none", "garbage"])
def test_a_damaged_pin_never_frees_a_block_under_a_leased_messages_views(
        mq, backend, entries_of, damage):
    """A pinned lease's pin word (token << 32 | state) is damaged: back to
    NONE (one bit), or into no state at all. Whoever ends the lease reads the
    pin to know whether the holder's views still need the block. Garbage was
    taken for "not pinned": the ack freed the block under the message's
    views. A pin turned NONE cannot be told from a real one by the ender;
    but then the holder's last view, seeing its pin was never handed over,
    dropped a share that was no longer its own -- the share of its next
    lease of the same block -- and that message's bytes changed under it."""
    native_only(backend, "writes into the native in-flight table")
    q = mq.Queue(maxsize=8)
    ents = entries_of(q)
    q.put_bytes(b"a" * BLOCK)
    a = q.get_message(timeout=5, lease=30)
    pin = ents.u64(a.id, 48)
    assert pin & 0xFFFFFFFF == PIN_PINNED and pin >> 32 == ents.u64(a.id, 0) >> 32
    ents.u64(a.id, 48, pin - 1 if damage == "none" else pin | 0x40)
    a.ack()
    if damage == "garbage":                      # handed over: a's views still hold
        q.put_bytes(b"c" * BLOCK)
        assert bytes(a.data) == b"a" * BLOCK
        assert q.get_bytes(timeout=5) == b"c" * BLOCK
    q.put_bytes(b"b" * BLOCK)                    # in a's block if the ack freed it
    b = q.get_message(timeout=5, lease=30)
    del a
    gc.collect()                                 # a's last view goes
    q.put_bytes(b"d" * BLOCK)                    # would reuse b's block if a took it
    assert bytes(b.data) == b"b" * BLOCK
    b.ack()
    assert q.get_bytes(timeout=5) == b"d" * BLOCK


def test_a_pin_damaged_to_none_and_then_reused_never_frees_the_holders_next_lease(
        mq, backend, entries_of):
    """As above, but the damaged entry is reused (by the same holder, for the
    same block) before the first message's last view goes: the pin then
    carries another token, which is also what a real hand-over followed by
    a reuse looks like."""
    native_only(backend, "writes into the native in-flight table")
    q = mq.Queue(maxsize=1)                      # one in-flight entry: reused
    ents = entries_of(q)
    q.put_bytes(b"a" * BLOCK)
    a = q.get_message(timeout=5, lease=30)
    ents.u64(a.id, 48, ents.u64(a.id, 48) - 1)   # PINNED -> NONE
    a.ack()
    q.put_bytes(b"b" * BLOCK)
    b = q.get_message(timeout=5, lease=30)
    assert b.id == a.id and b.token != a.token
    del a
    gc.collect()
    q.put_bytes(b"d" * BLOCK)
    assert bytes(b.data) == b"b" * BLOCK
    b.ack()
    assert q.get_bytes(timeout=5) == b"d" * BLOCK


def _block_words(q):
    """Offsets of the state words of every block carved so far, with their values."""
    fd = os.open("/dev/shm/" + q._ring.name, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    try:
        ncls = struct.unpack_from("<I", m, 44)[0]
        out = []
        for c in range(ncls):
            _size, nblocks, meta, _data = struct.unpack_from("<QQQQ", m, 112 + 32 * c)
            for b in range(min(nblocks, 256)):          # one carve
                off = meta + 16 * b
                out.append((off, struct.unpack_from("<Q", m, off)[0]))
        return out
    finally:
        m.close()
        os.close(fd)


def test_a_commit_that_fails_on_a_damaged_block_word_does_not_wedge_the_ring(mq, backend):
    """The commit of a block message takes the ring's share of the block by a
    CAS from "no ring share". A block word damaged to say IN_RING already
    makes that fail, after the slot was claimed WRITING: the slot was left
    WRITING by a live producer, which nothing skips, and every consumer
    stopped there for good (Empty with messages queued behind it)."""
    native_only(backend, "writes into the native block metadata")
    q = mq.Queue(maxsize=4)
    res = q._ring.reserve(BLOCK)
    memoryview(res)[:1] = b"r"
    mine = [(off, w) for off, w in _block_words(q) if w & 0xFFFFFF]   # its writer share
    assert len(mine) == 1
    off, w = mine[0]
    with open("/dev/shm/" + q._ring.name, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", w | (1 << 48)))                   # IN_RING, as if queued
    with pytest.raises(fastmq.Error):
        res.commit()
    res.abort()
    for i in range(6):                                              # laps over that slot
        q.put_bytes(b"after-%d" % i, timeout=1)
        assert q.get_bytes(timeout=1) == b"after-%d" % i
    assert q.stats()["abandoned"] == 1


@pytest.mark.parametrize("how", ["get", "recv", "get_many", "get_message"])
def test_a_slot_flipped_to_ready_over_a_block_now_queued_for_another_slot_is_skipped(
        mq, backend, how):
    """One bit makes a consumed slot READY again, at the lap the producers
    reach next; its len and block are those of the message it held. When that
    block has since been queued again for another slot, the block's state
    says "queued" and the old record was delivered: the other message's
    bytes, after which that message's own slot found its block freed under
    it (or, had a producer reused it meanwhile, a third message's bytes). The
    block records its slot's ticket; the claim of the damaged slot sees that
    it is not its own and skips it."""
    native_only(backend, "writes into the native ring")
    q = mq.Queue(maxsize=2)
    seg = _Entries(q)
    try:
        ring = struct.unpack_from("<Q", seg.map, 88)[0]
        q.put_bytes(b"a" * SMALL)                # ticket 0, slot 0, block X
        q.put_bytes(b"p")
        assert q.get_bytes(timeout=1) == b"a" * SMALL
        assert q.get_bytes(timeout=1) == b"p"
        word = struct.unpack_from("<Q", seg.map, ring)[0]
        struct.pack_into("<Q", seg.map, ring, word + (2 << 24))   # EMPTY -> READY: ticket 2
    finally:
        seg.close()
    q.put_bytes(b"b" * SMALL, timeout=1)         # passes ticket 2; block X again
    outcomes = []
    for _ in range(3):
        try:
            if how == "get":
                data = q.get_bytes(timeout=0.2)
            elif how == "recv":
                data = bytes(q._ring.recv(0.2))
            elif how == "get_many":             # the damaged one is left out, counted
                outcomes += q._ring.get_many(4, 0.2, None)
                continue
            else:
                m = q.get_message(timeout=0.2, lease=30)
                data = bytes(m.data)
                m.ack()
            outcomes.append(data)
        except fastmq.CorruptQueue:
            outcomes.append("corrupt")
        except fastmq.Empty:
            break
    expect = [b"b" * SMALL] if how == "get_many" else ["corrupt", b"b" * SMALL]
    assert outcomes == expect, [o if o == "corrupt" else o[:1] + b"x%d" % len(o)
                                for o in outcomes]
    assert q.stats()["abandoned"] == 1
    for i in range(4):                           # the ring keeps moving
        q.put_bytes(b"n%d" % i * 1000, timeout=1)
        assert q.get_bytes(timeout=1) == b"n%d" % i * 1000
