"""``fastmq.wait``: block until at least one of several queues has a message.

Design. A queue's readers sleep on that queue's own wake-up (the native
core's futex), and a producer wakes only the queue it wrote to: there is no
one thing that all queues signal. So ``wait`` sleeps on the *first* queue's
wake-up -- a put there ends the sleep at once -- for a bounded slice, then
checks every queue without blocking (``qsize``). (The pure backend has no
wake-up at all -- its own blocking calls poll -- so there ``wait`` just sleeps
the slice.)
The slice starts at 50 us and doubles up to ``MAX_SLICE`` while nothing
happens, so

* a message in the first queue is seen as soon as it is committed (native);
* a message in any other queue within ``MAX_SLICE`` (5 ms) plus the checks;
* an idle wait wakes at most 1 / MAX_SLICE = 200 times a second, each time
  for a few microseconds per queue: ~0% of a core, with the GIL released
  while asleep (native) and signals (Ctrl-C) handled between slices.

Put the queue that should answer fastest first. ``wait`` takes nothing from
any queue: a queue it reports may be emptied by another consumer before this
one gets to it (then ``get_nowait`` raises ``Empty``), as with ``select``.
"""
from __future__ import annotations

import math
import time
from typing import Any, List, Optional, Sequence, TypeVar

from .queue import Queue

__all__ = ["wait", "MAX_SLICE"]

FIRST_SLICE = 50e-6
MAX_SLICE = 5e-3

_Q = TypeVar("_Q", bound="Queue[Any]")


def wait(queues: Sequence[_Q], timeout: Optional[float] = None) -> List[_Q]:
    """The queues of ``queues`` that have a message to get, in their order, as
    soon as at least one has; ``[]`` if none has within ``timeout`` seconds
    (``None``: wait as long as it takes; ``0``: just look)."""
    queues = list(queues)
    if not queues:
        raise ValueError("fastmq.wait() needs at least one queue")
    for q in queues:
        if not isinstance(q, Queue):
            raise TypeError(f"fastmq.wait() takes fastmq.Queue objects, not "
                            f"{type(q).__name__}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"'timeout' must be a number or None, not {type(timeout).__name__}")
        if timeout < 0 or math.isnan(timeout):
            raise ValueError("'timeout' must be a non-negative number")
    deadline = None if timeout is None else time.monotonic() + timeout
    first = queues[0]
    native = first.backend == "native"
    slice_ = FIRST_SLICE
    while True:
        ready = [q for q in queues if q.qsize() > 0]     # QueueClosed if one is closed
        if ready:
            return ready
        if deadline is None:
            nap = slice_
        else:
            nap = min(slice_, deadline - time.monotonic())
            if nap <= 0:
                return []
        if native:
            first._live_ring().wait(False, nap)   # futex: a put to `first` ends it
        else:
            time.sleep(nap)   # the pure ring has no wake-up: its own wait polls too
        slice_ = min(slice_ * 2, MAX_SLICE)
