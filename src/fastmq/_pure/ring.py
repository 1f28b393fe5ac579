"""fastmq's pure-Python ring: the ``_ring_protocol`` contract without C.

Design (exactness over speed)
-----------------------------
One file per segment under /dev/shm::

    [0, 4096)        header page: geometry (written once by the creator, magic
                     last), then the live state line, then the participant table
    [4096, ...)      data area: a byte ring of records
                     ``u32 length | u32 deliveries | payload``; a record may wrap
                     around the end of the area. ``deliveries`` counts earlier
                     deliveries of a redelivered message (leases)
    [..., end)       the in-flight table and payload areas of leased messages
                     (at-least-once delivery: see ``leases.py``)

Mutual exclusion is two locks, always taken in this order:

1. the process-wide ``_lifetime.inode_lock`` of the file -- POSIX record locks
   do not exclude threads of one process, and closing *any* descriptor of the
   file drops the process's record locks, so fd closes take this lock too;
2. ``lockf(LOCK_EX)`` on one byte of the file -- excludes other processes, and
   the kernel releases it when its holder dies (even ``kill -9``).

Why ``pread``/``pwrite`` rather than ``mmap``: a store through a mapping of a
tmpfs file that ran out of space, or that someone truncated, is a SIGBUS that
kills the interpreter; the same failure through ``pwrite``/``pread`` is an
``OSError`` or a short read we turn into ``CorruptQueue``. It also means no
buffer of ours is ever exported, so ``close()`` can always unmap nothing.

Crash safety: a message's bytes are written first and the state line (head,
tail, count, epoch, counters: one 64-byte, page-internal ``pwrite`` that a
signal cannot tear) is written last. A producer killed mid-write leaves the
tail where it was, so its half-message is never seen; a consumer killed before
it writes the new head leaves the message in the queue (it was not handed over
yet). The lock dies with its holder, so nobody is wedged.

Blocking: try under the locks; if the queue is full/empty, poll the state's
``epoch`` (bumped by every change) with exponential backoff sleeps from 50 us
to 5 ms, so an idle waiter costs ~0% CPU, signals run between sleeps, and a
concurrent ``close()`` is noticed within milliseconds.

Memory follows use: the file is sparse (``ftruncate`` to the whole layout);
the byte range a record needs is reserved with ``posix_fallocate`` before it
is written (``ENOSPC`` means "no room": the put waits like on a full ring, or
raises ``Full`` naming /dev/shm). When the ring drains to empty its
positions restart at 0, so the data area in use is always a prefix; the
part of it past the recent demand -- the furthest the ring reached in the
current and the previous window of ``_DEMAND_WINDOW`` seconds (the memory
line at ``MEM_OFFSET``) -- is punched (``FALLOC_FL_PUNCH_HOLE``). A ring that
cycles a working set keeps it; a drained ring idle for two windows keeps
nothing, given back at a drain, when a consumer finds it empty, or when
another queue of the same process does (one sweep per window). No warm
memory is kept while /dev/shm has less than an eighth free, and a put that
finds /dev/shm full first makes the process's other drained queues give
theirs back. ``pread`` of a hole allocates nothing.

Zero-copy is emulated: ``Reservation.view`` is a bytearray copied in at
commit, ``ReceivedView.view`` a read-only view of bytes copied out at receive
time.

At-least-once delivery is composed, not mixed in: each handle owns an
``InFlightTable`` (``leases.py``) that reaches the ring only through the
table port below (``locked``, ``wait_for``, ``register_consumer``,
``append_locked``, ``peek_locked``, ``write_state``, ``commit_with``,
``write_bytes``), and ``Ring.consumer()`` makes the per-handle ``Consumer``
(``consumer.py``) that settles messages through that table.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import time
import weakref

from .. import _contract, _lifetime, _names
from . import consumer, errors, leases, portable
from .message import LeasedMessage
from .procs import alive as _alive, start_time as _start_time
from ..errors import CorruptQueue, MessageTooLarge, QueueExists, QueueNotFound

__all__ = ["Ring", "Reservation", "ReceivedView", "Consumer", "LeasedMessage",
           "list_segments", "backend_name", "MAX_MESSAGE_SIZE", "MAGIC", "VERSION"]

backend_name = "pure"
Consumer = consumer.Consumer

# -------------------------------------------------------------------- layout

MAGIC = b"FMQPURE\x01"          # the native core uses a different magic
VERSION = 2                     # 2: deliveries in records, in-flight table
HEADER_SIZE = 4096
DATA_OFFSET = HEADER_SIZE
RECORD_HEADER = struct.Struct("<II")  # payload length, earlier deliveries
MAX_MAXSIZE = 1 << 24
MAX_MESSAGE_SIZE = _contract.MAX_MESSAGE_SIZE   # a record length is a u32
MAX_CAPACITY = 1 << 40
FLAG_ANONYMOUS = 1

# magic, version, header_size, maxsize, max_message_size, capacity_bytes,
# data_offset, file_size, flags, max_deliveries, dead_letter (utf-8, padded)
GEOMETRY = struct.Struct("<8sIIQQQQQQQ256s")
GEOMETRY_OFFSET = 0
# head, tail, count, epoch, enqueued, dequeued, redelivered, dead_lettered
# -- one 64-byte line, followed at 576 by the lease state line (leases.py)
STATE = struct.Struct("<8Q")
STATE_OFFSET = 512
EPOCH_OFFSET = STATE_OFFSET + 3 * 8
COUNT_OFFSET = STATE_OFFSET + 2 * 8
# memory policy, under the lock (see "Memory follows use"): the furthest data
# offset reached in this window and the one before, the window's start
# (CLOCK_MONOTONIC ns), and how far from 0 the data area may hold pages
MEM = struct.Struct("<4Q")
MEM_OFFSET = 640
# participants: pid, process start time (clock ticks), roles bitmask
PARTICIPANT = struct.Struct("<IIQ")
PARTICIPANTS_OFFSET = 1024
MAX_PARTICIPANTS = 128
ROLE_PRODUCER, ROLE_CONSUMER = 1, 2
LOCK_BYTE = HEADER_SIZE - 1           # record-locked byte (advisory; never read)
REJECTED_OFFSET = HEADER_SIZE - 16    # u64: messages that failed authentication
ABANDONED_OFFSET = REJECTED_OFFSET - 8  # u64: damaged records skipped (under the lock)

assert GEOMETRY_OFFSET + GEOMETRY.size <= STATE_OFFSET
assert STATE_OFFSET + STATE.size == leases.LEASE_STATE_OFFSET
assert leases.LEASE_STATE_OFFSET + leases.LEASE_STATE.size <= MEM_OFFSET
assert MEM_OFFSET + MEM.size <= PARTICIPANTS_OFFSET
assert PARTICIPANTS_OFFSET + MAX_PARTICIPANTS * PARTICIPANT.size <= ABANDONED_OFFSET
assert REJECTED_OFFSET + 8 <= LOCK_BYTE
assert STATE_OFFSET % 64 == 0 and STATE.size == 64   # never crosses a page

# ------------------------------------------------------------ memory

_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_PAGE = 4096


def _load_fallocate():
    try:
        # The process's own symbols (libc on Linux): no library search, which
        # would run ldconfig at import.
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def _punch(fd, offset, length):
    """Give the pages of [offset, offset + length) back (whole pages only)."""
    start = -(-offset // _PAGE) * _PAGE
    end = (offset + length) // _PAGE * _PAGE
    if _fallocate is not None and end > start:
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start)


def _reserve(fd, offset, length):
    """Reserve [offset, offset + length) before writing it: False if the
    filesystem has no room (nothing was written)."""
    if length <= 0:
        return True
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno in (28, 12, 27):        # ENOSPC, ENOMEM, EFBIG
            return False
        if exc.errno not in (95, 22):        # EOPNOTSUPP/EINVAL: not reservable
            raise
    return True


_DEMAND_WINDOW = 1.0      # s: warm memory follows the reach of the last 1-2 of these
_ROOM_CHECK = 0.01        # s: statvfs of /dev/shm at most this often per handle
_IDLE_CHECK = 0.1         # s: a consumer finding the ring empty trims at most this often
_open_rings = weakref.WeakSet()     # this process's rings (the per-window sweep)
_next_sweep = 0.0


def _sweep(me, shed=False):
    """Trim this process's other rings: once a window, or at once (and to
    nothing: ``shed``) when /dev/shm is full."""
    global _next_sweep
    now = time.monotonic()
    if not shed:
        if now < _next_sweep:
            return 0
        _next_sweep = now + _DEMAND_WINDOW
    freed = 0
    for ring in list(_open_rings):
        if ring is not me and not ring.closed:
            try:
                freed += ring._trim(shed)
            except Exception:       # closed meanwhile, or broken: its own calls say so
                pass
    return freed


# ------------------------------------------------------------------- waiting

_FIRST_SLEEP = 50e-6
_MAX_SLEEP = 5e-3
_AGAIN = object()       # "would block" marker returned by attempt functions
_NO_ROOM_RETRY = 0.05   # a put that found /dev/shm full tries again this often
_LEASE_SWEEP = 0.25     # s: how often a waiting consumer looks for dead leases


def _deadline(timeout):
    """None (forever) or an absolute monotonic time; like the native ring,
    inf and timeouts of 1e10 s or more wait forever and NaN is refused."""
    if timeout is None or timeout >= 1e10:
        return None
    if timeout != timeout:
        raise ValueError("'timeout' must be a number of seconds or None, not NaN")
    return time.monotonic() + timeout


def _remaining(deadline):
    return None if deadline is None else deadline - time.monotonic()


# ------------------------------------------------------------- the handle

class _Handle:
    """The per-handle OS resources, kept apart from ``Ring`` so that a
    ``weakref.finalize`` can close them without keeping the Ring alive."""

    __slots__ = ("path", "fd", "lock", "anonymous", "closed", "__weakref__")

    def __init__(self, path, fd, lock, anonymous):
        self.path, self.fd, self.lock, self.anonymous = path, fd, lock, anonymous
        self.closed = False

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
            fd, self.fd = self.fd, -1
            if self.anonymous:
                _lifetime.detach(self.path, fd, self.lock)
            else:
                _lifetime.guarded_close(fd, self.lock)


def _validate_geometry(maxsize, max_message_size, capacity_bytes):
    for label, value, low, high in (("maxsize", maxsize, 1, MAX_MAXSIZE),
                                    ("max_message_size", max_message_size, 1, MAX_MESSAGE_SIZE),
                                    ("capacity_bytes", capacity_bytes, 1, MAX_CAPACITY)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{label} must be an int, not {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{label} must be in [{low}, {high}], got {value}")
    if capacity_bytes < max_message_size:
        raise ValueError(f"capacity_bytes ({capacity_bytes}) must be at least "
                         f"max_message_size ({max_message_size})")


def _check_mode(mode):
    """A segment's file mode: permission bits only (no setuid/setgid/sticky)."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"mode must be an int, not {type(mode).__name__}")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode must be permission bits only (0 to 0o777), got "
                         f"{oct(mode) if mode >= 0 else mode}")


