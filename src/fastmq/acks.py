"""At-least-once delivery for ``fastmq.Queue``: messages with leases.

``Queue.get_message()`` leases a message instead of consuming it: the message
moves into the segment's in-flight table (shared memory, so it survives the
consumer's death) and comes back -- at the BACK of the queue, with
``delivery_count + 1`` -- unless it is acked before its lease expires. A dead
consumer's messages come back within about a second, not when the lease runs
out. Past the queue's ``max_deliveries`` a message is dead-lettered: forwarded
(its original payload bytes) to the queue named ``dead_letter``, or dropped and
counted in ``stats()["dead_lettered"]`` when there is none.

All shared-memory work is the ring's (``_ring_protocol.LeaseRing``); this
module only adds what is per handle:

* ``Message`` -- the user's object (value, data, ack/nack/touch);
* the in-flight bound (``Queue.max_in_flight``): leasing more than that many
  un-acked messages on one handle raises ``TooManyInFlight`` rather than
  blocking, because the only way to free room is for the *same* consumer to
  ack, so blocking would deadlock a single-threaded consumer;
* forwarding of parked dead letters to the dead-letter queue, done
  opportunistically (and throttled) by ``get_message``/``get_messages``/
  ``pending``/``stats`` of a queue handle that has a ``dead_letter`` name.

Zero-copy: a leased message is copied out of shared memory once, into a
private ``bytes``; ``Message.data`` is a read-only view of that copy, so it
never pins shared memory and stays valid after ``ack()``.
"""
from __future__ import annotations

import math
import os
import threading
import time

from .errors import Error, LeaseLost, QueueNotFound

__all__ = ["Message", "TooManyInFlight", "DEFAULT_LEASE", "DEFAULT_MAX_IN_FLIGHT"]

DEFAULT_LEASE = 30.0                # seconds
DEFAULT_MAX_IN_FLIGHT = 10_000      # un-acked messages per handle (per process)
DEFAULT_GET_MESSAGES = 64
MAX_LEASE = 1e9
_DEAD_LETTER_CHECK_INTERVAL = 0.25  # seconds between forwarding attempts per handle
_DEAD_LETTER_BATCH = 256


class TooManyInFlight(Error):
    """This handle already holds ``max_in_flight`` un-acked messages.

    Ack (or nack) some of them first, or raise the bound with
    ``q.max_in_flight = n``. Raised instead of blocking: only this consumer's
    own acks can free room, so waiting would deadlock it.
    """


# --------------------------------------------------------------- the message

_UNSET = object()
_HELD, _ACKED, _NACKED, _LOST = range(4)


