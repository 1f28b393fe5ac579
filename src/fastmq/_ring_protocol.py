"""The contract a shared-memory backend of fastmq implements.

``fastmq.queue`` builds the public ``Queue`` on top of a *ring*: a message
channel that moves opaque byte strings between processes, with an in-flight
table for at-least-once delivery. A backend is one module that implements
this contract:

* ``fastmq._core``      -- the C core through its Cython binding ("native")
* ``fastmq._pure.ring`` -- a pure-Python implementation ("pure")

``_backend._MODULES`` maps a backend's name to its module. Each such module
exports the names in ``MODULE_NAMES`` below: the classes ``Ring``,
``Reservation``, ``ReceivedView``, ``Consumer`` and ``LeasedMessage`` with the
methods written down here, and ``backend_name``, ``MAX_MESSAGE_SIZE`` and
``list_segments``. ``tests/test_backend_conformance.py`` checks every backend
against this file -- the names, the parameters of every method, and a small
behavioural core -- so a new backend is done when it passes that test (and
then the rest of the suite, through the ``backend`` fixture).

This file is only the written contract (``typing.Protocol`` classes); nothing
imports it at run time except type checkers and that test.

Timeouts at this level are already normalised by the caller:
``None`` = block forever, ``0`` = do not block, ``> 0`` = seconds. Every blocking
call sleeps (never spins for long), wakes at least every ~100 ms to run Python
signal handlers (Ctrl-C -> KeyboardInterrupt) and to notice ``close()``.

Errors are fastmq's own exceptions from ``fastmq.errors`` (never a bare OSError
for a condition the user can act on): Empty, Full, MessageTooLarge, QueueClosed,
QueueNotFound, QueueExists, CorruptQueue, LeaseLost. Each backend raises them
from one place (the native ``_core_parts/errors.pxi`` funnel; the pure
backend's ring, in-flight table and consumer).

Segment names are the file names under /dev/shm (no slash), already validated and
prefixed by the caller: ``fastmq-q-<name>`` for named queues and
``fastmq-anon-<hex>`` for anonymous ones.

Constants shared by every layer (the largest message, the settlement states
of a leased message, its fields) live in ``fastmq._contract``.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Protocol, Sequence

#: What every backend module exports.
MODULE_NAMES = ("backend_name", "MAX_MESSAGE_SIZE", "Ring", "Reservation", "ReceivedView",
                "Consumer", "LeasedMessage", "list_segments")


class Reservation(Protocol):
    """Space for one message being written in place (``Ring.reserve``).

    ``view`` is a writable memoryview of exactly the reserved size. ``commit``
    publishes the first ``length`` bytes (default: all); ``abort`` gives the
    space back without delivering anything. Either may be called once; a second
    call raises ``ValueError``. The native backend keeps the underlying block
    pinned while any export of ``view`` is alive, so a stale view can never
    point at memory that was reused for another message.
    """

    view: memoryview

    def commit(self, length: Optional[int] = None) -> None: ...
    def abort(self) -> None: ...


class ReceivedView(Protocol):
    """One received message whose bytes stay where they are (``Ring.recv``).

    Not a lease: the message has already left the queue (auto-ack) and there
    is nothing to ack; this object only keeps its memory alive. ``view`` is a
    read-only memoryview. ``release()`` frees it now and raises
    ``BufferError`` while exports of ``view`` other than ``view`` itself are
    alive; ``close()`` frees it now or, if exports are alive, when the last
    one is released (never an error). Both are idempotent once done.
    """

    view: memoryview
    nbytes: int

    def release(self) -> None: ...
    def close(self) -> None: ...


class Ring(Protocol):
    """One process-local handle on a queue segment."""

    name: str                 # segment name (under /dev/shm)
    anonymous: bool           # unlinked automatically when the last handle closes
    maxsize: int              # capacity in messages (exact); also in-flight entries
    max_message_size: int     # largest payload in bytes
    capacity_bytes: int       # bytes of the block pool
    closed: bool
    max_deliveries: int       # deliveries before a message is dead-lettered
    dead_letter: str          # the dead-letter queue's name, or ""

    @classmethod
    def create(cls, name: str, *, maxsize: int, max_message_size: int,
               capacity_bytes: int, mode: int = 0o600, exist_ok: bool = False,
               anonymous: bool = False, max_deliveries: int = 20,
               dead_letter: str = "") -> "Ring":
        """Create and open a segment. ``exist_ok=True`` opens an existing one
        instead (its own geometry wins). Raises QueueExists, ValueError for
        absurd sizes (``max_message_size`` above ``MAX_MESSAGE_SIZE``
        included), OSError (with a clear message) when /dev/shm is full."""

    @classmethod
    def open(cls, name: str) -> "Ring":
        """Open an existing segment: QueueNotFound, CorruptQueue."""

    @staticmethod
    def unlink(name: str) -> None:
        """Remove the name; open handles keep working. QueueNotFound if absent."""

    def put(self, data, timeout: Optional[float]) -> None:
        """Enqueue one bytes-like (any C-contiguous buffer, copied once)."""

    def get(self, timeout: Optional[float]) -> bytes: ...

    def put_many(self, items: Sequence, timeout: Optional[float]) -> int:
        """Enqueue in order; returns how many went in. With timeout None all of
        them; otherwise as many as fit before the deadline (possibly 0, never
        raising Full). MessageTooLarge is checked for every item before any
        is written."""

    def get_many(self, max_messages: int, timeout: Optional[float], decode=None) -> list:
        """At least one (waiting up to timeout, else Empty), at most max_messages,
        without waiting for more once one is available. With ``decode``, each
        payload is passed through it before the hand-over: if it raises for
        one, the ones before it are returned and it and the rest stay queued
        (if it is the first, it is consumed and its error propagates)."""

    def reserve(self, nbytes: int, timeout: Optional[float]) -> Reservation: ...
    def recv(self, timeout: Optional[float]) -> ReceivedView: ...

    def wait(self, for_space: bool, timeout: float, need: int = 0) -> bool:
        """Sleep until a message looks ready to take (for_space False), or a
        slot and ``need`` bytes look free, at most ``timeout`` seconds (the
        native ring also returns after one wait slice): True if so. Takes
        nothing and never raises Empty/Full (for the asyncio waiters)."""

    def qsize(self) -> int: ...
    def stats(self) -> dict:
        """At least: depth, capacity, enqueued, dequeued, bytes_in_use,
        producers, consumers, redelivered, abandoned, dead_lettered."""

    def close(self) -> None:
        """Idempotent. Other handles (and other processes) are unaffected; an
        anonymous segment is unlinked when the last handle anywhere closes.
        This handle's un-acked leases go back to the queue at once, and the
        dead letters it took are parked again."""

    # ---- at-least-once: queue-wide ----------------------------------------
    #
    # A leased message has left the ring but not the queue: it lives in the
    # segment's in-flight table (so it survives the death of its consumer)
    # until it is acked, or its lease expires / its consumer is provably
    # dead, in which case it goes back to the BACK of the queue with delivery
    # count + 1. A message whose delivery count would exceed max_deliveries
    # is dead-lettered instead: dropped and counted (stats()["dead_lettered"])
    # when the queue has no dead_letter name, otherwise parked for the Python
    # layer to forward (Consumer.take_dead_letters).

    def consumer(self, owner: Any, message_class: type) -> "Consumer":
        """A new Consumer on this handle. ``message_class`` is a subclass of a
        ``LeasedMessage`` (the native one whenever the extension imports:
        ``fastmq.Message`` subclasses it); ``owner`` is kept for the caller
        and never looked into."""

    def pending(self) -> list:
        """In-flight messages of the whole queue: dicts with id (slot), token,
        pid (holder; 0 if orphaned), idle (seconds since leased),
        delivery_count, expires_in. Read-only."""

    def redeliver_due(self) -> int:
        """Requeue every lease that expired or whose holder is dead; returns
        how many. Also done by lease() and by waiting consumers."""


class LeasedMessage(Protocol):
    """What a leased message is made of: the fields ``_contract.MESSAGE_FIELDS``
    plus these read-only properties. ``_state`` is written by its Consumer
    only. Constructible as ``cls(consumer, slot, token, payload,
    delivery_count)`` (state HELD)."""

    delivery_count: int

    @property
    def data(self) -> memoryview: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def id(self) -> int: ...
    @property
    def token(self) -> int: ...


class Consumer(Protocol):
    """One handle's at-least-once consumer (in one process: a forked child
    makes its own). The only code of a backend that changes a leased
    message's state or the handle's in-flight count.

    Lease ids are (slot, token) pairs: ``slot`` indexes the in-flight table and
    ``token`` changes every time that entry is reused, so a stale ack can
    never hit another message. Every settling call raises ValueError for a
    message another Consumer leased, and ``LeaseLost`` once the lease is gone
    (expired -- even if nobody took the message again yet --, requeued, or
    settled already); a lost lease leaves the message LOST.
    """

    owner: Any
    in_flight: int            # HELD messages leased through this consumer

    def lease(self, max_messages: int, timeout: Optional[float],
              lease_seconds: float) -> list:
        """Like get_many, but each message is leased, not consumed: a list of
        HELD ``message_class`` objects; ``in_flight`` grows by as many. Waits
        up to timeout for the first one (Empty otherwise); also waits while
        the in-flight table is full (it holds ``maxsize`` entries). Before
        taking, expired/dead leases are redelivered (cheap when none are
        due)."""

    def ack(self, msg) -> None:
        """Done with it: ACKED. A second ack of an ACKED message is a no-op."""

    def nack(self, msg, requeue: bool = True) -> None:
        """Give it back now: NACKED (requeue=True: to the back of the queue
        with delivery count + 1, or dead-lettered past max_deliveries;
        requeue=False: dead-letter it now)."""

    def touch(self, msg, seconds: float) -> None:
        """Extend the lease to now + seconds; the message stays HELD."""

    def ack_many(self, messages: Sequence) -> int:
        """Ack every HELD message of the batch (ACKED, or LOST when its lease
        was lost: never LeaseLost); messages not HELD are skipped. All are
        validated first (TypeError for a non-message, ValueError for another
        consumer's): a bad item acks none. Returns how many were acked."""

    def recount(self) -> int:
        """Lower ``in_flight`` to the entries this process really holds
        (messages dropped without ack/nack count until their lease expires);
        returns it."""

    def take_dead_letters(self, max_messages: int) -> list:
        """Parked dead letters (only with a dead_letter queue name), now held
        by this consumer: list of (slot, token, payload). The caller puts each
        payload on the dead-letter queue and then calls ack_dead(slot, token);
        a crash in between makes it parked again (at-least-once into the
        dead-letter queue)."""

    def ack_dead(self, slot: int, token: int) -> None: ...


def list_segments() -> Iterable[str]:
    """Names of fastmq segments of this backend present on the host."""