def _as_bytes_view(data) -> memoryview:
    """A flat byte view of any C-contiguous buffer (TypeError otherwise)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError("a bytes-like object is required, not "
                        f"{type(data).__name__!r}") from None
    if not view.c_contiguous:
        raise BufferError("message buffer must be C-contiguous")
    return view.cast("B") if (view.format != "B" or view.ndim != 1) else view


class Ring:
    """A queue segment opened by this process (see module docstring)."""

    # ---------------------------------------------------------- lifecycle

    def __init__(self, name, handle, geometry):
        (_, _, _, self.maxsize, self.max_message_size, self.capacity_bytes,
         _, self._file_size, flags, self.max_deliveries, dead_letter) = geometry
        self.name = name
        self.anonymous = bool(flags & FLAG_ANONYMOUS)
        self.dead_letter = dead_letter.rstrip(b"\0").decode("utf-8", "replace")
        self._area = self.capacity_bytes + RECORD_HEADER.size
        self._reach_seen = 0               # the window reach we last wrote or read
        self._mem_seen = [0, 0, 0, 0]      # the memory line as we last saw it
        self._reach_due = 0.0              # ... and when to look at it again
        self._room = (0.0, True)           # (checked at, /dev/shm has room)
        self._next_idle = 0.0
        self._no_room = 0.0                # monotonic time of the last ENOSPC
        self._shm_blocked = False          # the last put attempt found no room
        self.in_flight_table = leases.InFlightTable(
            self, DATA_OFFSET + self._area, int.from_bytes(os.urandom(4), "little") or 1)
        self._h = handle
        self._registered = {}          # pid -> roles already registered
        self._finalizer = weakref.finalize(self, handle.close)
        _open_rings.add(self)

    @property
    def closed(self) -> bool:
        return self._h.closed

    @classmethod
    def create(cls, name, *, maxsize, max_message_size, capacity_bytes,
               mode=0o600, exist_ok=False, anonymous=False, max_deliveries=20,
               dead_letter=""):
        _names.validate_segment(name)
        _check_mode(mode)
        _validate_geometry(maxsize, max_message_size, capacity_bytes)
        dead = (dead_letter or "").encode("utf-8")
        if len(dead) > 255:
            raise ValueError("dead_letter name is too long")
        portable.require_positional_io()
        path = _lifetime.segment_path(name)
        if os.path.lexists(path):           # early answer; the link decides
            if exist_ok:
                return cls.open(name)
            raise QueueExists(f"segment {name!r} already exists in /dev/shm")
        # The data area carries a record header per message on top of the
        # payloads, so a message of max_message_size always fits an empty ring.
        area = capacity_bytes + RECORD_HEADER.size
        file_size = leases.layout(DATA_OFFSET + area, maxsize, capacity_bytes)[2]
        # Initialized under a temporary name, then linked into place (see
        # _lifetime): nobody ever opens a half-made segment, and a creator
        # killed half-way leaves only a temporary file for cleanup().
        tmp, fd = _lifetime.create_temp(mode)
        lock = None
        linked = False
        try:
            lock = _lifetime.inode_lock(fd)
            os.fchmod(fd, mode)                     # exact mode, whatever the umask
            os.ftruncate(fd, file_size)
            geometry = (b"\0" * 8, VERSION, HEADER_SIZE, maxsize, max_message_size,
                        capacity_bytes, DATA_OFFSET, file_size,
                        FLAG_ANONYMOUS if anonymous else 0, max_deliveries, dead)
            os.pwrite(fd, GEOMETRY.pack(*geometry), GEOMETRY_OFFSET)
            os.pwrite(fd, STATE.pack(*[0] * 8) + leases.LEASE_STATE.pack(*[0] * 8),
                      STATE_OFFSET)
            os.pwrite(fd, MAGIC, GEOMETRY_OFFSET)   # last: the segment is valid now
            # An anonymous segment is held (LOCK_SH) before its name is
            # visible, since cleanup() may probe it at once; a named one
            # uses no flock.
            if anonymous:
                portable.flock_shared(fd)
            else:
                portable.funlock(fd)
            try:
                os.link(tmp, path)
                linked = True
            except FileExistsError:
                pass
        except BaseException:
            _lifetime.guarded_close(fd, lock)
            raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if not linked:                              # another creator won the name
            _lifetime.guarded_close(fd, lock)
            if exist_ok:
                return cls.open(name)
            raise QueueExists(f"segment {name!r} already exists in /dev/shm")
        handle = _Handle(path, fd, lock, anonymous)
        return cls(name, handle, (MAGIC,) + geometry[1:])

    @classmethod
    def open(cls, name):
        portable.require_positional_io()
        _names.validate_segment(name)
        path = _lifetime.segment_path(name)
        try:
            # O_NONBLOCK: a FIFO planted under the name must not hang us.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise QueueNotFound(f"no segment {name!r} in /dev/shm") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:    # a symlink planted under our name
                raise CorruptQueue(f"segment {name!r} is a symlink, not a queue") from None
            raise
        lock = None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptQueue(f"segment {name!r} is not a regular file")
            lock = _lifetime.inode_lock(fd)
            geometry = _read_geometry(fd, name)
            anonymous = bool(geometry[8] & FLAG_ANONYMOUS)
            if anonymous and not _lifetime.attach(path, fd):
                raise QueueNotFound(f"segment {name!r} is being removed (its last "
                                    "user closed it)")
        except BaseException:
            _lifetime.guarded_close(fd, lock)
            raise
        return cls(name, _Handle(path, fd, lock, anonymous), geometry)

    @staticmethod
    def unlink(name):
        _names.validate_segment(name)
        try:
            os.unlink(_lifetime.segment_path(name))
        except FileNotFoundError:
            raise QueueNotFound(f"no segment {name!r} in /dev/shm") from None

    def close(self):
        try:
            self.in_flight_table.release_handle_leases()   # a departed holder's come back
        except Exception:
            pass                             # they come back on expiry instead
        self._finalizer()

    def __repr__(self):
        state = "closed" if self.closed else f"maxsize={self.maxsize}"
        return f"<fastmq._pure.ring.Ring {self.name!r} {state}>"

    # ------------------------------------------------------- locked access

    def _fd(self):
        if self._h.closed:
            errors.closed()
        return self._h.fd

    def _locked(self, fn, *args):
        """Run ``fn(fd, state, *args)`` under both locks (see module doc)."""
        with self._h.lock:
            fd = self._fd()
            try:
                # Inside the try: a KeyboardInterrupt right after the lock is
                # granted must not leave it held. Unlocking a byte we do not
                # hold is a harmless no-op, and no other thread of this
                # process can hold it (we hold the process-wide lock).
                portable.lock_range(fd, LOCK_BYTE, 1)
                return fn(fd, self._read_state(fd), *args)
            finally:
                portable.unlock_range(fd, LOCK_BYTE, 1)

    def _read_state(self, fd):
        raw = os.pread(fd, STATE.size, STATE_OFFSET)
        if len(raw) != STATE.size:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        state = list(STATE.unpack(raw))
        head, tail, count = state[0], state[1], state[2]
        if not (head <= tail and tail - head <= self._area and count <= self.maxsize
                and (count == 0) == (head == tail)):
            raise CorruptQueue(f"segment {self.name!r} has an inconsistent state "
                               f"(head={head}, tail={tail}, count={count})")
        return state

    @staticmethod
    def _write_state(fd, state):
        state[3] += 1                    # epoch: wakes pollers
        os.pwrite(fd, STATE.pack(*state), STATE_OFFSET)

    def _read_u64(self, offset):
        with self._h.lock:
            raw = os.pread(self._fd(), 8, offset)
        if len(raw) != 8:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        return struct.unpack("<Q", raw)[0]

    # -------------------------------------------------- ring byte access

    def _write_at(self, fd, pos, view):
        """Write ``view`` at ring position ``pos``, wrapping at the end."""
        off = pos % self._area
        first = min(len(view), self._area - off)
        self._pwrite_all(fd, view[:first], DATA_OFFSET + off)
        if first < len(view):
            self._pwrite_all(fd, view[first:], DATA_OFFSET)

    @staticmethod
    def _pwrite_all(fd, view, offset):
        while len(view):
            try:
                n = os.pwrite(fd, view, offset)
            except OSError as exc:
                if exc.errno == 28:   # ENOSPC: tmpfs full; nothing was published
                    raise OSError(28, "no space left in /dev/shm for this message "
                                  "(enlarge /dev/shm or use smaller queues)") from None
                raise
            view, offset = view[n:], offset + n

    def _read_at(self, fd, pos, n) -> bytes:
        off = pos % self._area
        first = min(n, self._area - off)
        data = os.pread(fd, first, DATA_OFFSET + off)
        if first < n:
            data += os.pread(fd, n - first, DATA_OFFSET)
        if len(data) != n:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        return data

    def _fits(self, state, nbytes):
        used = state[1] - state[0]
        return state[2] < self.maxsize and self._area - used >= RECORD_HEADER.size + nbytes

    # ------------------------------------------------ locked operations

    def _reserve_at(self, fd, pos, n):
        """Reserve the data-area bytes [pos, pos + n) (wrapping)."""
        off = pos % self._area
        first = min(n, self._area - off)
        ok = _reserve(fd, DATA_OFFSET + off, first) and \
            (first == n or _reserve(fd, DATA_OFFSET, n - first))
        if not ok:
            self._no_room = time.monotonic()
            self._shm_blocked = True
        return ok

    def _put_locked(self, fd, state, views, deliveries=0):
        """Append as many of ``views`` as fit; return how many."""
        self._shm_blocked = False
        done = 0
        for view in views:
            if not self._fits(state, len(view)) or \
                    not self._reserve_at(fd, state[1], RECORD_HEADER.size + len(view)):
                break
            self._write_at(fd, state[1], RECORD_HEADER.pack(len(view), deliveries))
            self._write_at(fd, state[1] + RECORD_HEADER.size, view)
            state[1] += RECORD_HEADER.size + len(view)
            state[2] += 1
            state[4] += 1
            done += 1
        if done:
            self._write_state(fd, state)     # publish: after all bytes are in
            reach = min(state[1], self._area)
            now = time.monotonic()
            if reach > self._reach_seen or now >= self._reach_due:
                self._note_reach(fd, reach, now)
        return done

    # ----------------------------------------------------- memory policy

    def _read_mem(self, fd):
        raw = os.pread(fd, MEM.size, MEM_OFFSET)
        if len(raw) != MEM.size:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        reach, before, since, held = MEM.unpack(raw)
        # a hint: clamped, a scribbled value only changes what stays warm
        return [min(reach, self._area), min(before, self._area), since,
                min(held, self._area)]

    @staticmethod
    def _rotate(mem, now_ns, reach):
        """Start a new window if this one is over; ``reach``: what is in use
        now. A window that ended two or more windows ago says nothing about
        now (the ring was idle since). A start in the future is over."""
        since = mem[2]
        if now_ns - since >= _DEMAND_WINDOW * 1e9 or since > now_ns:
            mem[1] = mem[0] if 0 <= now_ns - since < 2 * _DEMAND_WINDOW * 1e9 else 0
            mem[0], mem[2] = reach, now_ns
        mem[0], mem[3] = max(mem[0], reach), max(mem[3], reach)

    def _note_reach(self, fd, reach, now):
        """The ring reached ``reach`` bytes into its data area (locked)."""
        mem = self._read_mem(fd)
        before = list(mem)
        self._rotate(mem, time.monotonic_ns(), reach)
        if mem != before:
            os.pwrite(fd, MEM.pack(*mem), MEM_OFFSET)
        self._reach_seen, self._mem_seen = mem[0], mem
        self._reach_due = now + _DEMAND_WINDOW / 4

    def _roomy(self):
        """Whether /dev/shm has room to keep drained memory warm (an eighth free)."""
        now = time.monotonic()
        at, roomy = self._room
        if now - at >= _ROOM_CHECK:
            try:
                st = os.statvfs(_lifetime.SHM_DIR)
                roomy = st.f_blocks == 0 or st.f_bavail >= st.f_blocks // 8
            except OSError:
                roomy = True
            self._room = (now, roomy)
        return roomy and now - self._no_room >= _NO_ROOM_RETRY

    def _give_back(self, fd, reached, shed=False):
        """The ring is empty (locked): punch what lies past the recent demand.
        ``reached``: how far the cycle that just drained went."""
        now = time.monotonic()
        seen = self._mem_seen
        if not shed and now < self._reach_due and reached <= seen[0] and \
                seen[3] <= max(seen[0], seen[1]) and self._roomy():
            return 0        # nothing past the demand a moment ago: skip the read
        mem = self._read_mem(fd)
        before = list(mem)
        # the cycle that just drained was demand a moment ago: it counts in
        # the current window (nothing is in use now)
        self._rotate(mem, time.monotonic_ns(), reached)
        limit = 0 if shed or not self._roomy() else max(mem[0], mem[1])
        high = mem[3]
        if high > limit:
            mem[3] = limit
        if mem != before:
            os.pwrite(fd, MEM.pack(*mem), MEM_OFFSET)
        self._reach_seen, self._reach_due = mem[0], now + _DEMAND_WINDOW / 4
        self._mem_seen = list(mem)
        if high > limit or shed:
            # After the record that forgets them: a kill in between only
            # leaks pages that the next trim punches again (a shed punches
            # the whole area past the limit, whatever the record says).
            end = self._area if shed else high
            _punch(fd, DATA_OFFSET + limit, end - limit)
            return max(high - limit, 0)
        return 0

    def _trim(self, shed=False):
        """Give back what an empty ring holds past its recent demand."""
        def trim(fd, state):
            return self._give_back(fd, 0, shed) if state[2] == 0 else 0
        return self._locked(trim)

    def _idle(self):
        """A consumer found the ring empty: trim it (at most every 0.1 s per
        handle), and once a window the process's other rings."""
        now = time.monotonic()
        if now >= self._next_idle:
            self._next_idle = now + _IDLE_CHECK
            self._trim()
            _sweep(self)

    def _read_records(self, fd, state, max_messages):
        """Up to ``max_messages`` records from the head, without consuming
        them: ``(payload, deliveries, head after it)`` each."""
        out = []
        head = state[0]
        while len(out) < state[2] and len(out) < max_messages:
            length, deliveries = RECORD_HEADER.unpack(
                self._read_at(fd, head, RECORD_HEADER.size))
            if length > self.max_message_size or \
                    RECORD_HEADER.size + length > state[1] - head:
                if out:
                    break                # the good ones first; the next read meets it
                self._abandon(fd, state)
                raise CorruptQueue(f"segment {self.name!r} held a record of impossible "
                                   f"length {length}: it was skipped (counted in "
                                   f"stats()['abandoned']) and the queue goes on")
            payload = self._read_at(fd, head + RECORD_HEADER.size, length)
            head += RECORD_HEADER.size + length
            out.append((payload, deliveries, head))
        return out

    def _abandon(self, fd, state):
        """The record at the head has an impossible length: consume it
        without delivering it, count it in ``abandoned``, publish.

        A record's length is the only thing that says where the next one
        starts, so the next one is looked for: the first position past the
        head from which the remaining ``count - 1`` records chain, each of a
        possible length, exactly to the tail. The damaged record's true
        length was at most ``max_message_size``, so only that many positions
        are tried, and the true boundary is among them. (The search starts
        right past the head, not past a whole header: after an earlier
        length that was wrong but possible, the head itself may be off a
        boundary.) A payload that itself contains such a chain could be
        taken for records: like a scribbled length in the native ring,
        damage inside the data area is a writer's power (README "Security").
        If no position chains, nothing after the head can be delimited:
        every remaining record is abandoned and the ring restarts empty."""
        head, tail, count = state[0], state[1], state[2]
        rest = count - 1
        start = head + 1
        nxt, skipped = tail, count
        if rest > 0:
            last = min(tail - RECORD_HEADER.size,
                       head + RECORD_HEADER.size + self.max_message_size)
            window = self._read_at(fd, start, last - start + RECORD_HEADER.size) \
                if last >= start else b""
            for cand in range(start, last + 1):
                (length,) = struct.unpack_from("<I", window, cand - start)
                if length > self.max_message_size or \
                        cand + RECORD_HEADER.size + length > tail:
                    continue
                if self._chains_to(fd, cand, tail, rest):
                    nxt, skipped = cand, 1
                    break
        state[0] = nxt
        state[2] -= skipped                  # not dequeued: abandoned (as the native ring)
        if state[2] == 0:
            state[0] = state[1] = 0
        self._add_abandoned(fd, skipped)
        self._write_state(fd, state)

    def _chains_to(self, fd, pos, tail, n):
        """Do exactly ``n`` records of possible lengths start at ``pos`` and
        end at ``tail``?"""
        for _ in range(n):
            if tail - pos < RECORD_HEADER.size:
                return False
            length, _ = RECORD_HEADER.unpack(self._read_at(fd, pos, RECORD_HEADER.size))
            if length > self.max_message_size or pos + RECORD_HEADER.size + length > tail:
                return False
            pos += RECORD_HEADER.size + length
        return pos == tail

    def _add_abandoned(self, fd, n):
        raw = os.pread(fd, 8, ABANDONED_OFFSET)
        old = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        os.pwrite(fd, struct.pack("<Q", old + n), ABANDONED_OFFSET)

    def _consume(self, fd, state, records):
        """Hand the first ``len(records)`` messages over: one state write."""
        state[0] = records[-1][2]
        state[2] -= len(records)
        state[5] += len(records)
        high = None
        if state[2] == 0:                    # keep positions small and tidy
            high = min(state[1], self._area)
            state[0] = state[1] = 0
        self._write_state(fd, state)         # hand-over happens here
        if high is not None:
            # Drained: give back what lies past the recent demand. After the
            # state write, so a kill in between only leaks pages that the
            # next drain punches again.
            self._give_back(fd, high)

    def _get_locked(self, fd, state, max_messages, decode=None):
        records = self._read_records(fd, state, max_messages)
        if not records:
            return []
        if decode is None:
            out = [r[0] for r in records]
        else:
            out = []
            for payload, _, _ in records:
                try:
                    out.append(decode(payload))
                except Exception:
                    # Return what decoded; the bad one and the rest stay
                    # queued in place. If the bad one comes first, it is
                    # consumed and its error propagates. (Any other
                    # BaseException: nothing was consumed.)
                    if out:
                        break
                    self._consume(fd, state, records[:1])
                    raise
        self._consume(fd, state, records[:len(out)])
        return out

    # ----------------------------------------------------------- waiting

    def _wait(self, attempt, timeout):
        """Call ``attempt()`` until it returns something other than _AGAIN,
        sleeping between tries; returns _AGAIN once ``timeout`` has passed."""
        deadline = _deadline(timeout)
        delay = _FIRST_SLEEP
        while True:
            epoch = self._read_u64(EPOCH_OFFSET)
            result = attempt()
            if result is _AGAIN and self._shm_blocked and _sweep(self, shed=True):
                # /dev/shm was full: this process's drained queues gave their
                # warm memory back (no lock of ours is held here); once more
                result = attempt()
            if result is not _AGAIN or timeout == 0:
                return result
            tried = time.monotonic()
            while True:
                left = _remaining(deadline)
                if left is not None and left <= 0:
                    return _AGAIN
                time.sleep(delay if left is None else min(delay, left))
                delay = min(delay * 2, _MAX_SLEEP)
                if self._read_u64(EPOCH_OFFSET) != epoch:
                    delay = _FIRST_SLEEP
                    break
                if self._shm_blocked and time.monotonic() - tried >= _NO_ROOM_RETRY:
                    break       # /dev/shm was full: room may come from anywhere

    def wait(self, for_space, timeout, need=0):
        """Sleep until a message looks ready to take (for_space False), or
        room for a ``need``-byte message, at most ``timeout`` seconds: True if
        so, else False. Takes nothing (the asyncio waiter threads' wait)."""
        if for_space:
            def ready(fd, state):
                return self._fits(state, need) or _AGAIN
        else:
            def ready(fd, state):
                return state[2] > 0 or _AGAIN
        return self._wait(lambda: self._locked(ready), timeout) is not _AGAIN

    # ------------------------------------------------ the in-flight table port
    #
    # What the in-flight table (leases.py) may use of the ring, and nothing
    # else: run under the locks, wait, register, append and peek records,
    # publish the state line (alone, or with the lease state line after it in
    # the same pwrite), write bytes.

    AGAIN = _AGAIN

    def locked(self, fn, *args):
        return self._locked(fn, *args)

    def wait_for(self, attempt, timeout):
        return self._wait(attempt, timeout)

    def register_consumer(self):
        self._register(ROLE_CONSUMER)

    def append_locked(self, fd, state, views, deliveries):
        return self._put_locked(fd, state, views, deliveries)

    def peek_locked(self, fd, state, max_messages):
        return self._read_records(fd, state, max_messages)

    def write_state(self, fd, state):
        self._write_state(fd, state)

    @staticmethod
    def commit_with(fd, state, tail):
        """The state line and ``tail`` (the lease state line right after it)
        in one page-internal pwrite."""
        state[3] += 1                    # epoch: wakes pollers
        os.pwrite(fd, STATE.pack(*state) + tail, STATE_OFFSET)

    def write_bytes(self, fd, view, offset):
        self._pwrite_all(fd, view, offset)

    # ----------------------------------------------------- at-least-once

    def consumer(self, owner, message_class):
        """A new Consumer on this handle (see consumer.py)."""
        return consumer.Consumer(self, owner, message_class)

    def pending(self):
        return self.in_flight_table.pending()

    def redeliver_due(self):
        return self.in_flight_table.redeliver_due()

    # ------------------------------------------------------ participants

    def _register(self, role):
        pid = os.getpid()
        if self._registered.get(pid, 0) & role:
            return
        self._locked(self._register_locked, pid, role)
        self._registered[pid] = self._registered.get(pid, 0) | role

    def _register_locked(self, fd, state, pid, role):
        table = os.pread(fd, MAX_PARTICIPANTS * PARTICIPANT.size, PARTICIPANTS_OFFSET)
        start = _start_time(pid)
        free = None
        for i in range(MAX_PARTICIPANTS):
            epid, estart, roles = PARTICIPANT.unpack_from(table, i * PARTICIPANT.size)
            if epid == pid and estart == start:
                free, role = i, role | roles
                break
            if free is None and (epid == 0 or not _alive(epid, estart)):
                free = i
        if free is not None:        # a full table only makes stats approximate
            os.pwrite(fd, PARTICIPANT.pack(pid, start, role),
                      PARTICIPANTS_OFFSET + free * PARTICIPANT.size)

    def _participants(self, fd):
        table = os.pread(fd, MAX_PARTICIPANTS * PARTICIPANT.size, PARTICIPANTS_OFFSET)
        producers = consumers = 0
        for i in range(MAX_PARTICIPANTS):
            pid, start, roles = PARTICIPANT.unpack_from(table, i * PARTICIPANT.size)
            if pid and _alive(pid, start):
                producers += bool(roles & ROLE_PRODUCER)
                consumers += bool(roles & ROLE_CONSUMER)
        return producers, consumers

    # ------------------------------------------------------ the protocol

    def _check_size(self, nbytes):
        if nbytes > self.max_message_size:
            raise MessageTooLarge(f"message of {nbytes} bytes exceeds this queue's "
                                  f"max_message_size of {self.max_message_size} bytes")

    def put(self, data, timeout):
        view = _as_bytes_view(data)
        self._check_size(len(view))
        self._register(ROLE_PRODUCER)
        done = self._wait(lambda: self._locked(self._put_locked, (view,)) or _AGAIN,
                          timeout)
        if done is _AGAIN:
            errors.full(self._full_reason(len(view)))

    def put_many(self, items, timeout, atomic=False):
        views = [_as_bytes_view(item) for item in items]
        for view in views:
            self._check_size(len(view))
        if not views:
            return 0
        if atomic:
            return self._put_batch(views, timeout)
        self._register(ROLE_PRODUCER)
        sent = 0

        def attempt():
            nonlocal sent
            sent += self._locked(self._put_locked, views[sent:])
            return sent if sent == len(views) else _AGAIN

        self._wait(attempt, timeout)
        return sent

    def _put_batch(self, views, timeout):
        """An atomic batch: its records are written after the tail and
        published by the one state write that publishes any put, so a process
        killed anywhere leaves all of them queued or none. Refused before
        anything is written if it can never fit; otherwise waits for room for
        all of it (Full at the deadline)."""
        n = len(views)
        nbytes = sum(RECORD_HEADER.size + len(v) for v in views)
        if n > self.maxsize:
            raise ValueError(f"an atomic batch of {n} messages can never fit in this queue "
                             f"(maxsize {self.maxsize}); split it or create the queue with a "
                             "larger maxsize")
        if nbytes > self._area:
            raise MessageTooLarge(f"an atomic batch of {n} messages takes {nbytes} bytes, more "
                                  f"than this queue can ever hold (capacity_bytes="
                                  f"{self.capacity_bytes}); send a smaller batch")
        self._register(ROLE_PRODUCER)

        def attempt():
            return self._locked(self._put_batch_locked, views, nbytes) or _AGAIN

        if self._wait(attempt, timeout) is _AGAIN:
            errors.full(f"queue {self.name!r}: no room for the atomic batch of {n} messages "
                        "in time")
        return n

    def _put_batch_locked(self, fd, state, views, nbytes):
        self._shm_blocked = False
        if state[2] + len(views) > self.maxsize or self._area - (state[1] - state[0]) < nbytes:
            return 0
        if not self._reserve_at(fd, state[1], nbytes):
            return 0
        pos = state[1]
        for view in views:
            self._write_at(fd, pos, RECORD_HEADER.pack(len(view), 0))
            self._write_at(fd, pos + RECORD_HEADER.size, view)
            pos += RECORD_HEADER.size + len(view)
        state[1] = pos
        state[2] += len(views)
        state[4] += len(views)
        self._write_state(fd, state)     # publish all of them: one state write
        return len(views)

    def get(self, timeout):
        return self.get_many(1, timeout)[0]

    def get_many(self, max_messages, timeout, decode=None):
        """See the contract; with ``decode``, each payload is decoded under
        the lock, before the hand-over, as in the native core: if ``decode``
        raises for one, the ones decoded before it are returned and it and
        the rest stay queued in place; if it is the first, it is consumed
        and its error propagates."""
        if isinstance(max_messages, bool) or not isinstance(max_messages, int):
            raise TypeError("max_messages must be an int")
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        self._register(ROLE_CONSUMER)

        def attempt():
            got = self._locked(self._get_locked, max_messages, decode)
            if not got and self._sweep_leases():
                got = self._locked(self._get_locked, max_messages, decode)
            if not got:
                self._idle()
            else:
                _sweep(self)        # once a window: the process's idle rings
            return got or _AGAIN

        # Waited in slices: an idle wait re-attempts only when the epoch
        # changes, and a dead consumer's leases change nothing in the ring.
        deadline = _deadline(timeout)
        while True:
            left = _remaining(deadline)
            step = 0 if timeout == 0 else (
                _LEASE_SWEEP if left is None else max(0.0, min(_LEASE_SWEEP, left)))
            got = self._wait(attempt, step)
            if got is not _AGAIN:
                return got
            if timeout == 0 or (left is not None and left <= _LEASE_SWEEP):
                errors.empty()

    _next_lease_sweep = 0.0

    def _sweep_leases(self):
        """A consumer that finds the queue empty also brings back what dead
        consumers leased (and expired leases), at most every 0.25 s, so their
        messages return within about a second (the sweep interval) while any
        consumer waits -- not only when someone calls get_message. Returns
        how many came back."""
        now = time.monotonic()
        if now < self._next_lease_sweep:
            return 0
        self._next_lease_sweep = now + _LEASE_SWEEP
        return self.in_flight_table.sweep()

    def reserve(self, nbytes, timeout):
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be non-negative, got {nbytes}")
        self._check_size(nbytes)
        self._register(ROLE_PRODUCER)
        room = self._wait(lambda: self._locked(lambda fd, st: self._fits(st, nbytes))
                          or _AGAIN, timeout)
        if room is _AGAIN:
            errors.full(self._full_reason(nbytes))
        return Reservation(self, nbytes)

    def _full_reason(self, nbytes):
        state = self._locked(lambda fd, st: st)
        if state[2] >= self.maxsize:
            return f"queue is full: it holds its maximum of {self.maxsize} messages"
        if self._shm_blocked:
            return (f"queue is full: no free space left in /dev/shm for a {nbytes}-byte "
                    "message (other queues or files use it; enlarge /dev/shm or drain "
                    "queues)")
        return (f"queue is full: its memory cap is reached (capacity_bytes="
                f"{self.capacity_bytes}, {state[1] - state[0]} bytes held by queued "
                "messages)")

    def full(self):
        """True when a put of a small message would block right now."""
        return not self._locked(lambda fd, st: self._fits(st, 64))

    def recv(self, timeout):
        return ReceivedView(self.get(timeout))

    def qsize(self):
        return self._read_u64(COUNT_OFFSET)

    # fastmq.Queue's count of messages that failed authentication (authkey=,
    # see fastmq/_auth.py), kept in the free part of the header page.
    def count_rejected(self, n=1):
        def bump(fd, state):
            raw = os.pread(fd, 8, REJECTED_OFFSET)
            if len(raw) == 8:
                os.pwrite(fd, struct.pack("<Q", struct.unpack("<Q", raw)[0] + n),
                          REJECTED_OFFSET)
        self._locked(bump)

    def rejected(self):
        return self._read_u64(REJECTED_OFFSET)

    def stats(self):
        def read(fd, state):
            raw = os.pread(fd, 8, ABANDONED_OFFSET)
            abandoned = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            return (state, self._participants(fd), self.in_flight_table.in_flight_count(fd),
                    abandoned)
        state, (producers, consumers), in_flight, abandoned = self._locked(read)
        return {
            "depth": state[2], "capacity": self.maxsize,
            "enqueued": state[4], "dequeued": state[5],
            "bytes_in_use": state[1] - state[0],
            "producers": producers, "consumers": consumers,
            "redelivered": state[6], "abandoned": abandoned, "dead_lettered": state[7],
            "in_flight": in_flight,
            "max_message_size": self.max_message_size,
            "capacity_bytes": self.capacity_bytes,
            "backend": "pure",
            "memory": self.memory(),
        }

    def memory(self):
        """Bytes this segment has reserved in /dev/shm (its file's allocated
        blocks) and the sparse file's size."""
        with self._h.lock:
            st = os.fstat(self._fd())
        return {"reserved": st.st_blocks * 512, "virtual_size": st.st_size}


