"""fastmq's exceptions.

Every exception a user can see is defined here so that both backends (the C core
binding and the pure-Python fallback) raise exactly the same types. Where the
standard library already has the right meaning we subclass it, so code written
for ``multiprocessing.Queue`` / ``queue.Queue`` keeps catching what it caught.
"""
from __future__ import annotations

import queue as _stdlib_queue

__all__ = [
    "Error", "Empty", "Full", "QueueClosed", "MessageTooLarge", "QueueNotFound",
    "QueueExists", "CorruptQueue", "LeaseLost", "Unavailable", "Unroutable",
    "AuthenticationError",
]


class Error(Exception):
    """Base class of fastmq errors that have no better standard-library base."""


class Empty(_stdlib_queue.Empty):
    """``get`` with ``block=False``, or its timeout expired, and nothing was queued."""


class Full(_stdlib_queue.Full):
    """``put`` with ``block=False``, or its timeout expired, and there was no room."""


class QueueClosed(ValueError):
    """The handle was closed (``ValueError`` like ``multiprocessing.Queue``)."""


class MessageTooLarge(ValueError):
    """A message is bigger than the queue's ``max_message_size``; nothing was written."""


class QueueNotFound(FileNotFoundError):
    """``open()`` of a queue name that does not exist."""


class QueueExists(FileExistsError):
    """``create()`` of a queue name that already exists (and ``exist_ok`` was false)."""


class CorruptQueue(Error):
    """The shared segment is not a valid fastmq queue of this version."""


class LeaseLost(Error):
    """``ack``/``touch``/``release`` of a message whose lease expired or was reclaimed."""


class Unavailable(Error, ConnectionError):
    """The queue's location (e.g. a Redis server) could not be reached in time.

    The message names the location with its credentials masked."""


class AuthenticationError(Error):
    """A message failed its authentication check (queue opened with
    ``authkey=``): it was not deserialized, and it was consumed and counted in
    ``stats()["rejected"]``. Also raised by a handle without the key that
    reads an authenticated message."""


class Unroutable(Error):
    """``Exchange.publish(..., mandatory=True)``: no bound queue took the message
    (no binding matches its key, or the matching queues no longer exist)."""
