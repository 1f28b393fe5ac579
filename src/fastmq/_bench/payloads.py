"""Messages that can be verified cheaply and completely.

Every message carries who sent it and its sequence number, so a consumer can check
order, loss and duplicates; the rest of the payload is a deterministic body per
producer, so a torn or corrupted message is detected too.

Raw layout (``bytes``/``batch``/``numpy`` modes), ``size`` bytes in all::

    [producer u32][size u32][seq u64] body ............ [seq u64]

How a consumer checks depends on the size (``plan_for``), so that the check
never costs more than a small fraction of what the fastest transport needs per
message:

* ``KEEP`` (<= ``KEEP_MAX`` bytes, and pickled objects): every message is kept
  as it arrives (one list append) and compared byte for byte with its expected
  content right after the timed window -- or, for raw bytes and one consumer,
  compared as it arrives with the message expected next from its producer and
  dropped (``runner.consume_compare``: keeping millions of fresh messages costs
  page faults that are not the queue's);
* ``FINGERPRINT`` (up to ``FULL_CHECK_MAX``): the head (producer, size, seq)
  and the trailing seq of every message are kept as two small slices and
  checked after the window (order, loss, duplicates, torn ends); one message in
  ``SAMPLE_EVERY`` is kept whole and its body compared byte for byte. Keeping
  every 4 KiB message would allocate fresh memory for each one: page faults
  that cost ~10x more than moving the message through the fastest queues;
* ``INLINE`` (larger, numpy arrays, and the views of at-least-once messages): header, trailer and ``SAMPLES``
  64-byte windows spread over the body, checked as each message arrives (a full
  compare of 1 MiB costs as much as moving it and would hide the transport).

``pickle`` mode sends a small tuple ``(producer, seq, text, float, list)`` and
compares all of it.

Small messages are built before the timed window. Larger ones come from a pool
of buffers rewritten in place (header and trailer only) as they are sent; the
pool is larger than the number of messages a peer can still be reading from
(its queue bound, twice over for zmq's send and receive high-water marks) when
the peer keeps a reference to what it was given, and a few buffers (staying in
the cache) when it copies at the call.
"""
from __future__ import annotations

import random
import struct

HEADER = struct.Struct("<IIQ")
TRAILER = struct.Struct("<Q")
OVERHEAD = HEADER.size + TRAILER.size          # 24 bytes
FULL_CHECK_MAX = 64 * 1024
KEEP_MAX = 512
SAMPLES = 8
WINDOW = 64
POOL = 32
SAMPLE_EVERY = 32              # FINGERPRINT: one message in this many is kept whole
SMALL_POOL = 8                 # buffers for a peer that copies at the send call

KEEP, FINGERPRINT, INLINE = "keep", "fingerprint", "inline"


def plan_for(mode: str, size: int) -> str:
    """How consumers of this mode and size verify (see the module docstring)."""
    # ``acks`` consumers get views of leased messages: keeping them (or slices
    # of them) past the ack would read memory the queue may reuse
    if mode == "pickle" or (mode in ("bytes", "batch") and size <= KEEP_MAX):
        return KEEP
    if mode in ("bytes", "batch") and size <= FULL_CHECK_MAX:
        return FINGERPRINT
    return INLINE


def prebuilt(mode: str, size: int) -> bool:
    """Whether producers build all their messages before the timed window."""
    return plan_for(mode, size) == KEEP


def pool_size(depth: int, holds_references: bool = True) -> int:
    """Buffers a producer cycles through for a channel of ``depth``: enough that no
    buffer is rewritten while a peer that keeps references may still read it."""
    return 2 * depth + 4 if holds_references else SMALL_POOL

MODES = ("bytes", "pickle", "batch", "numpy", "reserve")


def body_for(producer: int, size: int) -> bytes:
    """The deterministic body of every message of ``producer`` with total ``size``."""
    if size < OVERHEAD:
        raise ValueError(f"message size must be at least {OVERHEAD} bytes, got {size}")
    return random.Random(1000003 * producer + size).randbytes(size - OVERHEAD)


def object_for(producer: int, seq: int):
    """The small pickled object of ``pickle`` mode."""
    return (producer, seq, "fastmq-bench-object", 3.25, [producer, 1, 2, 3])


