"""What a leased message is made of, for installs without the C core.

The same fields and read-only properties as ``fastmq._core.LeasedMessage``
(which is used instead whenever the extension imports, by both backends);
``fastmq.Message`` in ``acks.py`` subclasses whichever is present and adds
the behaviour. Kept apart from ``leases.py`` so that importing the Message
type does not import a ring.
"""
from __future__ import annotations

# Settlement states (the same numbers as in _core.pyx).
HELD, ACKED, NACKED, LOST = range(4)


class LeasedMessage:
    __slots__ = ("_ctx", "_slot", "_token", "delivery_count", "_payload", "_state")

    def __init__(self, ctx, slot, token, payload, delivery_count):
        self._ctx, self._slot, self._token = ctx, slot, token
        self._payload, self.delivery_count = payload, delivery_count
        self._state = HELD

    @property
    def data(self) -> memoryview:
        """Read-only memoryview of the payload."""
        return memoryview(self._payload)

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def id(self) -> int:
        """The in-flight entry, as in ``Queue.pending()[i]["id"]``."""
        return self._slot

    @property
    def token(self) -> int:
        return self._token


def ack_messages(ring, messages, ctx):
    """The pure backend's ``Ring.ack_many(messages, ctx)`` (see _core.pyx):
    validate all, ack the held ones, set their states -> (acked, settled)."""
    messages = list(messages)
    cls = ctx.message_class
    for m in messages:
        if not isinstance(m, cls) or (m._state == HELD and m._ctx is not ctx):
            ctx.reject(m)
            raise TypeError(f"ack_many: {m!r} cannot be acked here")
    held = [m for m in messages if m._state == HELD]
    if not held:
        return 0, 0
    results = ring._ack_pairs([(m._slot, m._token) for m in held])
    for m, ok in zip(held, results):
        m._state = ACKED if ok else LOST
    return sum(results), len(held)