# ----------------------------------------------------------- zero-copy (emulated)

class Reservation:
    """Space for one message, written in place and published by ``commit``.

    The pure backend cannot export shared memory safely, so ``view`` is a
    private buffer copied into the ring at commit. ``Ring.reserve`` waited for
    room; if another producer took it meanwhile, ``commit`` waits for room
    again (without a deadline: the message was promised to go in).
    """

    def __init__(self, ring, nbytes):
        self._ring = ring
        self._buffer = bytearray(nbytes)
        self.view = memoryview(self._buffer)
        self._done = False
        self._generation = _lifetime.fork_generation

    def _finish(self):
        # As in the native backend: a reservation inherited through fork() is
        # the parent's; a child committing it would publish the message twice.
        if self._generation != _lifetime.fork_generation:
            raise ValueError("this reservation was inherited through fork(): only the "
                             "process that reserved it can commit or abort it (reserve "
                             "in this process instead)")
        if self._done:
            raise ValueError("reservation was already committed or aborted")
        self._done = True

    def commit(self, length=None):
        if length is None:
            length = len(self._buffer)
        if isinstance(length, bool) or not isinstance(length, int) \
                or not 0 <= length <= len(self._buffer):
            raise ValueError(f"commit length must be an int in [0, {len(self._buffer)}]")
        self._finish()
        self._ring.put(self.view[:length], None)

    def abort(self):
        self._finish()