class Builder:
    """Makes the messages of one producer (``build(seq)`` -> payload)."""

    def __init__(self, producer: int, size: int, mode: str, pool: int = POOL):
        self.producer, self.size, self.mode, self.pool = producer, size, mode, pool
        if mode == "pickle":
            self.build = self._build_object
            return
        self.body = body_for(producer, size)
        self._head = struct.Struct("<II").pack(producer, size)
        if mode in ("numpy", "reserve"):
            import numpy as np
            template = np.frombuffer(self._raw(0), dtype=np.uint8)
            self._pool = [template.copy() for _ in range(pool)]
            self.build = self._build_pooled
        elif size > KEEP_MAX:
            raw = self._raw(0)
            self._pool = [bytearray(raw) for _ in range(pool)]
            self.build = self._build_pooled
        else:
            self.build = self._build_small

    def _raw(self, seq: int) -> bytes:
        return b"".join((HEADER.pack(self.producer, self.size, seq), self.body,
                         TRAILER.pack(seq)))

    def _build_small(self, seq: int) -> bytes:
        return b"".join((self._head, seq.to_bytes(8, "little"), self.body,
                         seq.to_bytes(8, "little")))

    def _build_pooled(self, seq: int):
        buf = self._pool[seq % self.pool]
        HEADER.pack_into(buf, 0, self.producer, self.size, seq)
        TRAILER.pack_into(buf, self.size - 8, seq)
        return buf

    def _build_object(self, seq: int):
        return object_for(self.producer, seq)


class VerificationError(AssertionError):
    """A benchmark run lost, duplicated, reordered or corrupted messages."""


