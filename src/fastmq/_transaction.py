"""``with queue.transaction() as tx:`` -- an atomic batch built up step by step.

The messages are encoded (and sealed, with an ``authkey``) as they are added
and kept in this process; nothing reaches the queue before the ``with`` block
ends normally, and then all of them go in as one atomic batch
(``put_many(..., atomic=True)``): consumers see all of them or none, in order.
If the block raises, nothing is sent. The same class serves every location;
each queue passes its own encoders and commit.
"""
from __future__ import annotations

from typing import Any, Callable, List

__all__ = ["Transaction"]


class Transaction:
    """Collects messages for one atomic batch (see the module docstring).

    ``sent`` is the number of messages committed (0 until the block ends, and
    after an abort)."""

    __slots__ = ("_encode", "_encode_bytes", "_commit", "_items", "_state", "sent")

    def __init__(self, encode: Callable[[Any], Any], encode_bytes: Callable[[Any], Any],
                 commit: Callable[[List[Any]], int]):
        self._encode = encode
        self._encode_bytes = encode_bytes
        self._commit = commit
        self._items: List[Any] = []
        self._state = "new"
        self.sent = 0

    def _check_open(self):
        if self._state != "open":
            raise RuntimeError(f"this transaction is {self._state}: messages can only be "
                               "added inside its 'with' block")

    def put(self, obj: Any) -> None:
        """Add ``obj`` (serialized now, as ``Queue.put`` would)."""
        self._check_open()
        self._items.append(self._encode(obj))

    def put_bytes(self, data: Any) -> None:
        """Add a bytes-like payload as it is (copied now)."""
        self._check_open()
        self._items.append(self._encode_bytes(data))

    def __len__(self) -> int:
        return len(self._items)

    def __enter__(self) -> "Transaction":
        if self._state != "new":
            raise RuntimeError("a transaction can be entered only once")
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        items, self._items = self._items, []
        if exc_type is not None:
            self._state = "aborted"
            return False
        self._state = "committing"
        try:
            self.sent = self._commit(items) if items else 0
        except BaseException:
            self._state = "aborted"
            raise
        self._state = "committed"
        return False

    def __repr__(self) -> str:
        return f"<fastmq.Transaction {self._state}, {len(self._items)} messages>"
