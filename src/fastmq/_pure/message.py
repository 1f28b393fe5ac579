"""What a leased message is made of, for installs without the C core.

The same fields (``_contract.MESSAGE_FIELDS``) and read-only properties as
``fastmq._core.LeasedMessage``, which is used instead whenever the extension
imports, by both backends; ``fastmq.Message`` in ``acks.py`` subclasses
whichever is present and adds the behaviour. ``_state`` is written only by the
Consumer that leased the message (``consumer.py``, or the native one).
"""
from __future__ import annotations

from .._contract import HELD, MESSAGE_FIELDS


class LeasedMessage:
    __slots__ = MESSAGE_FIELDS

    def __init__(self, consumer, slot, token, payload, delivery_count):
        self._consumer, self._slot, self._token = consumer, slot, token
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
