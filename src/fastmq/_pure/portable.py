"""What the pure backend (and the files fastmq keeps beside it) needs from the
OS, in one place, so that nothing Linux-only is imported at module level.

The directory
-------------
Segment files of the pure backend (and the exchanges' files) live in one
directory, chosen once per process:

1. ``FASTMQ_SHM_DIR``, if set and not empty (relative paths are taken from the
   current directory). Every process that shares a queue must see the same
   value; fastmq creates the directory (mode 0700) if it is missing.
2. ``/dev/shm`` where it exists (Linux): memory-backed, so a message never
   touches a disk.
3. otherwise ``fastmq-<uid>`` (``fastmq`` where there are no uids) in the
   system temporary directory (macOS: the per-user ``$TMPDIR``), created mode
   0700.

The native backend does not use this directory: it names its segments with
``shm_open``, which on Linux always means ``/dev/shm`` (``NATIVE_SHM_DIR``).

The locks
---------
``flock``-style whole-file locks (shared or exclusive, owned by the open file
description) and ``lockf``-style byte-range locks (owned by the process). On
POSIX both are ``fcntl``'s. On Windows ``msvcrt.locking`` offers only
exclusive byte-range locks, so a "shared" whole-file lock is exclusive there
and is taken on a byte far past any data (Windows has no ``os.pread`` either:
``require_positional_io()`` makes a queue operation there fail with a clear
message rather than half-work).
"""
from __future__ import annotations

import errno
import os
import sys
import tempfile
import time

__all__ = ["ENV_DIR", "NATIVE_SHM_DIR", "shm_dir", "flock_shared", "flock_try",
           "lock_range", "unlock_range", "require_positional_io"]

ENV_DIR = "FASTMQ_SHM_DIR"
NATIVE_SHM_DIR = "/dev/shm"


def _default_dir() -> str:
    if os.path.isdir(NATIVE_SHM_DIR):
        return NATIVE_SHM_DIR
    getuid = getattr(os, "getuid", None)
    leaf = f"fastmq-{getuid()}" if getuid is not None else "fastmq"
    return os.path.join(tempfile.gettempdir(), leaf)


def shm_dir() -> str:
    """The directory for the pure backend's files (see module docstring)."""
    chosen = os.environ.get(ENV_DIR, "").strip()
    path = os.path.abspath(chosen) if chosen else _default_dir()
    if path != NATIVE_SHM_DIR and not os.path.isdir(path):
        try:
            os.makedirs(path, 0o700, exist_ok=True)
        except OSError:
            pass                 # creating a segment there reports the error
    return path


def require_positional_io() -> None:
    """Raise a clear OSError where ``os.pread``/``os.pwrite`` are missing."""
    if not hasattr(os, "pread"):
        raise OSError(errno.ENOSYS,
                      f"fastmq's pure backend needs os.pread/os.pwrite, which Python "
                      f"does not have on {sys.platform}; queues are not supported here yet")


if os.name == "posix":
    import fcntl

    def flock_shared(fd: int) -> None:
        """Take a shared whole-file lock, waiting for it."""
        fcntl.flock(fd, fcntl.LOCK_SH)

    def flock_try(fd: int, exclusive: bool) -> None:
        """Take a whole-file lock without waiting; BlockingIOError if held."""
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)

    def flock_exclusive(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def flock_shared_wait(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_SH)

    def funlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def lock_range(fd: int, start: int, length: int) -> None:
        """Take an exclusive byte-range lock, waiting for it (freed when the
        process dies, or when it closes any descriptor of the file)."""
        fcntl.lockf(fd, fcntl.LOCK_EX, length, start)

    def unlock_range(fd: int, start: int, length: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN, length, start)

else:  # Windows
    import msvcrt

    _FLOCK_BYTE = 1 << 62        # far past any data: whole-file lock stand-in

    def _locking(fd: int, start: int, length: int, mode: int) -> None:
        os.lseek(fd, start, os.SEEK_SET)
        msvcrt.locking(fd, mode, length)  # type: ignore[attr-defined]

    def lock_range(fd: int, start: int, length: int) -> None:
        while True:
            try:
                _locking(fd, start, length, msvcrt.LK_NBLCK)  # type: ignore[attr-defined]
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EDEADLK):
                    raise
            time.sleep(0.001)

    def unlock_range(fd: int, start: int, length: int) -> None:
        _locking(fd, start, length, msvcrt.LK_UNLCK)  # type: ignore[attr-defined]

    def flock_shared(fd: int) -> None:
        lock_range(fd, _FLOCK_BYTE, 1)

    flock_exclusive = flock_shared_wait = flock_shared

    def flock_try(fd: int, exclusive: bool) -> None:
        try:
            _locking(fd, _FLOCK_BYTE, 1, msvcrt.LK_NBLCK)  # type: ignore[attr-defined]
        except OSError as exc:
            raise BlockingIOError(errno.EAGAIN, "locked") from exc

    def funlock(fd: int) -> None:
        unlock_range(fd, _FLOCK_BYTE, 1)
