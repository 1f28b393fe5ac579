"""fastmq: a shared-memory message queue for Python processes on one host.

``fastmq.Queue`` is a drop-in for ``multiprocessing.Queue`` whose handles also
pickle through other queues, plus named queues, batches and zero-copy helpers.
``fastmq.backend`` says which ring implementation is in use ("native" = the C
core, "pure" = the pure-Python fallback; ``FASTMQ_BACKEND`` forces one).
"""
from __future__ import annotations

from . import _backend, _lifetime
from .errors import (CorruptQueue, Empty, Error, Full, LeaseLost, MessageTooLarge,
                     QueueClosed, QueueExists, QueueNotFound, Unavailable, Unroutable)
from .errors import AuthenticationError
from .queue import Queue, Received
from .acks import Message, TooManyInFlight
from .exchange import Exchange
from ._serialize import BadMessage
from ._wait import wait

__version__ = "0.1.0"
backend = _backend.DEFAULT

__all__ = [
    "Queue", "Received", "cleanup", "backend", "__version__",
    "Error", "Empty", "Full", "QueueClosed", "MessageTooLarge", "QueueNotFound",
    "QueueExists", "CorruptQueue", "LeaseLost", "BadMessage", "Message",
    "TooManyInFlight", "Exchange", "wait", "Unavailable", "Unroutable",
    "AuthenticationError",
]


def cleanup() -> int:
    """Remove anonymous queues' shared memory that no live process uses any
    more (e.g. after every user was ``kill -9``'d) and what creators that died
    while setting up a queue or exchange left; returns how many files."""
    return _lifetime.cleanup()


# Cheap (one /dev/shm listing) and never raises: reclaim what crashed runs left.
try:
    cleanup()
except Exception:  # pragma: no cover - housekeeping must not break imports
    pass
