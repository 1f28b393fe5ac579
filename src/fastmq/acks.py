"""At-least-once delivery for ``fastmq.Queue``: messages with leases.

``Queue.get_message()`` leases a message instead of consuming it: the message
moves into the segment's in-flight table (shared memory, so it survives the
consumer's death) and comes back -- at the BACK of the queue, with
``delivery_count + 1`` -- unless it is acked before its lease expires. A dead
consumer's messages come back within about a second, not when the lease runs
out. Past the queue's ``max_deliveries`` a message is dead-lettered: forwarded
(its original payload bytes) to the queue named ``dead_letter``, or dropped and
counted in ``stats()["dead_lettered"]`` when there is none.

Every change of a message's state and of a handle's in-flight count is made
by the backend's ``Consumer`` (``_ring_protocol.Consumer``: ``_core_parts/
consumer.pxi`` natively, ``_pure/consumer.py`` in pure Python), which does the
shared-memory work. This module is the policy on top of it, per handle:

* ``Message`` -- the user's object: decoding (value, data) and the calls
  ack/nack/touch, each handed to the message's Consumer;
* the in-flight bound (``Queue.max_in_flight``): leasing more than that many
  un-acked messages on one handle raises ``TooManyInFlight`` rather than
  blocking, because the only way to free room is for the *same* consumer to
  ack, so blocking would deadlock a single-threaded consumer. The segment's
  in-flight table has ``maxsize`` entries, so the bound in force is
  ``min(max_in_flight, maxsize)``: a handle that holds a whole table of
  leases gets ``TooManyInFlight`` too, instead of waiting for its own leases
  to expire and then receiving its own messages again. A message dropped
  without ack/nack keeps counting until its lease expires;
* forwarding of parked dead letters to the dead-letter queue, done
  opportunistically (and throttled) by ``get_message``/``get_messages``/
  ``pending``/``stats`` of a queue handle that has a ``dead_letter`` name.

Zero-copy (native backend): a payload that lives in a pool block is not
copied out; ``Message.data`` views it in place, like ``Queue.recv()``. The
in-flight entry records the pin, so whoever ends the lease -- this consumer's
ack, or another process redelivering an expired lease -- leaves the block to
the Message and its views; it is freed when the last of them goes
(``fmq_lease_pin`` in ``csrc/fmq_lease.c``), so ``data`` and ``value`` stay
readable after ``ack()``. Small (inline) payloads are copied into a ``bytes``.
"""
from __future__ import annotations

import math
import os
import time

from . import _backend, _lifetime
from ._auth import count_rejected
from ._contract import ACKED as _ACKED, MAX_LEASE, STATE_NAMES as _STATE_NAMES
from .errors import AuthenticationError, Empty, Error, LeaseLost, QueueNotFound

__all__ = ["Message", "TooManyInFlight", "DEFAULT_LEASE", "DEFAULT_MAX_IN_FLIGHT"]

DEFAULT_LEASE = 30.0                # seconds
DEFAULT_MAX_IN_FLIGHT = 10_000      # un-acked messages per handle (per process)
DEFAULT_GET_MESSAGES = 64
_DEAD_LETTER_CHECK_INTERVAL = 0.25  # seconds between forwarding attempts per handle
_DEAD_LETTER_BATCH = 256


class TooManyInFlight(Error):
    """This handle already holds ``max_in_flight`` un-acked messages.

    Ack (or nack) some of them first, or raise the bound with
    ``q.max_in_flight = n``. Raised instead of blocking: only this consumer's
    own acks can free room, so waiting would deadlock it.
    """


# --------------------------------------------------------------- the message

def _fields_type():
    """The C ``LeasedMessage`` when the extension imports (both backends then
    build it), else the pure-Python one with the same fields."""
    if _backend.native_available():
        return _backend.ring_module("native").LeasedMessage
    from ._pure.message import LeasedMessage
    return LeasedMessage

# Per-handle state inherited through fork() belongs to the parent: it is
# recognised by ``_lifetime.fork_generation`` (the one fork mechanism).


_LeasedMessage = _fields_type()