class ReceivedView:
    """What ``Ring.recv`` returns: a received message (already removed from
    the queue, so not a lease), as a read-only view.

    The bytes are a private copy, so nothing needs pinning; ``release()``
    still raises ``BufferError`` while views derived from ``view`` are alive,
    exactly like the native backend (and ``mmap.close()``).
    """

    def __init__(self, data: bytes):
        self.nbytes = len(data)
        self.view = memoryview(data)        # bytes: already read-only

    def release(self):
        view = self.view
        try:
            derived = _derived_views(view)
        except ValueError:                   # already released: idempotent
            return
        if derived:
            raise BufferError(f"cannot release a message while {derived} view(s) "
                              "of its data are alive")
        view.release()                       # also BufferError if exported

    def close(self):
        try:
            self.view.release()
        except BufferError:
            pass                 # deferred: the copy is freed with its last export


def _probe_managed_buffer_layout():
    """How to count the views sharing a memoryview's managed buffer, or None.

    Slices, ``memoryview(view)`` and casts register on the managed buffer
    (CPython's ``_PyManagedBufferObject.exports``), not on the view, so
    ``view.release()`` alone cannot see them. Reading that counter needs the
    struct layout; it is verified here on a scratch view and the check is
    skipped (not guessed) on an interpreter where it does not match.
    """
    try:
        import ctypes
        import sys
        if sys.implementation.name != "cpython":
            return None
        ptr = ctypes.sizeof(ctypes.c_void_p)
        ssize = ctypes.sizeof(ctypes.c_ssize_t)
        mbuf_at = 3 * ptr                              # after PyObject_VAR_HEAD
        exports_at = 2 * ptr + max(ctypes.sizeof(ctypes.c_int), ssize)  # flags, pad

        def count(view):
            mbuf = ctypes.c_void_p.from_address(id(view) + mbuf_at).value
            return ctypes.c_ssize_t.from_address(mbuf + exports_at).value

        scratch = memoryview(b"probe")
        if count(scratch) != 1:
            return None
        a, b = scratch[1:], memoryview(scratch)
        if count(scratch) != 3:
            return None
        del a, b
        return count if count(scratch) == 1 else None
    except Exception:
        return None