class Message:
    """A message leased with ``Queue.get_message()``; ack it when done.

    * ``value`` -- the deserialized object (decoded on first access);
    * ``data`` -- read-only memoryview of the payload bytes (a private copy);
    * ``delivery_count`` -- 1 on the first delivery; ``redelivered`` -- > 1;
    * ``id`` -- the in-flight entry, as in ``Queue.pending()[i]["id"]``
      (reused once this message is acked);
    * ``ack()`` -- done (idempotent); ``nack(requeue=True)`` -- give it back
      now (``requeue=False``: dead-letter it); ``touch(seconds)`` -- extend
      the lease to now + seconds. ``ack``/``nack``/``touch`` raise
      ``LeaseLost`` once the lease expired, even if nobody took it yet.
    """

    __slots__ = ("_queue", "_ring", "_slot", "_token", "_payload", "_value",
                 "_state", "_counter", "delivery_count", "__weakref__")

    def __init__(self, queue, ring, counter, slot, token, payload, delivery_count):
        self._queue = queue
        self._ring = ring
        self._counter = counter
        self._slot = slot
        self._token = token
        self._payload = payload
        self._value = _UNSET
        self._state = _HELD
        self.delivery_count = delivery_count

    # ---- content

    @property
    def data(self) -> memoryview:
        return memoryview(self._payload)          # bytes: read-only already

    @property
    def value(self):
        if self._value is _UNSET:
            self._value = self._queue._decode(self._payload)
        return self._value

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def id(self) -> int:
        return self._slot

    @property
    def token(self) -> int:
        return self._token

    @property
    def acked(self) -> bool:
        return self._state == _ACKED

    # ---- settlement

    def ack(self) -> None:
        """Done with it: the message leaves the queue for good. A second
        ``ack()`` is a no-op; ``ack()`` after ``nack()`` raises ``LeaseLost``."""
        if self._state == _ACKED:
            return
        self._check_held("ack")
        try:
            self._ring.ack(self._slot, self._token)
        except LeaseLost:
            self._settle(_LOST)
            raise
        self._settle(_ACKED)

    def nack(self, requeue: bool = True) -> None:
        """Give the message back now: to the back of the queue with
        ``delivery_count + 1`` (dead-lettered past ``max_deliveries``), or,
        with ``requeue=False``, dead-letter it at once."""
        self._check_held("nack")
        try:
            self._ring.nack(self._slot, self._token, bool(requeue))
        except LeaseLost:
            self._settle(_LOST)
            raise
        self._settle(_NACKED)
        # Past max_deliveries (or requeue=False) it is parked now: forward it
        # at this handle's next chance.
        self._queue._acks.dead_letter_hint()

    def touch(self, seconds: float = DEFAULT_LEASE) -> None:
        """Extend the lease to now + ``seconds``."""
        seconds = check_lease(seconds, "seconds")
        self._check_held("touch")
        try:
            self._ring.touch(self._slot, self._token, seconds)
        except LeaseLost:
            self._settle(_LOST)
            raise

    def _check_held(self, what):
        if self._state == _HELD:
            return
        reason = {_ACKED: "was acked", _NACKED: "was nacked",
                  _LOST: "lease was already reported lost"}[self._state]
        raise LeaseLost(f"cannot {what} message {self._slot}: it {reason}")

    def _settle(self, state):
        if self._state == _HELD:
            self._counter.release(1)
        self._state = state

    def __del__(self):
        # A message dropped un-acked no longer counts against the in-flight
        # bound of its handle; the ring redelivers it when its lease expires.
        if getattr(self, "_state", None) == _HELD:
            self._counter.release(1)

    def __repr__(self):
        state = ("held", "acked", "nacked", "lost")[self._state]
        return (f"<fastmq.Message id={self._slot} delivery_count={self.delivery_count} "
                f"{len(self._payload)} bytes {state}>")


class _InFlight:
    """Un-acked messages of one handle in one process (a fork gets a new one)."""

    __slots__ = ("count", "_lock")

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def reserve(self, wanted, bound):
        with self._lock:
            room = bound - self.count
            if room <= 0:
                raise TooManyInFlight(
                    f"this handle already holds {self.count} un-acked message(s) "
                    f"(max_in_flight={bound}); ack or nack some first, or raise "
                    "q.max_in_flight")
            n = min(wanted, room)
            self.count += n
            return n

    def release(self, n):
        with self._lock:
            self.count -= n


# ------------------------------------------------------------ argument checks

def check_lease(seconds, label="lease"):
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"{label} must be a number of seconds, not {type(seconds).__name__}")
    if not 0 < seconds <= MAX_LEASE or math.isnan(seconds):
        raise ValueError(f"{label} must be a positive number of seconds "
                         f"(at most {MAX_LEASE:g}), got {seconds!r}")
    return float(seconds)


