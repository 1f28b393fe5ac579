"""asyncio for ``fastmq.Queue``: ``get_async``, ``put_async``,
``get_many_async``, ``get_message_async``.

How an awaiting call waits. It first tries the operation without blocking.
If that would block, the coroutine parks on a future, and one *waiter thread
per queue handle and direction* sleeps in the ring's own wait (a futex wait
in the C core, GIL released; polling with back-off in the pure backend)
until a message looks ready to take, or a slot and the bytes look free. Then
it wakes every parked coroutine, and each one tries again. So:

* an idle awaiting consumer costs no CPU: the thread sleeps in the kernel,
  and the event loop sleeps in its selector;
* a thousand coroutines waiting on one queue cost one thread, not a thousand;
* waiting never consumes anything, so cancelling an awaiting ``get_async``
  (or its timeout) can never lose a message: the take happens on the event
  loop thread, in the same step that returns it.

A waiter wakes its coroutines at least every ``RETRY`` seconds anyway (they
retry and park again). This covers what the ring's wait cannot see, such as
an expired lease that only a taker redelivers.

The thread exits when no coroutine is waiting. A forked child starts its own
waiters (threads do not survive ``fork()``, and a condition inherited from a
parent's thread may be locked forever): inherited ones are recognised by the
fork generation (``_lifetime.fork_generation``) they were made under.

``asyncio`` itself is imported by ``call`` on first use, not here: it is most
of the cost of ``import fastmq``, and a caller that awaits has already
imported it.
"""
from __future__ import annotations

import threading
import time

from . import _lifetime
from .errors import Empty, Full

__all__ = ["call"]

SLICE = 0.1     # seconds a waiter thread sleeps in one ring wait
RETRY = 0.25    # seconds after which a parked coroutine retries regardless
LINGER = 1.0    # seconds an idle waiter thread stays for the next park


class _Waiter:
    """Parked coroutines of one queue handle waiting for one condition
    (data, or room for ``need`` bytes), and the thread that waits for them."""

    def __init__(self, ring, for_space):
        self._ring = ring
        self._for_space = for_space
        self._cond = threading.Condition()
        self._parked = {}                # future -> (loop, need)
        self._thread = None

    def park(self, loop, need):
        fut = loop.create_future()
        with self._cond:
            self._parked[fut] = (loop, need)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True,
                    name=f"fastmq-async-{'put' if self._for_space else 'get'} "
                         f"{self._ring.name}")
                self._thread.start()
            else:
                self._cond.notify()
        return fut

    def unpark(self, fut):
        with self._cond:
            self._parked.pop(fut, None)

    def _run(self):
        while True:
            with self._cond:
                if not self._parked:
                    # Linger a while: a consumer that keeps up parks again
                    # right after each message, and a thread per park costs.
                    self._cond.wait(LINGER)
                    if not self._parked:
                        self._thread = None
                        return
                need = min(need for _, need in self._parked.values())
            try:
                ready = self._ring.wait(self._for_space, SLICE, need)
            except BaseException:        # closed handle, corrupt queue, ...:
                ready = True             # the coroutines' retry raises it
            if ready:
                self._wake_all()

    def _wake_all(self):
        with self._cond:
            parked, self._parked = self._parked, {}
        for fut, (loop, _) in parked.items():
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:         # that loop is closed: nobody waits
                pass


def _resolve(fut):
    if not fut.done():
        fut.set_result(None)


def _waiter(queue, for_space):
    """The handle's waiter for this direction, in this process."""
    key = "_async_waiters"
    state = queue.__dict__.get(key)
    if state is None or state[0] != _lifetime.fork_generation:
        # None yet, or inherited through fork(): the parent's waiters (their
        # threads and conditions) are not ours to use.
        ring = queue._live_ring()
        state = queue.__dict__[key] = (_lifetime.fork_generation, _Waiter(ring, False),
                                       _Waiter(ring, True))
    return state[2] if for_space else state[1]


async def call(queue, attempt, for_space, timeout, need=0):
    """Await ``attempt()`` -- the operation with ``block=False`` -- until it
    stops raising Empty (Full when ``for_space``), or ``timeout`` passes (None:
    forever). ``need``: the bytes a put needs, to wait for room that fits."""
    import asyncio      # already in sys.modules: the caller is a coroutine
    would_block = Full if for_space else Empty
    deadline = None if timeout is None else time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    waiter = None
    misses = 0          # woken, yet the retry would still block
    while True:
        try:
            return attempt()
        except would_block:
            pass
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise would_block()
        if misses > 1:
            # Woken for nothing twice in a row: what the ring's wait sees is
            # not what this operation needs (another consumer is faster, or
            # the in-flight table is full). Back off instead of spinning.
            await asyncio.sleep(min(0.0005 * 2 ** misses, RETRY,
                                    left if left is not None else RETRY))
        if waiter is None:
            waiter = _waiter(queue, for_space)
        fut = waiter.park(loop, need)
        try:
            await asyncio.wait((fut,), timeout=RETRY if left is None else min(left, RETRY))
        finally:
            waiter.unpark(fut)
        misses = misses + 1 if fut.done() else 0
