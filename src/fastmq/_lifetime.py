"""When an anonymous segment's file under /dev/shm is removed.

One protocol for both backends, so a segment's lifetime never depends on which
backend a process uses: this module implements it for the pure backend and
for ``cleanup()``; ``csrc/fmq_region.c`` (create, open, close, and the fork
handler, which runs ``fmq_live_after_fork`` of ``csrc/fmq_live.c`` for each
inherited handle) implements the same steps in C.

* Every open handle of an anonymous segment holds ``flock(LOCK_SH)`` on the
  segment file. flock locks belong to the *open file description*, so the
  kernel drops them when the last reference to that description goes away --
  including when a process is ``kill -9``'d. Which description holds it: the
  pure backend's handle descriptor; in the native backend the description the
  segment was mapped from, which the mapping keeps referenced (the handle's
  own descriptor is then given a fresh description for its liveness lock,
  ``fmq_live.c``), so the lock lasts exactly as long as the mapping.
* A forked child: with the pure backend it shares its parent's descriptor and
  so its description and lock, which is exactly right: the segment is in use
  as long as either process still has it open. With the native backend the
  child's inherited mapping keeps the parent's description (and lock)
  referenced too, and the fork handler gives each inherited descriptor a new
  description, on which the child takes ``LOCK_SH`` of its own.
* Closing a handle: drop its descriptor (the native one unmaps first)
  *without* ``LOCK_UN`` (LOCK_UN would also release the lock for a forked
  child sharing the description), then open the file anew and try
  ``LOCK_EX | LOCK_NB``. Success means nobody else holds it, so the closer
  unlinks it -- before it lets go of the exclusive lock. Two closers racing
  both try; at most one wins and the other sees the file gone.
* Attaching (opening an anonymous segment) takes ``LOCK_SH | LOCK_NB``,
  retrying for up to a second (a closer or ``cleanup()`` holds ``LOCK_EX``
  only for a moment), and then checks that the name still refers to the inode
  it locked: a closer that won the exclusive lock has unlinked it, so the
  opener treats the segment as gone instead of keeping a zombie alive.
* ``cleanup()`` catches what nobody closed (every user ``kill -9``'d): any
  ``fastmq-anon-*`` fastmq segment (checked by its magic) that can be locked
  exclusively has no live holder and is unlinked -- at once, no grace period:
  a creator holds its shared lock before the name exists (below).
* Creating: both backends initialize a segment under a temporary name
  (``fastmq-tmp-<pid>-<random>``; exchanges use ``fastmq-xtmp-``) while
  holding ``flock(LOCK_EX)`` on it (the native creator also holds an OFD
  "initializing" lock, which tells an opener of a segment that is not ready
  yet that its creator is alive), convert that flock to ``LOCK_SH``
  (anonymous) or drop it (named), and ``link`` the file into place when it is
  complete. So a segment being set up is visible as such without any clock,
  and nothing ever sees a half-made one under its real name. ``cleanup()``
  removes a temporary file only when its creator is provably dead: the pid in
  its name is gone (or a zombie) *and* nobody holds a lock on it.

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
import secrets
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
EXCHANGE_TMP_PREFIX = "fastmq-xtmp-"
TEMP_PREFIXES = (_names.TMP_PREFIX, EXCHANGE_TMP_PREFIX)

# The first bytes of a fastmq segment: the native core's ("FASTMQ" then its
# format byte and backend letter) and the pure backend's.
_MAGICS = (b"FASTMQ", b"FMQPURE\x01")


def segment_path(segment: str) -> str:
    return os.path.join(SHM_DIR, segment)


# --------------------------------------------------------------- inode locks

class ForkSafeLock:
    """A thread lock that a forked child gets back unlocked.

    A thread of the parent may hold it at fork time; that thread does not
    exist in the child, so the child's first use would wait for ever. The
    fork handler below gives every live one a fresh lock in the child,
    before any of the child's own code runs.
    """

    __slots__ = ("_lock", "_reentrant", "__weakref__")

    def __init__(self, reentrant=False):
        self._reentrant = reentrant
        self._lock = threading.RLock() if reentrant else threading.Lock()
        _fork_safe_locks.add(self)

    def acquire(self, blocking=True, timeout=-1):
        return self._lock.acquire(blocking, timeout)

    def release(self):
        self._lock.release()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def _reset_after_fork(self):
        self._lock = threading.RLock() if self._reentrant else threading.Lock()


_fork_safe_locks: "weakref.WeakSet[ForkSafeLock]" = weakref.WeakSet()


class InodeLock(ForkSafeLock):
    """A process-wide re-entrant lock for one segment file (by device+inode);
    record locks are not inherited through fork either."""

    __slots__ = ()

    def __init__(self):
        super().__init__(reentrant=True)


_registry_lock = ForkSafeLock()
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


# ------------------------------------------------------------------ fork

# The Python layer's one fork mechanism, installed once, here: bumped in every
# forked child. State that a handle or an object keeps per process records
# the value it was made under; another value means it was inherited through
# fork() and belongs to the parent (cheaper than os.getpid() on every call,
# and immune to pid reuse). The C core has its own counter for its own
# objects (``fmq_fork_gen``), moved on by its fork handler in the same fork.
fork_generation = 0


def _after_fork_in_child():
    global fork_generation
    fork_generation += 1
    for lock in list(_fork_safe_locks):
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


def temp_path(prefix=_names.TMP_PREFIX) -> str:
    """A fresh path to initialize a segment (or exchange) under before it is
    linked into place; the pid says whose it is (see cleanup)."""
    return os.path.join(SHM_DIR, f"{prefix}{os.getpid()}-{secrets.token_hex(8)}")


def create_temp(mode, prefix=_names.TMP_PREFIX):
    """Create a temporary file (``O_EXCL``, never through a symlink) holding
    ``flock(LOCK_EX)`` on it: ``(path, fd)``. The lock tells cleanup that its
    creator is at work; the creator converts or drops it before linking."""
    for _ in range(8):
        path = temp_path(prefix)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, mode)
        except FileExistsError:
            continue
        portable.flock_exclusive(fd)     # nobody else can know the name yet
        return path, fd
    raise FileExistsError(f"cannot make a temporary file in {SHM_DIR}")


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


def _unlink_if_unused(path: str, lock: InodeLock = None, magic: bool = False) -> bool:
    """Unlink ``path`` if nobody holds a lock on it (and, with ``magic``, if
    it is a fastmq segment: cleanup does not know the file is ours)."""
    try:
        probe = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False                 # already gone (or not ours to touch)
    try:
        if not _is_regular(os.fstat(probe).st_mode):
            return False
        try:
            portable.flock_try(probe, exclusive=True)
        except OSError:
            return False             # someone still holds it: still in use
        if not _same_file(path, probe):
            return False             # replaced/removed meanwhile
        if magic and not os.pread(probe, 8, 0).startswith(_MAGICS):
            return False             # not a fastmq segment: not ours to delete
        try:
            os.unlink(path)          # before the lock goes: see attach()
        except FileNotFoundError:
            return False
        return True
    finally:
        guarded_close(probe, lock)


def _pid_is_gone(pid: int) -> bool:
    """Is process ``pid`` provably dead (no such process, or a zombie)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False                 # someone else's live process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _unlink_dead_temp(path: str, entry: str) -> bool:
    """Remove a temporary file whose creator is provably dead: the pid in its
    name is gone and nobody holds a lock on it."""
    prefix = next(p for p in TEMP_PREFIXES if entry.startswith(p))
    try:
        pid = int(entry[len(prefix):].split("-", 1)[0])
    except ValueError:
        return False
    if pid <= 0 or not _pid_is_gone(pid):
        return False
    return _unlink_if_unused(path)


def cleanup() -> int:
    """Remove what no live process uses any more; return how many files.

    That is: anonymous segments nobody holds (every user was ``kill -9``'d),
    and temporary files of creators that died while initializing. Safe to
    call any time from any process: a segment still in use is never touched
    (its users hold a shared lock), a segment being set up is a temporary
    file whose creator is alive, and a file that is not a fastmq segment is
    left alone. Never raises.
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
    for entry in entries:
        path = os.path.join(directory, entry)
        try:
            if entry.startswith(_names.ANON_PREFIX):
                if _unlink_if_unused(path, magic=True):
                    removed += 1
            elif entry.startswith(TEMP_PREFIXES):
                if _unlink_dead_temp(path, entry):
                    removed += 1
        except Exception:            # never let housekeeping break an import
            continue
    return removed


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


__all__ = ["cleanup", "attach", "detach", "inode_lock", "guarded_close",
           "segment_path", "temp_path", "create_temp", "SHM_DIR", "NATIVE_SHM_DIR",
           "InodeLock", "ForkSafeLock"]
