"""Message authentication for queues opened with ``authkey=``.

Anyone who may open a queue's file may write into it, and a reader unpickles
what it reads: a pickle can run any code. ``authkey`` closes that hole for
writers that do not hold the key. Every message written through a handle
with a key carries a keyed MAC (BLAKE2b from ``hashlib``, 16-byte tag), and
a handle with a key checks it before anything is deserialized::

    0   MAGIC   b"\\x00FQA"   (0x00 never starts a pickle, and differs from the
                              out-of-band frame's magic)
    4   tag     blake2b(key=authkey, digest_size=16) of the payload
    20  payload exactly what a queue without a key would carry (a pickle, an
                out-of-band frame, or raw put_bytes bytes)

The tag covers the whole payload, out-of-band buffers included, so it also
pins its length. A message that fails the check is never unpickled: the
reader consumes it, counts it in ``stats()["rejected"]`` and raises
``AuthenticationError``; the messages behind it are untouched.

What it does not do: hide the payload (it is not encryption) or stop replays
of a genuine message by a process that can read and write the queue.

The rejected counter lives in the segment itself, so every handle of every
process sees one number: 8 bytes at ``REJECTED_OFFSET`` of the header page,
which neither backend's layout uses (the native header ends far below it,
and a durable file's flush words stop before its last line; the pure one
keeps it free below its lock byte). Increments take an
open-file-description lock on exactly those 8 bytes -- it does not interact
with either backend's own locks (the native core locks bytes past 2**40, the
pure ring one byte at 4095) -- so concurrent rejections never lose a count.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

from . import _lifetime
from .errors import AuthenticationError, MessageTooLarge

__all__ = ["Auth", "MAGIC", "OVERHEAD", "check_authkey", "count_rejected", "rejected"]

MAGIC = b"\x00FQA"
TAG_SIZE = 16
OVERHEAD = len(MAGIC) + TAG_SIZE
REJECTED_OFFSET = 4080            # inside both backends' 4096-byte header page
_SMALL = 1 << 16                  # below this, one concatenation beats a reservation
_U64 = struct.Struct("<Q")
# The native core's segment files (the pure ring keeps its own count).
from ._pure.portable import NATIVE_SHM_DIR as _SHM_DIR  # noqa: E402


def check_authkey(authkey):
    """``None`` or the key as bytes (any non-empty bytes-like object)."""
    if authkey is None:
        return None
    if isinstance(authkey, str):
        raise TypeError("authkey must be bytes (e.g. os.urandom(32)), not str")
    try:
        key = bytes(memoryview(authkey))
    except TypeError:
        raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}") from None
    if not key:
        raise ValueError("authkey must not be empty")
    return key


def only_in_shared_memory(authkey, url):
    """authkey is implemented for shared-memory queues; elsewhere it is a
    typed error rather than a key silently ignored."""
    if authkey is not None:
        raise ValueError(f"authkey= is supported for shared-memory queues only, not at "
                         f"{_location_label(url)}")


def _location_label(url):
    try:
        from ._location import ENV, mask
        return repr(mask(url)) if url else f"the location in ${ENV}"
    except Exception:
        return "this url"


try:                                  # the same MAC in C, without per-call Python
    from ._core import Mac as _CMac   # overhead (csrc/fmq_mac.c); hashlib otherwise
except ImportError:                   # pragma: no cover - pure-only install
    _CMac = None


def Auth(key: bytes, ring=None):
    """One handle's key: signs what it writes, checks what it reads.

    ``seal(payload)`` -> the whole message (bytes); ``check(message)`` -> the
    payload of a bytes message, or None if it fails; ``tag(*parts)``.
    Given the handle's ``ring``: ``put_sealed(payload, timeout)`` puts a
    payload with its tag, and ``get_checked(timeout)`` takes one message and
    returns its checked payload (bytes), or None (no tag) / False (wrong
    tag) for a message that failed and was consumed (see ``rejected_error``).
    With the extension these are methods of the C ``Mac`` itself: on a
    native ring each is one C call that builds no intermediate message."""
    # BLAKE2b takes keys up to 64 bytes; a longer one is hashed down first
    # (deterministically, so every holder derives the same MAC key).
    mac_key = key if len(key) <= 64 else hashlib.blake2b(key).digest()
    auth = _HashlibAuth(mac_key, ring) if _NativeAuth is None else \
        _NativeAuth(mac_key, MAGIC, ring)
    auth.key = key
    return auth


class _Helpers:
    """What both kinds of ``Auth`` share, over their seal/check/tag/ring."""

    __slots__ = ()

    def open(self, message):
        """``check`` that raises ``AuthenticationError`` (not counted: the
        caller counts what it consumed)."""
        payload = self.check(message)
        if payload is None:
            raise rejection(message)
        return payload

    # ---- writing

    def put(self, ring, payload, timeout):
        """Put ``payload`` with its tag (big payloads: written in place, one copy)."""
        if self.direct and ring is self.ring:
            self.put_sealed(payload, timeout)      # the C path: in place, the MAC without the GIL
            return
        n = memoryview(payload).nbytes
        total = n + OVERHEAD
        if total > ring.max_message_size:
            raise too_large(n, ring)
        if n < _SMALL:
            ring.put(self.seal(payload), timeout)
            return
        reservation = ring.reserve(total, timeout)
        try:
            with memoryview(reservation.view) as view:
                view[OVERHEAD:] = memoryview(payload).cast("B")
                view[:OVERHEAD] = MAGIC + self.tag(payload)
        except BaseException:
            reservation.abort()
            raise
        reservation.commit()

    def sign_in_place(self, view):
        """``view`` holds OVERHEAD free bytes then the payload: write the tag.
        (The writer's own reservation: nobody else can see it yet.)"""
        with memoryview(view) as mv:
            mv[:OVERHEAD] = MAGIC + self.tag(mv[OVERHEAD:])

    # ---- reading

    def verify_view(self, view, local_prefix: int = 0):
        """Check a message that lives in shared memory; returns
        ``(prefix, rest)``: the first ``local_prefix`` payload bytes as a
        private copy -- what the caller parses and unpickles, which a
        co-process therefore cannot change after the check -- and a view of
        the remaining payload bytes (raw data, checked in place).

        On failure it returns ``Rejected(AuthenticationError)`` instead of
        raising it: a traceback would keep this frame, and with it views of
        shared memory, alive in a reference cycle past the handle's close.
        The caller releases the memory first, then raises."""
        if view.nbytes < OVERHEAD or view[:4] != MAGIC:
            return Rejected(rejection(view))
        want = bytes(view[4:OVERHEAD])
        cut = min(OVERHEAD + local_prefix, view.nbytes)
        prefix = bytes(view[OVERHEAD:cut])
        rest = view[cut:]
        if not hmac.compare_digest(self.tag(prefix, rest), want):
            rest.release()
            return Rejected(rejection(view))
        return prefix, rest


class _HashlibAuth(_Helpers):
    """``Auth`` without the extension: hashlib's BLAKE2b, keyed once; each
    message copies the keyed state (cheaper than keying again, which is a
    whole compression-function call)."""

    __slots__ = ("key", "ring", "_proto")
    direct = False                    # put/get go through the ring's own calls

    def __init__(self, mac_key, ring):
        self.ring = ring
        self._proto = hashlib.blake2b(key=mac_key, digest_size=TAG_SIZE)

    def tag(self, *parts) -> bytes:
        h = self._proto.copy()
        for p in parts:
            h.update(p)
        return h.digest()

    def seal(self, payload) -> bytes:
        return MAGIC + self.tag(payload) + bytes(payload)

    def check(self, message):
        if message[:4] == MAGIC and hmac.compare_digest(
                self.tag(memoryview(message)[OVERHEAD:]), message[4:OVERHEAD]):
            return message[OVERHEAD:]
        return None

    def put_sealed(self, payload, timeout):
        if memoryview(payload).nbytes + OVERHEAD > self.ring.max_message_size:
            raise too_large(memoryview(payload).nbytes, self.ring)
        self.ring.put(self.seal(payload), timeout)

    def get_checked(self, timeout):
        message = self.ring.get(timeout)       # a private copy: check, then use
        payload = self.check(message)
        if payload is None:
            return None if len(message) < OVERHEAD or bytes(message[:4]) != MAGIC else False
        return payload if payload.__class__ is bytes else bytes(payload)


if _CMac is not None:
    class _NativeAuth(_CMac, _Helpers):
        """``Auth`` on the C ``Mac`` (seal, check, tag, put_sealed, get_checked)."""

        __slots__ = ("key",)
else:                                 # pragma: no cover - pure-only install
    _NativeAuth = None


class Rejected:
    """What a check that failed returns: ``error`` is the exception to raise."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


def too_large(n, ring):
    # The same words as the C Mac.put_sealed's.
    return MessageTooLarge(f"message of {n} bytes (+{OVERHEAD} bytes of authentication tag) "
                           f"exceeds this queue's max_message_size of "
                           f"{ring.max_message_size} bytes")


def rejected_error(failed):
    """The error for what ``get_checked`` returned instead of a payload."""
    return rejection(b"" if failed is None else MAGIC + bytes(TAG_SIZE))


def rejection(message):
    # Too short to hold a tag is "no tag", whatever its first bytes are.
    what = "has no authentication tag" if (
        memoryview(message).nbytes < OVERHEAD or bytes(message[:4]) != MAGIC) else \
        "has a tag that does not match this handle's authkey"
    return AuthenticationError(
        f"rejected a message that {what} (written by a process without the queue's "
        "authkey, or altered); it was not deserialized, and it was consumed and counted "
        "in stats()['rejected']")


# ------------------------------------------------------ the shared counter

_F_OFD_SETLKW = 38                         # Linux's F_OFD_SETLKW (fcntl may lack the name)
_FLOCK = struct.Struct("hhqqi4x")          # struct flock (Linux, 64-bit off_t)
_counter_lock = _lifetime.ForkSafeLock()   # OFD locks do not exclude threads sharing an fd


def _segment_path(ring):
    """The native segment's file: a durable queue's own, else its /dev/shm one."""
    return getattr(ring, "path", None) or os.path.join(_SHM_DIR, ring.name)


def count_rejected(ring, n=1):
    """Add ``n`` to the queue's shared rejected count (best effort: a queue
    whose file is gone keeps no count)."""
    if hasattr(ring, "count_rejected"):              # the pure ring keeps it itself
        ring.count_rejected(n)
        return
    import fcntl                                      # native backend: Linux only
    try:
        fd = os.open(_segment_path(ring), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        with _counter_lock:
            fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET,
                                                      REJECTED_OFFSET, 8, 0))
            try:
                raw = os.pread(fd, 8, REJECTED_OFFSET)
                if len(raw) == 8:
                    os.pwrite(fd, _U64.pack(_U64.unpack(raw)[0] + n), REJECTED_OFFSET)
            finally:
                fcntl.fcntl(fd, _F_OFD_SETLKW, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET,
                                                          REJECTED_OFFSET, 8, 0))
    finally:
        os.close(fd)


def rejected(ring) -> int:
    """The queue's shared count of messages that failed authentication."""
    if hasattr(ring, "rejected"):
        return ring.rejected()
    try:
        fd = os.open(_segment_path(ring), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        raw = os.pread(fd, 8, REJECTED_OFFSET)
    finally:
        os.close(fd)
    return _U64.unpack(raw)[0] if len(raw) == 8 else 0
