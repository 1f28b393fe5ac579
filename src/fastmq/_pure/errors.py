"""The pure backend's error funnel: the one place it raises Empty, Full,
LeaseLost and QueueClosed (the counterpart of the native backend's
``_core_parts/errors.pxi``), so every module of the backend words a condition
the same way."""
from __future__ import annotations

from ..errors import Empty, Full, LeaseLost, QueueClosed


def empty():
    raise Empty("queue is empty")


def full(reason):
    """``reason``: which limit the put ran into (``Ring._full_reason``)."""
    raise Full(reason)


def lease_lost(detail):
    raise LeaseLost(detail)


def closed(detail="queue handle is closed"):
    raise QueueClosed(detail)