_managed_buffer_views = _probe_managed_buffer_layout()


def _derived_views(view) -> int:
    """Views alive besides ``view`` itself (0 when that cannot be known)."""
    if view.obj is None:                     # released: .obj raises ValueError
        return 0
    if _managed_buffer_views is None:
        return 0
    return max(_managed_buffer_views(view) - 1, 0)


# -------------------------------------------------------------- module functions

def _read_geometry(fd, name):
    """Read and validate the header of the segment open on ``fd``."""
    # A segment is linked into place only once complete (see Ring.create), so
    # a visible one without its magic was half-made in place: nobody is
    # working on it.
    size = os.fstat(fd).st_size
    raw = os.pread(fd, GEOMETRY.size, GEOMETRY_OFFSET) if size >= HEADER_SIZE else b""
    if len(raw) != GEOMETRY.size or raw[:8] == b"\0" * 8:
        raise CorruptQueue(f"segment {name!r} is truncated or was never initialised "
                           f"({size} bytes); remove it with Queue.unlink")
    geometry = GEOMETRY.unpack(raw)
    magic, version, header_size, maxsize, mms, capacity, data_off, file_size = geometry[:8]
    if magic != MAGIC:
        if magic.startswith(b"FASTMQ"):
            raise CorruptQueue(
                f"segment {name!r} was created by fastmq's native backend; open it with "
                "FASTMQ_BACKEND=native (every process of a queue must use the same "
                "backend)")
        raise CorruptQueue(f"segment {name!r} has magic {magic!r}: it is not a fastmq "
                           "queue")
    if version != VERSION:
        raise CorruptQueue(f"segment {name!r} has layout version {version}, this "
                           f"fastmq's pure backend reads version {VERSION}")
    try:
        _validate_geometry(maxsize, mms, capacity)
    except (TypeError, ValueError) as exc:
        raise CorruptQueue(f"segment {name!r} has an invalid header: {exc}") from None
    expected = leases.layout(DATA_OFFSET + capacity + RECORD_HEADER.size, maxsize,
                             capacity)[2]
    if header_size != HEADER_SIZE or data_off != DATA_OFFSET or \
            file_size != expected or file_size != size:
        raise CorruptQueue(f"segment {name!r} has an inconsistent layout (header "
                           f"{header_size}, data at {data_off}, recorded size "
                           f"{file_size}, actual size {size})")
    return geometry


def list_segments():
    """Names of pure-backend segments in /dev/shm."""
    names = []
    try:
        entries = sorted(os.listdir(_lifetime.SHM_DIR))
    except OSError:
        return names
    for entry in entries:
        if not entry.startswith("fastmq-"):
            continue
        try:
            fd = os.open(_lifetime.segment_path(entry),
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.pread(fd, len(MAGIC), 0) == MAGIC:
                names.append(entry)
        except OSError:
            pass
        finally:
            _lifetime.guarded_close(fd)
    return names
