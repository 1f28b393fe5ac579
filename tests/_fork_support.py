"""``fork_while_held``: fork while a thread of this process holds a lock, and
run one action in the child -- the state a fork() from any thread of a
threaded program can leave behind (the holder does not exist in the child).
"""
from __future__ import annotations

import os
import select
import signal
import threading
import time


def fork_while_held(lock, action, timeout=10.0):
    """Hold ``lock`` in another thread, fork, run ``action()`` in the child.

    Returns ``repr`` of the child's result (or ``"error: ..."``), or None if
    the child did not answer within ``timeout`` seconds (it is then killed).
    The holding thread and the child are always finished before returning.
    """
    held, leave = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            leave.wait(timeout + 5)
    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    r = w = None
    pid = None
    try:
        assert held.wait(5), "the holding thread did not take the lock"
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                               # the child: one thread, lock inherited held
            try:
                os.close(r)
                try:
                    answer = repr(action())
                except BaseException as exc:        # noqa: BLE001 - reported to the parent
                    answer = f"error: {exc!r}"
                os.write(w, answer.encode() + b"\n")
            finally:
                os._exit(0)
        os.close(w)
        w = None
        if not select.select([r], [], [], timeout)[0]:
            return None
        return os.read(r, 65536).decode().strip()
    finally:
        leave.set()
        holder.join(timeout + 5)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0]:
                time.sleep(0.01)
        for fd in (r, w):
            if fd is not None:
                os.close(fd)
