"""When an anonymous segment's file under /dev/shm is removed.

One protocol, shared by both backends (the C core implements the same steps),
so a segment's lifetime never depends on which backend a process uses:

* Every open handle of an anonymous segment holds ``flock(fd, LOCK_SH)`` on
  the segment file. flock locks belong to the *open file description*, so the
  kernel drops them when the last descriptor of it goes away -- including when
  a process is ``kill -9``'d. A forked child shares its parent's description
  (and therefore its lock), which is exactly right: the segment is in use as
  long as either process still has it open.
* Closing a handle: close its own descriptor *without* ``LOCK_UN`` (LOCK_UN
  would also release the lock for a forked child sharing the description),
  then open the file anew and try ``LOCK_EX | LOCK_NB``. Success means nobody
  else holds it, so the closer unlinks it. Two closers racing both try; at most
  one wins and the other sees the file gone.
* Attaching (opening an anonymous segment) takes ``LOCK_SH | LOCK_NB`` and then
  checks that the name still refers to the same inode: a closer that won the
  exclusive lock is about to unlink (or has unlinked) it, so the opener treats
  the segment as gone instead of keeping a zombie alive.
* ``cleanup()`` catches what nobody closed (every user ``kill -9``'d): any
  ``fastmq-anon-*`` file older than ``ORPHAN_AGE`` seconds that can be locked
  exclusively has no live holder and is unlinked. The age guard leaves a
  creator the moment between creating the file and locking it.

POSIX record locks (``lockf``, used by the pure backend as its mutex) have a
nasty property: closing *any* descriptor of a file releases *all* of the
process's record locks on it. So every descriptor of a segment file that this
module (or the pure backend) closes is closed while holding the process-wide
``inode_lock`` of that file, the same lock the pure backend holds around its
record-locked critical sections. That serialises "close some fd" against
"hold the record lock" inside one process.
"""
from __future__ import annotations

import os
import stat
import threading
import time
import weakref

from . import _names
from ._pure import portable

# Where the pure backend's segment files are (``FASTMQ_SHM_DIR``; see
# ``_pure/portable.py``); the native backend's are always in NATIVE_SHM_DIR.
SHM_DIR = portable.shm_dir()
NATIVE_SHM_DIR = portable.NATIVE_SHM_DIR
ORPHAN_AGE = 10.0          # seconds; see module docstring


def segment_path(segment: str) -> str:
    return os.path.join(SHM_DIR, segment)


# --------------------------------------------------------------- inode locks

class InodeLock:
    """A process-wide re-entrant lock for one segment file (by device+inode).

    Reset in a forked child: the child gets fresh, unlocked locks because a
    thread of the parent may have held one at fork time and that thread does
    not exist in the child (record locks are not inherited either).
    """

    __slots__ = ("_lock", "__weakref__")

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def _reset_after_fork(self):
        self._lock = threading.RLock()


_registry_lock = threading.Lock()
_inode_locks: "weakref.WeakValueDictionary[tuple, InodeLock]" = weakref.WeakValueDictionary()


def inode_lock(fd: int) -> InodeLock:
    """The process-wide lock of the file open on ``fd`` (created on demand).

    Holders must keep a strong reference for as long as they use the file.
    """
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _registry_lock:
        lock = _inode_locks.get(key)
        if lock is None:
            lock = _inode_locks[key] = InodeLock()
        return lock


def _after_fork_in_child():
    global _registry_lock
    _registry_lock = threading.Lock()
    for lock in list(_inode_locks.values()):
        lock._reset_after_fork()


if hasattr(os, "register_at_fork"):     # POSIX; there is no fork elsewhere
    os.register_at_fork(after_in_child=_after_fork_in_child)


def guarded_close(fd: int, lock: InodeLock = None) -> None:
    """Close ``fd`` without yanking another thread's record lock (see above)."""
    try:
        lock = lock or inode_lock(fd)
    except OSError:
        os.close(fd)
        return
    with lock:
        os.close(fd)


# ------------------------------------------------------------ the protocol

def _same_file(path: str, fd: int) -> bool:
    try:
        a, b = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


_ATTACH_PATIENCE = 1.0     # seconds; a closer holds LOCK_EX only for a moment


def attach(path: str, fd: int) -> bool:
    """Register ``fd`` as a user of the anonymous segment at ``path``.

    Returns False when the segment is being removed (its last user closed it
    concurrently); the caller then reports it as not found.
    """
    deadline = time.monotonic() + _ATTACH_PATIENCE
    while True:
        try:
            portable.flock_try(fd, exclusive=False)
            break
        except BlockingIOError:
            # A closer or cleanup() is probing with LOCK_EX; it either gives
            # up (someone else holds the segment) or unlinks it, which the
            # inode check below detects.
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
    return _same_file(path, fd)


def detach(path: str, fd: int, lock: InodeLock = None) -> bool:
    """Close this handle's ``fd``; unlink ``path`` if no other handle holds it.

    Returns True if this call removed the file. Never raises for the ordinary
    races (file already gone, someone else still using it).
    """
    lock = lock or inode_lock(fd)
    with lock:
        os.close(fd)                 # NOT LOCK_UN: a forked child may share it
        return _unlink_if_unused(path, lock)


def _unlink_if_unused(path: str, lock: InodeLock = None) -> bool:
    try:
        probe = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False                 # already gone (or not ours to touch)
    try:
        try:
            portable.flock_try(probe, exclusive=True)
        except OSError:
            return False             # someone still holds it: still in use
        if not _same_file(path, probe):
            return False             # replaced/removed meanwhile
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        guarded_close(probe, lock)


def cleanup() -> int:
    """Remove anonymous segments that no live process holds; return how many.

    Safe to call any time from any process: a segment still in use is never
    touched (its users hold a shared lock), and a segment younger than
    ``ORPHAN_AGE`` seconds is left alone so that its creator can lock it.
    Never raises.
    """
    removed = 0
    for directory in dict.fromkeys((SHM_DIR, NATIVE_SHM_DIR)):   # both backends'
        removed += _cleanup_dir(directory)
    return removed


def _cleanup_dir(directory: str) -> int:
    removed = 0
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0
    now = time.time()
    for entry in entries:
        if not entry.startswith(_names.ANON_PREFIX):
            continue
        path = os.path.join(directory, entry)
        try:
            st = os.stat(path, follow_symlinks=False)
            if not _is_regular(st.st_mode):
                continue
            if now - max(st.st_mtime, st.st_ctime) < ORPHAN_AGE:
                continue
            if _unlink_if_unused(path):
                removed += 1
        except Exception:            # never let housekeeping break an import
            continue
    return removed


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


__all__ = ["cleanup", "attach", "detach", "inode_lock", "guarded_close",
           "segment_path", "SHM_DIR", "NATIVE_SHM_DIR", "ORPHAN_AGE", "InodeLock"]
