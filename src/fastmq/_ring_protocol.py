"""The contract between fastmq's Python layer and its two backends.

``fastmq.queue`` builds the public ``Queue`` on top of a *ring*: a shared-memory
message channel that moves opaque byte strings between processes. Two modules
implement it with identical behaviour:

* ``fastmq._core``      -- the C core through its Cython binding (backend "native")
* ``fastmq._pure.ring`` -- a pure-Python fallback (backend "pure")

Both export ``Ring``, ``Reservation``, ``Lease`` and the module functions below.
This file is only the written contract (a ``typing.Protocol``); nothing imports it
at run time except type checkers and the tests that check both backends conform.

Timeouts at this level are already normalised by the caller:
``None`` = block forever, ``0`` = do not block, ``> 0`` = seconds. Every blocking
call sleeps (never spins for long), wakes at least every ~100 ms to run Python
signal handlers (Ctrl-C -> KeyboardInterrupt) and to notice ``close()``.

Errors are fastmq's own exceptions from ``fastmq.errors`` (never a bare OSError
for a condition the user can act on): Empty, Full, MessageTooLarge, QueueClosed,
QueueNotFound, QueueExists, CorruptQueue.

Segment names are the file names under /dev/shm (no slash), already validated and
prefixed by the caller: ``fastmq-q-<name>`` for named queues and
``fastmq-anon-<hex>`` for anonymous ones.
"""
from __future__ import annotations

from typing import Iterable, Optional, Protocol, Sequence


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


class Lease(Protocol):
    """One received message whose bytes stay where they are (``Ring.recv``).

    ``view`` is a read-only memoryview. The message has already left the queue
    (auto-ack); the lease only keeps its memory alive. ``release()`` frees it now
    and raises ``BufferError`` while exports of ``view`` other than ``view``
    itself are alive; ``close()`` frees it now or, if exports are alive, when the
    last one is released (never an error). Both are idempotent once done.
    """

    view: memoryview
    nbytes: int

    def release(self) -> None: ...
    def close(self) -> None: ...