class Message(_LeasedMessage):
    """A message leased with ``Queue.get_message()``; ack it when done.

    * ``value`` -- the deserialized object (decoded on first access);
    * ``data`` -- read-only memoryview of the payload. Native backend: a
      payload too big for a slot stays in shared memory and ``data`` views
      it in place, pinned while this Message or any view of it lives (past
      ``ack()``, and past a redelivery of an expired lease to someone else);
      drop the Message and its views to give the memory back. Small payloads
      are a private copy (copying 200 bytes is cheaper than a pin);
    * ``delivery_count`` -- 1 on the first delivery; ``redelivered`` -- > 1;
    * ``id`` -- the in-flight entry, as in ``Queue.pending()[i]["id"]``
      (reused once this message is acked);
    * ``ack()`` -- done (idempotent); ``nack(requeue=True)`` -- give it back
      now (``requeue=False``: dead-letter it); ``touch(seconds)`` -- extend
      the lease to now + seconds. ``ack``/``nack``/``touch`` raise
      ``LeaseLost`` once the lease expired, even if nobody took it yet.

    The fields (``_contract.MESSAGE_FIELDS``: ``_consumer``, the backend's
    Consumer that leased it; ``_slot``/``_token``, its in-flight entry;
    ``_payload``; ``_state``) are set by that Consumer -- a C type in the
    native build, because building and settling Messages is the hot path of
    ``get_messages``/``ack_many``.
    """

    __slots__ = ("_value", "_checked")

    # ---- content

    @property
    def value(self):
        try:
            return self._value
        except AttributeError:
            pass
        payload, queue = self._payload, self._consumer.owner.queue
        if queue._auth is not None:               # checked at lease time (a private copy)
            payload = self._checked
            if queue._serializer is not None and payload.__class__ is not bytes:
                payload = bytes(payload)
        elif payload.__class__ is not bytes:      # left in its block (native)
            payload = self.data
            if queue._serializer is not None:     # custom loads() get bytes, as from get()
                payload = payload.tobytes()
        self._value = queue._decode(payload)
        return self._value

    @property
    def data(self):
        """Read-only memoryview of the payload (see the class docstring)."""
        if self._consumer.owner.queue._auth is not None:
            return memoryview(self._checked).toreadonly()
        return super().data

    @property
    def acked(self) -> bool:
        return self._state == _ACKED

    # ---- settlement (the Consumer changes the state; see its contract)

    def ack(self) -> None:
        """Done with it: the message leaves the queue for good. A second
        ``ack()`` is a no-op; ``ack()`` after ``nack()`` raises ``LeaseLost``."""
        self._consumer.ack(self)

    def nack(self, requeue: bool = True) -> None:
        """Give the message back now: to the back of the queue with
        ``delivery_count + 1`` (dead-lettered past ``max_deliveries``), or,
        with ``requeue=False``, dead-letter it at once."""
        consumer = self._consumer
        consumer.nack(self, bool(requeue))
        # Past max_deliveries (or requeue=False) it is parked now: forward it
        # at this handle's next get_message (inspection never forwards).
        consumer.owner.dead_letter_hint()

    def touch(self, seconds: float = DEFAULT_LEASE) -> None:
        """Extend the lease to now + ``seconds``."""
        self._consumer.touch(self, check_lease(seconds, "seconds"))

    def __repr__(self):
        return (f"<fastmq.Message id={self._slot} delivery_count={self.delivery_count} "
                f"{len(self._payload)} bytes {_STATE_NAMES[self._state]}>")


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
        self._generation = _lifetime.fork_generation
        self._consumer = None             # this process's Consumer on the ring
        self._dead_letter = None          # the ring's dead-letter name, read once
        self._dlq = None                  # the dead-letter Queue, opened lazily
        self._unforwarded = []            # taken dead letters the DLQ had no room for
        self._next_dead_check = 0.0
        self._lock = _lifetime.ForkSafeLock()

    def consumer(self, ring):
        """This process's Consumer on ``ring`` (a fork gets a new one: the
        parent's leases are not the child's)."""
        consumer = self._consumer
        if consumer is None or self._generation != _lifetime.fork_generation:
            if self._generation != _lifetime.fork_generation:   # inherited: not ours
                self._generation = _lifetime.fork_generation
                self._dlq, self._unforwarded = None, []
            consumer = self._consumer = ring.consumer(self, Message)
            self._dead_letter = getattr(ring, "dead_letter", "") or ""
        return consumer

    @property
    def in_flight(self) -> int:
        consumer = self._consumer
        if consumer is None or self._generation != _lifetime.fork_generation:
            return 0
        return consumer.in_flight

    # ---- leasing

    def _room(self, consumer, ring, wanted):
        """How many of ``wanted`` messages the in-flight bound lets this
        handle lease now (TooManyInFlight if none). No lock: a check that
        races another thread of the same handle may overshoot the bound by
        one batch -- acceptable for a prefetch-style bound, and a lock costs
        more than the rest of an ack."""
        bound = self.max_in_flight
        table = ring.maxsize             # the in-flight table has one entry per slot
        if table < bound:
            bound = table
        room = bound - consumer.in_flight
        if room <= 0:
            room = bound - consumer.recount()
        if room <= 0:
            limit = (f"max_in_flight={bound}" if bound < table else
                     f"the queue's in-flight table holds maxsize={table} entries")
            raise TooManyInFlight(
                f"this handle already holds {consumer.in_flight} un-acked message(s) "
                f"({limit}); ack or nack some first"
                + (", or raise q.max_in_flight" if bound < table else ""))
        return wanted if wanted < room else room

    def get_messages(self, ring, max_messages, timeout, lease):
        consumer = self._consumer
        if consumer is None or self._generation != _lifetime.fork_generation:
            consumer = self.consumer(ring)
        if self._dead_letter:
            self.forward_dead_letters(ring)
        n = self._room(consumer, ring, max_messages)
        try:
            leased = consumer.lease(n, timeout, lease)
        except Empty:
            if self._dead_letter:
                # The wait may have parked expired leases past max_deliveries:
                # pass them on now rather than at some later call.
                self.forward_dead_letters(ring, force=True)
            raise
        if self.queue._auth is not None:
            return self._check(ring, leased)
        return leased

    def _check(self, ring, leased):
        """Authenticate leased messages (handle with ``authkey``). One that
        fails is never deserialized: it is acked -- dropped, and counted in
        ``stats()["rejected"]`` -- rather than dead-lettered, because
        forwarding would hand a forged payload to the dead-letter queue's
        readers. The good ones are returned; if none is good, the call raises
        ``AuthenticationError``. A payload left in a pool block is copied out
        for the check, so nobody can change it between check and unpickling."""
        auth, good, error = self.queue._auth, [], None
        for m in leased:
            payload = m._payload
            if payload.__class__ is bytes:
                try:
                    m._checked = checked = auth.open(payload)
                except AuthenticationError as exc:
                    checked = exc
            else:
                # Never let a traceback hold this view (see Auth.verify_view).
                view = _LeasedMessage.data.__get__(m)
                checked = auth.verify_view(view, view.nbytes)
                view.release()
                if checked.__class__ is tuple:
                    m._checked = checked = checked[0]
                else:
                    checked = checked.error
            if checked.__class__ is AuthenticationError:
                error = checked
                try:
                    m.ack()
                except LeaseLost:
                    pass
                continue
            good.append(m)
        if error is not None:
            count_rejected(ring, len(leased) - len(good))
            if not good:
                raise error
        return good

    def ack_many(self, ring, messages):
        consumer = self._consumer
        if consumer is None or self._generation != _lifetime.fork_generation:
            consumer = self.consumer(ring)
        return consumer.ack_many(messages)

    # ---- dead letters

    def dead_letter_hint(self):
        """Something may have been parked just now: look at the next chance."""
        self._next_dead_check = 0.0

    def forward_dead_letters(self, ring, force=False):
        """Move parked dead letters to the dead-letter queue (cheap when the
        queue has none configured or it was checked a moment ago)."""
        self.consumer(ring)
        name = self._dead_letter
        if not name:
            return 0
        now = time.monotonic()
        if not force and now < self._next_dead_check:
            return 0
        self._next_dead_check = now + _DEAD_LETTER_CHECK_INTERVAL
        if not self._lock.acquire(blocking=False):
            return 0                     # another thread is forwarding
        try:
            return self._forward_locked(ring, name)
        finally:
            self._lock.release()

    def _forward_locked(self, ring, name):
        forwarded = 0
        while True:
            batch = self._unforwarded or self._consumer.take_dead_letters(_DEAD_LETTER_BATCH)
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
                    self._consumer.ack_dead(slot, token)
                except LeaseLost:
                    pass                 # reclaimed meanwhile: a duplicate, not a loss
                forwarded += 1

    def _dead_letter_queue(self, name):
        if self._dlq is None or self._dlq.closed:
            # The queue's own class (fastmq.Queue): no import of queue.py,
            # which imports this module.
            queue_class = type(self.queue)
            where = {"_backend": self.queue.backend}
            path = getattr(self.queue._ring, "path", None)
            if path is not None:       # a durable queue: its dead letters are durable too
                where = {"url": "file://" + os.path.dirname(path)}
            try:
                self._dlq = queue_class.open(name, **where)
            except QueueNotFound:
                self._dlq = queue_class.create(name, exist_ok=True, **where)
        return self._dlq

    def close(self):
        dlq, self._dlq = self._dlq, None
        if dlq is not None:
            dlq.close()


def pending(acks, ring):
    """Every in-flight entry, read-only: nothing is redelivered or forwarded
    here (live consumers do that within about a second). ``orphaned`` marks
    an entry no live consumer holds -- its holder died or let it go -- which
    is on its way back to the queue. ``dead_letter`` marks a message waiting
    for (or being forwarded to) the dead-letter queue; its ``expires_in``
    is None."""
    rows = []
    for entry in ring.pending():
        row = dict(entry)
        row.setdefault("dead_letter", False)
        # A dead letter is not coming back to the queue: never "orphaned".
        row["orphaned"] = not row["dead_letter"] and not _alive(row.get("pid", 0))
        rows.append(row)
    return rows


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True              # someone else's process: it exists
    return True