class Tally:
    """The consumer side: checks every message and remembers what it saw.

    ``seen[p]`` is a bytearray with one byte per sequence number of producer ``p``
    (set once; a second time is a duplicate). The parent sums the arrays of all
    consumers: every entry exactly 1 means nothing lost and nothing duplicated.
    """

    def __init__(self, producers: int, count: int, size: int, mode: str):
        self.producers, self.count, self.size, self.mode = producers, count, size, mode
        self.seen = [bytearray(count) for _ in range(producers)]
        self.last = [-1] * producers
        self.errors: list = []           # first few problems, as text
        self.n_errors = 0
        if mode == "pickle":
            self.check = self._object_checker()
            return
        self.bodies = [body_for(p, size) for p in range(producers)]
        if size > FULL_CHECK_MAX or mode in ("numpy", "reserve"):
            n = size - OVERHEAD - WINDOW
            self.offsets = [HEADER.size + (n * i) // max(1, SAMPLES - 1) for i in range(SAMPLES)]
            self.windows = [[b[o - HEADER.size:o - HEADER.size + WINDOW] for o in self.offsets]
                            for b in self.bodies]
            self.check = self._check_large
        else:
            self.check = self._small_checker()

    def _fail(self, text: str) -> None:
        self.n_errors += 1
        if len(self.errors) < 10:
            self.errors.append(text)

    def _mark(self, p: int, seq: int) -> None:
        """Record (producer, seq) and report what is wrong with it, if anything."""
        if not 0 <= p < self.producers or not 0 <= seq < self.count:
            self._fail(f"header out of range: producer={p} seq={seq}")
            return
        seen = self.seen[p]
        if seen[seq]:
            self._fail(f"duplicate: producer {p} seq {seq}")
            return
        seen[seq] = 1
        if seq <= self.last[p]:
            self._fail(f"out of order: producer {p} seq {seq} after {self.last[p]}")
        self.last[p] = seq

    @property
    def received(self) -> int:
        return sum(s.count(1) for s in self.seen)

    def _small_checker(self):
        """The hot path for small messages as one closure: it runs once per
        message in every consumer, so it is kept to a handful of C calls."""
        unpack = struct.Struct(f"<IIQ{self.size - OVERHEAD}sQ").unpack
        size, bodies, seen, last = self.size, self.bodies, self.seen, self.last
        nprod, count, fail, mark = self.producers, self.count, self._fail, self._mark

        def check(msg):
            if len(msg) != size:
                fail(f"wrong length {len(msg)} (expected {size})")
                return
            p, sz, seq, body, tail = unpack(msg)
            if sz != size or tail != seq or p >= nprod or seq >= count or body != bodies[p]:
                fail(f"corrupt message (header producer={p} seq={seq} trailer seq={tail})")
                return
            s = seen[p]
            if s[seq] or seq <= last[p]:
                mark(p, seq)                # the slow path says what is wrong
                return
            s[seq] = 1
            last[p] = seq
        return check

    def _object_checker(self):
        seen, last, nprod, count = self.seen, self.last, self.producers, self.count
        fail, mark = self._fail, self._mark

        def check(obj):
            try:
                p, seq = obj[0], obj[1]
                good = obj == object_for(p, seq) and p < nprod and seq < count
            except Exception as exc:  # noqa: BLE001 - anything odd is a corrupt message
                fail(f"corrupt object {obj!r:.80}: {exc}")
                return
            if not good:
                fail(f"corrupt object {obj!r:.80}")
                return
            s = seen[p]
            if s[seq] or seq <= last[p]:
                mark(p, seq)
                return
            s[seq] = 1
            last[p] = seq
        return check

    def _check_large(self, msg) -> None:
        mv = memoryview(msg)
        if mv.nbytes != self.size:
            self._fail(f"wrong length {mv.nbytes} (expected {self.size})")
            return
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        p, size, seq = HEADER.unpack_from(mv)
        ok = p < self.producers and size == self.size and TRAILER.unpack_from(mv, self.size - 8)[0] == seq
        if ok:
            for o, w in zip(self.offsets, self.windows[p]):
                if bytes(mv[o:o + WINDOW]) != w:
                    ok = False
                    break
        if not ok:
            self._fail(f"corrupt message (header producer={p} seq={seq})")
            return
        self._mark(p, seq)

    def check_fingerprint(self, head, tail) -> None:
        """FINGERPRINT plan: the first 16 and the last 8 bytes of one message."""
        try:
            p, size, seq = HEADER.unpack(head)
            (t,) = TRAILER.unpack(tail)
        except Exception:  # noqa: BLE001 - a short message
            self._fail(f"wrong length (head {bytes(head)[:16]!r})")
            return
        if size != self.size or t != seq:
            self._fail(f"corrupt message (header producer={p} size={size} seq={seq} "
                       f"trailer seq={t})")
            return
        self._mark(p, seq)

    def check_body(self, msg) -> None:
        """FINGERPRINT plan: a sampled message compared byte for byte (its seq was
        already counted by ``check_fingerprint``)."""
        mv = memoryview(msg)
        if mv.nbytes != self.size:
            self._fail(f"wrong length {mv.nbytes} (expected {self.size})")
            return
        p, size, seq = HEADER.unpack_from(mv)
        if p >= self.producers or size != self.size or \
                TRAILER.unpack_from(mv, self.size - 8)[0] != seq or \
                mv[HEADER.size:self.size - TRAILER.size] != self.bodies[p]:
            self._fail(f"corrupt body (header producer={p} seq={seq})")

    def result(self) -> dict:
        return {"received": self.received, "seen": [bytes(s) for s in self.seen],
                "errors": self.errors, "n_errors": self.n_errors}


def verify(results: list, producers: int, count: int) -> list:
    """Combine the consumers' ``Tally.result()``s; return a list of problems (empty = ok)."""
    problems = []
    for r in results:
        if r.get("n_errors"):
            problems.append(f"{r['n_errors']} bad message(s), e.g. " + "; ".join(r["errors"][:3]))
    for p in range(producers):
        total = bytearray(count)
        dup = 0
        for r in results:
            seen = r["seen"][p]
            # a byte is 0 or 1, so adding as integers detects a message seen twice
            s = int.from_bytes(seen, "little")
            t = int.from_bytes(total, "little")
            if s & t:
                dup += bin(s & t).count("1")
            total = bytearray((s | t).to_bytes(count, "little"))
        missing = count - sum(total)
        if missing:
            first = total.find(0)
            problems.append(f"producer {p}: {missing} of {count} messages LOST (first missing seq {first})")
        if dup:
            problems.append(f"producer {p}: {dup} message(s) DUPLICATED across consumers")
    return problems