class Ring(Protocol):
    name: str                 # segment name (under /dev/shm)
    anonymous: bool           # unlinked automatically when the last handle closes
    maxsize: int              # capacity in messages (exact)
    max_message_size: int     # largest payload in bytes
    capacity_bytes: int       # bytes of the block pool
    closed: bool

    @classmethod
    def create(cls, name: str, *, maxsize: int, max_message_size: int,
               capacity_bytes: int, mode: int = 0o600, exist_ok: bool = False,
               anonymous: bool = False, max_deliveries: int = 20,
               dead_letter: str = "") -> "Ring":
        """Create and open a segment. ``exist_ok=True`` opens an existing one
        instead (its own geometry wins). Raises QueueExists, ValueError for
        absurd sizes, OSError (with a clear message) when /dev/shm is full."""

    @classmethod
    def open(cls, name: str) -> "Ring":
        """Open an existing segment: QueueNotFound, CorruptQueue."""

    @staticmethod
    def unlink(name: str) -> None:
        """Remove the name; open handles keep working. QueueNotFound if absent."""

    def put(self, data, timeout: Optional[float]) -> None:
        """Enqueue one bytes-like (any C-contiguous buffer, copied once)."""

    def get(self, timeout: Optional[float]) -> bytes: ...

    def put_many(self, items: Sequence, timeout: Optional[float],
                 atomic: bool = False) -> int:
        """Enqueue in order; returns how many went in. With timeout None all of
        them; otherwise as many as fit before the deadline (possibly 0, never
        raising Full). MessageTooLarge is checked for every item before any
        is written.

        ``atomic=True``: all of them or none, whatever process is killed
        where; consumers see the batch whole or not at all. It counts its
        size toward maxsize: waits until there is room for all of it (Full at
        the deadline); refused before anything is written when it can never
        fit (ValueError: more messages than maxsize; MessageTooLarge: more
        bytes than the ring can hold as one batch)."""

    def get_many(self, max_messages: int, timeout: Optional[float]) -> list:
        """At least one (waiting up to timeout, else Empty), at most max_messages,
        without waiting for more once one is available. An atomic batch is
        taken whole when it fits in max_messages."""

    def reserve(self, nbytes: int, timeout: Optional[float]) -> Reservation: ...
    def recv(self, timeout: Optional[float]) -> Lease: ...

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
        anonymous segment is unlinked when the last handle anywhere closes."""


def cleanup_orphans() -> int:
    """Unlink anonymous segments that no live process holds (e.g. after kill -9
    of all their users). Returns how many were removed. Cheap; called at import."""


def list_segments() -> Iterable[str]:
    """Names of fastmq segments of this backend present on the host."""


# ---------------------------------------------------------------------------
# At-least-once delivery (leases). Both backends implement these Ring methods.
#
# A leased message has left the ring but not the queue: it lives in the
# segment's in-flight table (so it survives the death of its consumer) until
# it is acked, or its lease expires / its consumer is provably dead, in which
# case it goes back to the BACK of the queue with delivery count + 1. A message
# whose delivery count would exceed the queue's max_deliveries is dead-lettered
# instead: dropped and counted (stats()["dead_lettered"]) when the queue has no
# dead_letter name, otherwise parked for the Python layer to forward (see
# take_dead_letters).
#
# Lease ids are (slot, token) pairs: ``slot`` indexes the in-flight table and
# ``token`` changes every time that entry is reused, so a stale ack can never
# hit another message.
# ---------------------------------------------------------------------------

class LeaseRing(Protocol):
    # ``ctx`` below is the consumer the messages belong to (acks._Lessee): it
    # has ``message_class`` (a subclass of the LeasedMessage in use: _core's,
    # else _pure/message.py's -- fields _ctx, _slot, _token, _payload,
    # delivery_count, _state) and ``reject(m)``, which raises the error for a
    # message that ack_many cannot take.

    def lease(self, max_messages: int, timeout: Optional[float],
              lease_seconds: float, ctx) -> list:
        """Like get_many, but each message is leased, not consumed. Returns a
        list of ``ctx.message_class`` objects with _ctx = ctx and state HELD.
        Waits up to timeout for the first one (Empty otherwise); also waits
        while the in-flight table is full (it holds ``maxsize`` entries).
        Before taking, expired/dead leases are redelivered (cheap when none are
        due)."""

    def ack(self, slot: int, token: int) -> None:
        """Done with it. LeaseLost if the lease expired (even if nobody took the
        message again yet), was requeued, or is not this handle's."""

    def ack_many(self, messages: Sequence, ctx) -> tuple:
        """Ack every HELD message of the batch and set its state (ACKED, or
        LOST when the lease was lost; never raises LeaseLost); messages not
        HELD are skipped. All are validated first (``ctx.reject``). Returns
        (acked, settled = how many were HELD)."""

    def nack(self, slot: int, token: int, requeue: bool = True) -> None:
        """Give it back now (requeue=True: to the back of the queue with
        delivery count + 1, or dead-lettered past max_deliveries;
        requeue=False: dead-letter it now). LeaseLost as for ack."""

    def touch(self, slot: int, token: int, seconds: float) -> None:
        """Extend the lease to now + seconds. LeaseLost as for ack."""

    def pending(self) -> list:
        """In-flight messages: dicts with id (slot), token, pid (holder; 0 if
        orphaned), idle (seconds since leased), delivery_count, expires_in."""

    def redeliver_due(self) -> int:
        """Requeue every lease that expired or whose holder is dead; returns
        how many. Called by lease()/waits; exposed for tests and the CLI."""

    def take_dead_letters(self, max_messages: int) -> list:
        """Parked dead letters (only with a dead_letter queue name): list of
        (slot, token, payload). The caller puts each payload on the dead-letter
        queue and then calls ack_dead(slot, token); a crash in between makes it
        parked again (at-least-once into the dead-letter queue)."""

    def ack_dead(self, slot: int, token: int) -> None: ...
