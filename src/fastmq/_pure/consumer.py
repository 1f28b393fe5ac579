"""One handle's at-least-once consumer, for the pure backend.

The same contract as the native ``Consumer`` (``_core_parts/consumer.pxi``):
it leases messages out of the ring's in-flight table (``leases.py``), builds
them as ``message_class`` objects, settles them and counts the ones it holds.
It is the only code of this backend that writes a message's ``_state`` or the
in-flight count; the policy on top (``fastmq/acks.py``) only asks.
"""
from __future__ import annotations

import os

from .._contract import ACKED, HELD, LOST, MESSAGE_FIELDS, NACKED
from . import errors
from ..errors import LeaseLost

_SETTLED_REASON = ("is held", "was acked", "was nacked", "lease was already reported lost")


class Consumer:
    """Returned by ``Ring.consumer(owner, message_class)``; ``owner`` is kept
    for the caller (the messages lead back to it) and never looked into."""

    __slots__ = ("ring", "owner", "in_flight", "_table", "_cls")

    def __init__(self, ring, owner, message_class):
        if not isinstance(message_class, type) or \
                not all(hasattr(message_class, f) for f in MESSAGE_FIELDS):
            raise TypeError(f"message_class must be a LeasedMessage type, not {message_class!r}")
        self.ring = ring                  # keeps the handle alive while messages live
        self.owner = owner
        self.in_flight = 0
        self._table = ring.in_flight_table
        self._cls = message_class

    # ---- leasing

    def lease(self, max_messages, timeout, lease_seconds):
        cls = self._cls
        got = [cls(self, slot, token, payload, deliveries)
               for slot, token, payload, deliveries in
               self._table.take(max_messages, timeout, lease_seconds)]
        self.in_flight += len(got)
        return got

    # ---- settling

    def _check_held(self, msg, what):
        if msg._consumer is not self:
            raise ValueError(f"{msg!r} was not leased through this queue handle in this "
                             "process")
        if msg._state != HELD:
            errors.lease_lost(f"cannot {what} message {msg._slot}: it "
                              f"{_SETTLED_REASON[msg._state]}")

    def _run(self, msg, state, op, *args):
        """``op(slot, token, *args)`` on msg's entry; then msg is ``state``
        (None: still HELD), or LOST with LeaseLost if the lease was lost."""
        try:
            op(msg._slot, msg._token, *args)
        except LeaseLost:
            msg._state = LOST
            self.in_flight -= 1
            raise
        if state is not None:
            msg._state = state
            self.in_flight -= 1

    def ack(self, msg):
        if msg._state == ACKED and msg._consumer is self:
            return
        self._check_held(msg, "ack")
        self._run(msg, ACKED, self._table.ack)

    def nack(self, msg, requeue=True):
        self._check_held(msg, "nack")
        self._run(msg, NACKED, self._table.nack, bool(requeue))

    def touch(self, msg, seconds):
        if not 0 < seconds <= 1e9:
            raise ValueError("seconds must be a positive number")
        self._check_held(msg, "touch")
        self._run(msg, None, self._table.touch, seconds)

    def ack_many(self, messages):
        messages = list(messages)
        cls = self._cls
        for m in messages:                # validate all first: a bad item acks none
            if not isinstance(m, cls):
                raise TypeError(f"ack_many takes fastmq.{cls.__name__} objects, not "
                                f"{type(m).__name__}")
            if m._state == HELD and m._consumer is not self:
                raise ValueError(f"{m!r} was not leased through this queue handle in this "
                                 "process")
        held = [m for m in messages if m._state == HELD]
        if not held:
            return 0
        results = self._table.ack_pairs([(m._slot, m._token) for m in held])
        for m, ok in zip(held, results):
            m._state = ACKED if ok else LOST
        self.in_flight -= len(held)
        return sum(results)

    def recount(self):
        """Correct in_flight for messages dropped without ack/nack (see the
        native Consumer.recount). Returns the count."""
        pid = os.getpid()
        held = sum(1 for entry in self.ring.pending()
                   if entry["pid"] == pid and entry["expires_in"] > 0)
        if held < self.in_flight:
            self.in_flight = held
        return self.in_flight

    # ---- dead letters

    def take_dead_letters(self, max_messages):
        return self._table.take_dead_letters(max_messages)

    def ack_dead(self, slot, token):
        self._table.ack_dead(slot, token)

    def __repr__(self):
        return f"<fastmq._pure.consumer.Consumer in_flight={self.in_flight}>"