def check_max_in_flight(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_in_flight must be an int >= 1, got {value!r}")
    return value


# ------------------------------------------------- the per-handle lease state

class Acks:
    """What one ``Queue`` handle keeps for at-least-once delivery."""

    def __init__(self, queue, max_in_flight=DEFAULT_MAX_IN_FLIGHT):
        self.queue = queue
        self.max_in_flight = check_max_in_flight(max_in_flight)
        self._pid = os.getpid()
        self._counter = _InFlight()
        self._dlq = None                 # the dead-letter Queue, opened lazily
        self._unforwarded = []           # taken dead letters the DLQ had no room for
        self._next_dead_check = 0.0
        self._lock = threading.Lock()

    def counter(self):
        if self._pid != os.getpid():     # inherited through fork: not ours
            self._pid, self._counter = os.getpid(), _InFlight()
            self._dlq, self._unforwarded = None, []
        return self._counter

    @property
    def in_flight(self) -> int:
        return self.counter().count

    # ---- leasing

    def get_messages(self, ring, max_messages, timeout, lease):
        self.forward_dead_letters(ring)
        counter = self.counter()
        n = counter.reserve(max_messages, self.max_in_flight)
        try:
            leased = ring.lease(n, timeout, lease)
        except BaseException:
            counter.release(n)
            raise
        if len(leased) < n:
            counter.release(n - len(leased))
        queue = self.queue
        return [Message(queue, ring, counter, slot, token, payload, deliveries)
                for slot, token, payload, deliveries in leased]

    def ack_many(self, ring, messages):
        held = []
        for m in messages:
            if not isinstance(m, Message):
                raise TypeError(f"ack_many takes fastmq.Message objects, not "
                                f"{type(m).__name__}")
            if m._state == _HELD:
                if m._ring is not ring:
                    raise ValueError(f"{m!r} was not leased through this queue handle")
                held.append(m)
        if not held:
            return 0
        results = ring.ack_many([(m._slot, m._token) for m in held])
        acked = 0
        for m, ok in zip(held, results):
            m._settle(_ACKED if ok else _LOST)
            acked += bool(ok)
        return acked

    # ---- dead letters

    def dead_letter_hint(self):
        """Something may have been parked just now: look at the next chance."""
        self._next_dead_check = 0.0

    def forward_dead_letters(self, ring, force=False):
        """Move parked dead letters to the dead-letter queue (cheap when the
        queue has none configured or it was checked a moment ago)."""
        name = getattr(ring, "dead_letter", "")
        if not name:
            return 0
        now = time.monotonic()
        if not force and now < self._next_dead_check:
            return 0
        self._next_dead_check = now + _DEAD_LETTER_CHECK_INTERVAL
        if not self._lock.acquire(blocking=False):
            return 0                     # another thread is forwarding
        try:
            self.counter()               # resets inherited state after fork
            return self._forward_locked(ring, name)
        finally:
            self._lock.release()

    def _forward_locked(self, ring, name):
        forwarded = 0
        while True:
            batch = self._unforwarded or ring.take_dead_letters(_DEAD_LETTER_BATCH)
            self._unforwarded = []
            if not batch:
                return forwarded
            dlq = self._dead_letter_queue(name)
            for i, (slot, token, payload) in enumerate(batch):
                try:
                    dlq.put_bytes(payload, block=False)
                except Exception:
                    # Full (or gone): keep what is left for the next chance.
                    # The entries stay taken by this handle; if it dies or
                    # closes first they are parked again for another one.
                    self._unforwarded = batch[i:]
                    return forwarded
                try:
                    ring.ack_dead(slot, token)
                except LeaseLost:
                    pass                 # reclaimed meanwhile: a duplicate, not a loss
                forwarded += 1

    def _dead_letter_queue(self, name):
        if self._dlq is None or self._dlq.closed:
            from .queue import Queue
            backend = self.queue.backend
            try:
                self._dlq = Queue.open(name, _backend=backend)
            except QueueNotFound:
                self._dlq = Queue.create(name, exist_ok=True, _backend=backend)
        return self._dlq

    def close(self):
        dlq, self._dlq = self._dlq, None
        if dlq is not None:
            dlq.close()


def pending(acks, ring):
    acks.forward_dead_letters(ring, force=True)
    ring.redeliver_due()
    return [dict(entry) for entry in ring.pending()]

