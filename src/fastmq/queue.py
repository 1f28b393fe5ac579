"""``fastmq.Queue``: a multiprocessing.Queue-compatible handle on a ring.

The layer's jobs, and nothing more: validate arguments early with actionable
messages, normalise ``block``/``timeout`` the way the stdlib does, serialize
(see ``_serialize``), offer the zero-copy helpers, and make the handle
picklable. Everything that touches shared memory -- blocking, locking,
crash safety, fork handling -- belongs to the ring (``_ring_protocol``).

The handle keeps no per-process state besides the ring itself (and, once
``get_message`` was used, the at-least-once bookkeeping of ``acks.py``, and
once an ``*_async`` method waited, its waiter threads (``asyncio_support``);
a forked child resets both), so a handle inherited through ``fork()`` works in the
child as it is. Batches are decoded by the ring inside its claim
(``Ring.get_many(..., decode)``), so an undecodable message never costs the
rest of a batch and the handle holds no dequeued-but-undelivered payloads.
"""
from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Callable, Generic, Iterable, Optional, Tuple, TypeVar, Union

from multiprocessing.context import get_spawning_popen

from . import (_auth, _backend, _contract, _lifetime, _location, _names, _serialize,
               _transaction, acks, asyncio_support)
from .errors import AuthenticationError, Full, MessageTooLarge, QueueClosed, QueueNotFound

__all__ = ["Queue", "Received", "DEFAULT_MAX_MESSAGE_SIZE", "MIN_CAPACITY_BYTES",
           "MAX_DEFAULT_CAPACITY_BYTES", "default_capacity_bytes", "unbounded_slots"]

DEFAULT_MAX_MESSAGE_SIZE = 16 << 20       # 16 MiB
MIN_CAPACITY_BYTES = 64 << 20             # default capacity_bytes floor
MAX_DEFAULT_CAPACITY_BYTES = 1 << 30      # ... and ceiling (from the share of /dev/shm)
MIN_UNBOUNDED_SLOTS = 1 << 16             # message slots when maxsize <= 0 ...
MAX_UNBOUNDED_SLOTS = 1 << 18             # ... one per KiB of capacity_bytes, clamped
MAX_MAXSIZE = 1 << 24
MAX_MESSAGE_SIZE = _contract.MAX_MESSAGE_SIZE  # what every backend can carry
MAX_CAPACITY_BYTES = 1 << 40
DEFAULT_GET_MANY = 1024
_SMALL_SEALED = 1 << 16        # below: sealed as one bytes; above: written in place
_plain_pickle = _serialize._plain_pickle
# (Queue method, the ring's compiled form of it, needs the default codec);
# see Queue._bind_compiled.
_COMPILED = (("put_bytes", "put_bytes", False), ("get_bytes", "get_bytes", False),
             ("put_many_bytes", "put_many_bytes", False),
             ("get_many_bytes", "get_many_bytes", False),
             ("put", "put_object", True), ("get", "get_object", True),
             ("put_many", "put_many_objects", True), ("get_many", "get_many_objects", True))

_T = TypeVar("_T")                        # the item type of a Queue (typing only)
Serializer = Tuple[Callable[[Any], bytes], Callable[[bytes], Any]]
BytesLike = Union[bytes, bytearray, memoryview]


# ------------------------------------------------------------ argument checks

def _check_int(label, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{label} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{label} must be an int in [{low}, {high}], got {value}")
    return value


def default_capacity_bytes(max_message_size=DEFAULT_MAX_MESSAGE_SIZE) -> int:
    """The memory cap of a queue made without ``capacity_bytes``: a quarter of
    the shared-memory filesystem, at least 64 MiB (and two largest
    messages), at most 1 GiB. Memory follows use: the cap is what the queue
    may grow to, not what it takes."""
    try:
        st = os.statvfs(_lifetime.SHM_DIR)
        share = st.f_frsize * st.f_blocks // 4
    except (OSError, AttributeError):
        share = 0
    return max(MIN_CAPACITY_BYTES, 2 * max_message_size,
               min(share, MAX_DEFAULT_CAPACITY_BYTES))


def unbounded_slots(capacity_bytes) -> int:
    """Message slots of a queue made with ``maxsize <= 0`` (bounded by its
    memory): one per KiB of ``capacity_bytes``, between 65536 and 262144."""
    return min(max(capacity_bytes >> 10, MIN_UNBOUNDED_SLOTS), MAX_UNBOUNDED_SLOTS)


def _geometry(maxsize, max_message_size, capacity_bytes):
    """Apply the documented defaults and validate; returns the ring's sizes."""
    if isinstance(maxsize, bool) or not isinstance(maxsize, int):
        raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
    if maxsize > 0:
        _check_int("maxsize", maxsize, 1, MAX_MAXSIZE)
    if max_message_size is None:
        max_message_size = DEFAULT_MAX_MESSAGE_SIZE
    _check_int("max_message_size", max_message_size, 1, MAX_MESSAGE_SIZE)
    if capacity_bytes is None:
        capacity_bytes = default_capacity_bytes(max_message_size)
    _check_int("capacity_bytes", capacity_bytes, 1, MAX_CAPACITY_BYTES)
    if capacity_bytes < max_message_size:
        raise ValueError(f"capacity_bytes ({capacity_bytes}) must be at least "
                         f"max_message_size ({max_message_size}): a message must fit")
    if maxsize <= 0:                      # as in multiprocessing: no message bound
        maxsize = unbounded_slots(capacity_bytes)
    return dict(maxsize=maxsize, max_message_size=max_message_size,
                capacity_bytes=capacity_bytes)


def _check_serializer(serializer):
    if serializer is None:
        return None
    if (not isinstance(serializer, (tuple, list)) or len(serializer) != 2
            or not all(callable(f) for f in serializer)):
        raise TypeError("serializer must be a (dumps, loads) pair of callables, "
                        f"not {serializer!r}")
    return tuple(serializer)


def _check_create_options(serializer, authkey, mode, mode_max, max_deliveries, dead_letter):
    """The checks every create shares; returns (serializer, authkey) normalised.
    ``mode_max``: the permission bits the location accepts."""
    serializer = _check_serializer(serializer)
    authkey = _auth.check_authkey(authkey)
    _check_int("mode", mode, 0, mode_max)
    _check_int("max_deliveries", max_deliveries, 1, 1 << 30)
    if dead_letter is not None:
        _names.validate_name(dead_letter)
    return serializer, authkey


# A timeout this long (about 317 years) is "forever": the rings' deadlines are
# nanosecond counters, and a deadline past 2**64 ns cannot be represented.
FOREVER_SECONDS = 1e10


def _timeout(block, timeout):
    """``None`` (forever), ``0`` (one non-blocking try) or seconds > 0.

    As in ``multiprocessing.Queue``: a timeout of zero or less makes one
    non-blocking try (so ``get(timeout=deadline - time.monotonic())`` past
    its deadline raises ``Empty``), and ``inf`` -- or any timeout of at least
    ``FOREVER_SECONDS`` -- waits forever. NaN is a ``ValueError``."""
    if not block:
        return 0
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"'timeout' must be a number or None, not {type(timeout).__name__}")
    if timeout > 0:
        return None if timeout >= FOREVER_SECONDS else timeout
    if timeout != timeout:
        raise ValueError("'timeout' must be a number of seconds or None, not NaN")
    return 0


# ------------------------------------------------------------------ the handle

class Queue(Generic[_T]):
    """A shared-memory FIFO of Python objects, usable from any process.

    ``Queue()`` makes an anonymous queue, a drop-in for
    ``multiprocessing.Queue``; ``Queue.create(name)`` / ``Queue.open(name)``
    make or join a named one. Sizes and their defaults:

    * ``maxsize`` -- capacity in messages (at most 2**24); ``0`` or less
      means no message bound, as in ``multiprocessing.Queue``: the queue is
      bounded by its memory, and its ring gets ``unbounded_slots()`` slots
      (one per KiB of ``capacity_bytes``, between 65536 and 262144).
    * ``max_message_size`` -- largest message in bytes (after pickling);
      ``None`` means 16 MiB.
    * ``capacity_bytes`` -- the queue's memory cap for message bytes;
      ``None`` means ``default_capacity_bytes()``: a quarter of /dev/shm,
      at least 64 MiB, at most 1 GiB. Memory follows use: a new queue
      reserves a few hundred KiB of /dev/shm, grows with its backlog (any
      mix of sizes can use the whole cap) and gives memory back when the
      backlog drains. Memory is reserved before it is written, so a full
      /dev/shm makes a put wait (or raise ``Full`` saying so), never a
      SIGBUS.
    * ``serializer`` -- ``(dumps, loads)``; default pickle protocol 5 with
      out-of-band buffers (numpy arrays are copied once, straight into
      shared memory).
    * ``authkey`` -- bytes: every message this handle writes carries a keyed
      MAC (BLAKE2b), and every message it reads is checked before it is
      deserialized; one that fails is consumed, counted in
      ``stats()["rejected"]`` and raises ``fastmq.AuthenticationError``
      (see ``_auth``). The key travels to ``multiprocessing`` children like
      ``multiprocessing``'s own authkey: a handle pickled while spawning a
      process carries it, a handle pickled anywhere else (into a message, a
      file) does not.

    The handle pickles (fork, spawn, forkserver, executors, even through
    another fastmq queue). The memory of an anonymous queue is freed when the
    last handle in any process is closed or garbage-collected.

    ``_backend="pure"|"native"`` (keyword, internal) picks a ring
    implementation regardless of ``fastmq.backend``; the test suite uses it to
    run every behaviour test against both.

    ``Queue[int]`` (any item type) is the type of a queue of ints for type
    checkers; at run time it is the same class. ``create``/``open`` give a
    ``Queue[Any]``: a name says nothing about what is in the queue, so
    annotate the variable (``q: Queue[int] = Queue.open("jobs")``).
    """

    name: Optional[str]
    backend: str

    def __init__(self, maxsize: int = 0, *, max_message_size: Optional[int] = None,
                 capacity_bytes: Optional[int] = None,
                 serializer: Optional[Serializer] = None,
                 authkey: Optional[bytes] = None,
                 _backend: Optional[str] = None) -> None:
        geometry = _geometry(maxsize, max_message_size, capacity_bytes)
        serializer = _check_serializer(serializer)
        authkey = _auth.check_authkey(authkey)
        backend, module = _backend_resolve(_backend)
        ring = module.Ring.create(_names.anonymous_segment(), anonymous=True, **geometry)
        self._setup(ring, backend, None, serializer, authkey)

    # -------------------------------------------------------- constructors

    @classmethod
    def _from_ring(cls, ring, backend, name, serializer, authkey=None):
        self = cls.__new__(cls)
        self._setup(ring, backend, name, serializer, authkey)
        return self

    def _setup(self, ring, backend, name, serializer, authkey=None):
        self._ring = ring
        self.backend = backend
        self.name = name                  # None for anonymous queues
        self._serializer = serializer
        self._auth = _auth.Auth(authkey, ring) if authkey is not None else None
        self._reserved_arrays = {}        # id(array) -> (Reservation, weakref) (reserve_array)
        self._lock = _lifetime.ForkSafeLock()
        if self._auth is None:
            self._bind_compiled(ring, serializer)
        elif getattr(self._auth, "direct", False):
            self._bind_compiled(self._auth, serializer)

    def _bind_compiled(self, ring, serializer):
        """Bind the compiled forms of the hot methods onto this handle.

        ``ring`` -- for a keyed handle, its ``Auth`` -- may offer, under the
        names in ``_COMPILED``, the methods of this class compiled: same
        arguments, same checks and messages, same behaviour, for objects
        with the default codec (``_serialize``). The native ring does for a
        handle without an authkey (see ``_core_parts/ring.pxi``), and the C
        ``Mac`` of a keyed handle on a native ring (``direct``) does with
        the key (``_core_parts/mac.pxi``): the MAC is computed and checked
        in the same C call. Bound as instance attributes they make
        ``q.put_bytes(b)`` one C call with no Python frame in between. The
        methods below stay the reference, and what a custom serializer (for
        objects), the pure ring, a keyed handle without the extension or a
        subclass that overrides one of them gets."""
        cls = type(self)
        for name, compiled, needs_codec in _COMPILED:
            if needs_codec and serializer is not None:
                continue
            method = getattr(ring, compiled, None)
            if method is not None and getattr(cls, name) is Queue.__dict__[name]:
                self.__dict__[name] = method

    @classmethod
    def create(cls, name: str, *, maxsize: int = 0, max_message_size: Optional[int] = None,
               capacity_bytes: Optional[int] = None, mode: int = 0o600,
               exist_ok: bool = False, serializer: Optional[Serializer] = None,
               max_deliveries: int = 20, dead_letter: Optional[str] = None,
               authkey: Optional[bytes] = None,
               _backend: Optional[str] = None, url: Optional[str] = None,
               sync: Optional[str] = None, sync_interval: float = 1.0) -> "Queue[Any]":
        """Create the named queue ``name`` (``QueueExists`` if it exists, unless
        ``exist_ok=True``, which opens it -- its own sizes win). ``url``: where
        (None: ``$FASTMQ_URL``, else this host's shared memory; see ``_location``).

        Durable queues (``url="file:///dir"``) take ``sync``: ``"commit"`` (the
        default: ``put`` returns once the message is on stable storage; the
        puts of concurrent producers share one flush), ``"interval"`` (a put
        that finds the last flush older than ``sync_interval`` seconds
        flushes, and so does closing a handle) or ``"none"`` (the OS writes
        back when it likes). An existing queue keeps the mode it was made with."""
        scheme, resolved = _location.resolve(url)
        if scheme == "file":
            return cls._create_durable(name, resolved, maxsize, max_message_size, capacity_bytes,
                                       mode, exist_ok, serializer, max_deliveries, dead_letter,
                                       authkey, _backend, sync, sync_interval)
        if sync is not None:
            raise ValueError("sync= applies to durable queues only (url=\"file:///dir\"); "
                             "shared-memory and redis:// queues have no sync mode")
        impl = _location.queue_class(url)
        if impl is not None:
            _auth.only_in_shared_memory(authkey, url)
            return impl.create(name, url=url, maxsize=maxsize, max_message_size=max_message_size,
                               capacity_bytes=capacity_bytes, mode=mode, exist_ok=exist_ok,
                               serializer=serializer, max_deliveries=max_deliveries,
                               dead_letter=dead_letter)
        segment = _names.segment_for(name)
        geometry = _geometry(maxsize, max_message_size, capacity_bytes)
        serializer, authkey = _check_create_options(serializer, authkey, mode, 0o7777,
                                                    max_deliveries, dead_letter)
        backend, module = _backend_resolve(_backend)
        ring = module.Ring.create(segment, mode=mode, exist_ok=exist_ok,
                                  max_deliveries=max_deliveries,
                                  dead_letter=dead_letter or "", **geometry)
        return cls._from_ring(ring, backend, name, serializer, authkey)

    @classmethod
    def _create_durable(cls, name, url, maxsize, max_message_size, capacity_bytes, mode,
                        exist_ok, serializer, max_deliveries, dead_letter, authkey, backend_name,
                        sync, sync_interval):
        segment = _names.segment_for(name)
        if max_message_size is None:
            max_message_size = DEFAULT_MAX_MESSAGE_SIZE
        if capacity_bytes is None:
            # A file, not /dev/shm: the shared-memory share does not apply.
            _check_int("max_message_size", max_message_size, 1, MAX_MESSAGE_SIZE)
            capacity_bytes = max(MIN_CAPACITY_BYTES, 2 * max_message_size)
        geometry = _geometry(maxsize, max_message_size, capacity_bytes)
        serializer, authkey = _check_create_options(serializer, authkey, mode, 0o777,
                                                    max_deliveries, dead_letter)
        backend, module = _durable_backend(backend_name, url)
        directory = _location.file_dir(url)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _remove_dead_creators_files(_location.file_path(url, name))
        ring = module.Ring.create_durable(
            segment, _location.file_path(url, name), mode=mode, exist_ok=exist_ok,
            max_deliveries=max_deliveries, dead_letter=dead_letter or "",
            sync="commit" if sync is None else sync, sync_interval=sync_interval, **geometry)
        return cls._from_ring(ring, backend, name, serializer, authkey)

    @classmethod
    def _open_durable(cls, name, url, serializer, authkey, backend_name):
        segment = _names.segment_for(name)
        serializer = _check_serializer(serializer)
        authkey = _auth.check_authkey(authkey)
        backend, module = _durable_backend(backend_name, url)
        path = _location.file_path(url, name)
        try:
            ring = module.Ring.open(segment, path=path)
        except QueueNotFound:
            raise QueueNotFound(f"no durable fastmq queue named {name!r} "
                                f"at {_location.mask(url)!r} ({path})") from None
        return cls._from_ring(ring, backend, name, serializer, authkey)

    @classmethod
    def open(cls, name: str, serializer: Optional[Serializer] = None, *,
             authkey: Optional[bytes] = None, _backend: Optional[str] = None,
             url: Optional[str] = None) -> "Queue[Any]":
        """Open the existing named queue ``name`` (``QueueNotFound`` if absent)."""
        scheme, resolved = _location.resolve(url)
        if scheme == "file":
            return cls._open_durable(name, resolved, serializer, authkey, _backend)
        impl = _location.queue_class(url)
        if impl is not None:
            _auth.only_in_shared_memory(authkey, url)
            return impl.open(name, serializer, url=url)
        segment = _names.segment_for(name)
        serializer = _check_serializer(serializer)
        authkey = _auth.check_authkey(authkey)
        backend, module = _backend_resolve(_backend)
        try:
            ring = module.Ring.open(segment)
        except QueueNotFound:
            raise QueueNotFound(f"no fastmq queue named {name!r}") from None
        return cls._from_ring(ring, backend, name, serializer, authkey)

    @staticmethod
    def unlink(name: str, *, _backend: Optional[str] = None, url: Optional[str] = None) -> None:
        """Remove the name ``name``; handles already open keep working."""
        scheme, url = _location.resolve(url)
        if scheme == "file":
            path = _location.file_path(url, _names.validate_name(name))
            try:
                os.unlink(path)
            except FileNotFoundError:
                raise QueueNotFound(f"no durable fastmq queue named {name!r} at "
                                    f"{_location.mask(url)!r}") from None
            for leftover in (path + ".rebuild", path + ".rebuild.tmp"):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            return None
        impl = _location.queue_class(url)
        if impl is not None:
            return impl.unlink(name, url=url)
        segment = _names.segment_for(name)
        _, module = _backend_resolve(_backend)
        try:
            module.Ring.unlink(segment)
        except QueueNotFound:
            raise QueueNotFound(f"no fastmq queue named {name!r}") from None

    # ------------------------------------------------------------- pickling

    def __reduce__(self):
        ring = self._live_ring()
        # A pickled handle is not an open handle: if every open handle of an
        # anonymous queue closes before the copy is loaded, loading it raises
        # QueueNotFound (API: the memory lives until the last handle closes).
        # The authkey goes along only while a multiprocessing child is being
        # spawned (as multiprocessing's own authkey does): never into a
        # message, a file, or any other pickle that may outlive the process.
        args = (ring.name, ring.anonymous, self._serializer, self.backend)
        if self._auth is not None and get_spawning_popen() is not None:
            args += (self._auth.key,)
        path = getattr(ring, "path", None)
        if path is not None:                # a durable queue: reopen the same file
            args = args + (None,) * (5 - len(args)) + (path,)
        return (_reopen, args)

    # ------------------------------------------------------------ lifecycle

    def _live_ring(self):
        ring = self._ring
        if ring.closed:
            raise QueueClosed("operation on a closed fastmq queue handle")
        return ring

    def close(self) -> None:
        """Stop using this handle (idempotent); other handles are unaffected.

        Messages this handle leased with ``get_message`` and did not ack go
        back to the queue (the handle departed; see ``acks.py``)."""
        state = self.__dict__.get("_acks_state")
        if state is not None:
            state.close()                 # the dead-letter queue handle, if any
        self._ring.close()

    @property
    def closed(self) -> bool:
        return self._ring.closed

    def join_thread(self) -> None:
        """No-op (fastmq has no feeder thread); for multiprocessing.Queue code."""

    def cancel_join_thread(self) -> None:
        """No-op (fastmq has no feeder thread); for multiprocessing.Queue code."""

    def __enter__(self) -> "Queue[_T]":
        self._live_ring()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_ring", None) is not None:
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self):
        what = f"name={self.name!r}" if self.name is not None else "anonymous"
        state = "closed" if self._ring.closed else f"maxsize={self._ring.maxsize}"
        return f"<fastmq.Queue {what} backend={self.backend} {state}>"

    # --------------------------------------------------------- geometry

    @property
    def maxsize(self) -> int:
        return self._ring.maxsize

    @property
    def max_message_size(self) -> int:
        return self._ring.max_message_size

    @property
    def capacity_bytes(self) -> int:
        return self._ring.capacity_bytes

    # ------------------------------------------------------- serialization

    def _dumps(self, obj):
        return self._serializer[0](obj)

    def _loads(self, payload):
        return self._serializer[1](payload)

    def _encode(self, obj):
        payload = self._dumps(obj) if self._serializer else _serialize.encode(obj)
        return payload if self._auth is None else self._auth.seal(payload)

    def _decode(self, payload):
        """Deserialize a payload (already checked, if this handle has a key)."""
        return self._loads(payload) if self._serializer else _serialize.decode(payload)

    def _decode_sealed(self, message):
        """Check, then deserialize, one message read by a handle with a key."""
        return self._decode(self._auth.open(message))

    def _open_bytes(self, message):
        payload = self._auth.open(message)
        return payload if payload.__class__ is bytes else bytes(payload)

    def _rejected(self, exc):
        """A message failed its check and was consumed: count it, raise."""
        _auth.count_rejected(self._ring)
        raise exc

    # --------------------------------------------------------- put / get

    # The hot paths below avoid helper calls on purpose: with the C ring a put
    # or get costs a few hundred nanoseconds, so every extra Python frame
    # shows. ``timeout`` is normalised only when it is not the common default,
    # and a closed handle is detected by the ring itself (QueueClosed).
    # A handle on the native ring, keyed or not, does not run them at all: it
    # binds their compiled forms in their place (``_bind_compiled``), which
    # must keep behaving exactly as these do (tests/test_compiled_paths.py).

    def put(self, obj: _T, block: bool = True, timeout: Optional[float] = None) -> None:
        """Serialize ``obj`` and enqueue it; ``Full`` if no room in time."""
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        auth = self._auth
        if auth is not None:
            if self._serializer is None:
                data = _plain_pickle(obj)
                if data is not None and len(data) < _SMALL_SEALED:
                    auth.put_sealed(data, timeout)    # the common case
                else:
                    _serialize.put_object(self._ring, obj, timeout, auth)
            else:
                auth.put(self._ring, self._dumps(obj), timeout)
        elif self._serializer is None:
            _serialize.put_object(self._ring, obj, timeout)
        else:
            self._ring.put(self._dumps(obj), timeout)

    def get(self, block: bool = True, timeout: Optional[float] = None, *,
            zero_copy: bool = False) -> _T:
        """Dequeue and deserialize one object; ``Empty`` if none in time.

        ``zero_copy=True`` returns numpy arrays (and other out-of-band buffers)
        as read-only views of shared memory, which stays pinned while they live.
        (With a custom ``serializer`` it has no effect: ``loads`` gets bytes.)
        """
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        auth = self._auth
        if auth is not None:
            if zero_copy or self._serializer is not None:
                return self._get_sealed(timeout, zero_copy)
            payload = auth.get_checked(timeout)    # checked on a private copy
            if payload.__class__ is not bytes:
                self._rejected(_auth.rejected_error(payload))
            return _serialize.decode(payload)
        if self._serializer is not None:
            return self._loads(self._ring.get(timeout))
        if not zero_copy:
            return _serialize.decode(self._ring.get(timeout))
        lease = self._ring.recv(timeout)
        try:
            return _serialize.decode(lease.view, zero_copy=True)
        finally:
            lease.close()            # deferred while the arrays view it

    def _get_sealed(self, timeout, zero_copy):
        if self._serializer is not None or not zero_copy:
            message = self._ring.get(timeout)       # a private copy: check, then use
            try:
                payload = self._auth.open(message)
            except AuthenticationError as exc:
                self._rejected(exc)
            return self._decode(payload)
        lease = self._ring.recv(timeout)
        try:
            value = _serialize.decode_authenticated_view(self._auth, lease.view)
        finally:
            lease.close()            # deferred while the arrays view it
        if value.__class__ is _auth.Rejected:
            self._rejected(value.error)
        return value

    def put_nowait(self, obj: _T) -> None:
        return self.put(obj, False)

    def get_nowait(self) -> _T:
        return self.get(False)

    def put_many(self, iterable: Iterable[_T], block: bool = True,
                 timeout: Optional[float] = None, *, atomic: bool = False) -> int:
        """Enqueue a batch in order; returns how many went in (all of them when
        blocking without a timeout). Nothing is written if any item is too big.

        ``atomic=True``: all of them or none, whatever process is killed
        where, and consumers see the batch whole or not at all, in order
        (``get_many`` takes it whole, ``get``/``get_message`` one at a time).
        It waits for room for all of it (``Full`` if there is none in time)
        and is refused before anything is written if it can never fit:
        ``ValueError`` for more messages than ``maxsize``, ``MessageTooLarge``
        when its framed size (its payloads plus 4 bytes each and 8) exceeds
        ``max_message_size`` -- the batch is stored as one record."""
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        encode = (self._encode if self._serializer is not None or self._auth is not None
                  else _serialize.encode)
        payloads = [encode(obj) for obj in iterable]
        # The ring checks every size before writing anything, too; checking
        # here first gives the message that names the batch.
        _check_sizes(payloads, self._ring.max_message_size)
        if atomic:
            return self._put_atomic(payloads, timeout)
        return self._ring.put_many(payloads, timeout)

    def _put_atomic(self, payloads, timeout):
        n = self._ring.put_many(payloads, timeout, atomic=True)
        if n != len(payloads):      # a ring that does not raise Full itself
            raise Full(f"queue {self.name!r}: no room for the atomic batch of "
                       f"{len(payloads)} messages in time")
        return n

    def transaction(self, block: bool = True,
                    timeout: Optional[float] = None) -> "_transaction.Transaction":
        """``with q.transaction() as tx: tx.put(a); tx.put_bytes(b)`` -- the
        messages go in as one atomic batch when the block ends normally
        (``put_many(..., atomic=True)``, with ``block``/``timeout`` for its
        wait), and none of them if it raises."""
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        encode = (self._encode if self._serializer is not None or self._auth is not None
                  else _serialize.encode)
        auth = self._auth

        def encode_bytes(data):
            payload = bytes(memoryview(data))
            return payload if auth is None else auth.seal(payload)

        def commit(payloads):
            _check_sizes(payloads, self._ring.max_message_size)
            return self._put_atomic(payloads, timeout)
        return _transaction.Transaction(encode, encode_bytes, commit)

    def get_many(self, max_messages: int = DEFAULT_GET_MANY, block: bool = True,
                 timeout: Optional[float] = None) -> "list[_T]":
        """At least one object (``Empty`` where ``get`` would raise), at most
        ``max_messages``, without waiting for more once one is available.

        If a message cannot be deserialized, the ones before it are returned
        and it and the rest stay in the queue, in place and in order; the
        next call, which finds it first, consumes it and raises its error."""
        _check_int("max_messages", max_messages, 1, 1 << 30)
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if self._auth is None:
            return self._ring.get_many(max_messages, timeout, self._decode)
        # A message that fails its check stops the batch like an undecodable
        # one: those before it are returned, it stays first in line, and the
        # call that meets it first consumes it and raises (counted once, here).
        try:
            return self._ring.get_many(max_messages, timeout, self._decode_sealed)
        except AuthenticationError as exc:
            self._rejected(exc)

    def put_bytes(self, data: BytesLike, block: bool = True,
                  timeout: Optional[float] = None) -> None:
        """Enqueue a bytes-like payload as it is (no serialization)."""
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if self._auth is not None:
            self._auth.put(self._ring, data, timeout)
        else:
            self._ring.put(data, timeout)

    def get_bytes(self, block: bool = True, timeout: Optional[float] = None) -> bytes:
        """Dequeue one payload as bytes (no deserialization)."""
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if self._auth is None:
            return self._ring.get(timeout)
        try:
            return self._open_bytes(self._ring.get(timeout))
        except AuthenticationError as exc:
            self._rejected(exc)

    def put_many_bytes(self, items: Iterable[BytesLike], block: bool = True,
                       timeout: Optional[float] = None, *, atomic: bool = False) -> int:
        """``put_many`` for bytes-like payloads, sent as they are: the fastest
        way to move many small messages (one call, one wake-up). ``atomic``
        as for ``put_many``."""
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if self._auth is not None:
            items = [self._auth.seal(item) for item in items]
        if atomic:
            items = list(items)
            _check_sizes(items, self._ring.max_message_size)
            return self._put_atomic(items, timeout)
        return self._ring.put_many(items, timeout)

    def get_many_bytes(self, max_messages: int = DEFAULT_GET_MANY, block: bool = True,
                       timeout: Optional[float] = None) -> "list[bytes]":
        """``get_many`` returning the payloads as bytes (no deserialization)."""
        _check_int("max_messages", max_messages, 1, 1 << 30)
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if self._auth is None:
            return self._ring.get_many(max_messages, timeout)
        try:
            return self._ring.get_many(max_messages, timeout, self._open_bytes)
        except AuthenticationError as exc:
            self._rejected(exc)

    # ------------------------------------------------------------ inspection

    def qsize(self) -> int:
        """Approximate number of queued messages (works on every platform)."""
        return self._live_ring().qsize()

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        """True when a ``put`` of a small message would block right now
        (approximate, as in the stdlib)."""
        return self._live_ring().full()

    def stats(self) -> "dict[str, Any]":
        """The ring's counters: depth, capacity, enqueued, dequeued,
        bytes_in_use, producers, consumers, redelivered, abandoned,
        dead_lettered, and whatever else the backend reports.

        Read-only: it changes nothing in the queue (parked dead letters stay
        parked for the next ``get_message``, and no dead-letter queue is
        created), so ``fastmq stat``/``fastmq ls`` can inspect any queue."""
        ring = self._live_ring()
        stats = dict(ring.stats())
        stats["rejected"] = _auth.rejected(ring)   # failed authentication (authkey=)
        durable = getattr(ring, "durable_info", None)
        info = durable() if durable is not None else None
        if info is not None:                # file:// queues: sync mode, last recovery
            stats.update(info)
        return stats

    def flush(self) -> None:
        """Durable queues: put everything committed so far on stable storage
        now, whatever the sync mode (``sync="none"`` and ``"interval"`` users
        call it at their own checkpoints). ``ValueError`` on other queues."""
        ring = self._live_ring()
        if getattr(ring, "path", None) is None:
            raise ValueError("flush() applies to durable queues only (url=\"file:///dir\")")
        ring.flush()

    # ------------------------------------------------------------- zero-copy

    def reserve(self, nbytes: int, timeout: Optional[float] = None) -> "_ReservationContext":
        """``with q.reserve(n) as buf:`` -- a writable memoryview of ``n`` bytes
        in the queue, published on normal exit, discarded on an exception.
        Consumers read it with ``get_bytes()``/``recv()``. Bad sizes raise here,
        before the ``with`` block; the space is claimed on entering it."""
        _check_int("nbytes", nbytes, 0, MAX_MESSAGE_SIZE)
        ring = self._live_ring()
        extra = 0 if self._auth is None else _auth.OVERHEAD
        if nbytes + extra > ring.max_message_size:
            raise MessageTooLarge(f"reservation of {nbytes + extra} bytes exceeds this queue's "
                                  f"max_message_size of {ring.max_message_size} bytes")
        return _ReservationContext(ring, nbytes, _timeout(True, timeout), self._auth)

    def reserve_array(self, shape, dtype, *, timeout=None):
        """A numpy array living in the queue's memory; publish it with
        ``commit(arr)``. Consumers ``get()`` it back as an ndarray.
        ``Full`` if no room within ``timeout`` (default: wait)."""
        timeout = _timeout(True, timeout)
        np = _numpy()
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise TypeError(f"reserve_array needs a dtype without Python objects, not {dtype}")
        prefix, total, offset, shape, count = _serialize.array_frame(np, shape, dtype)
        extra = 0 if self._auth is None else _auth.OVERHEAD   # the tag, written at commit
        reservation = self._live_ring().reserve(total + extra, timeout)
        try:
            view = reservation.view
            view[extra:extra + offset] = prefix
            # frombuffer, not np.ndarray(buffer=view): the array must hold the
            # view (its export of the reservation), not just the reservation,
            # or commit() would give the block back under a live array.
            arr = np.frombuffer(view, dtype, count, extra + offset).reshape(shape)
        except BaseException:
            reservation.abort()
            raise
        key = id(arr)
        # A forgotten array gives its space back when it dies: the weak
        # reference's callback (weak to the handle too: a forgotten array must
        # not keep the handle, and segment, alive). commit() drops the weak
        # reference with the entry, so a committed array's death costs nothing.
        died = weakref.ref(arr, functools.partial(_abandon_array, weakref.ref(self), key))
        with self._lock:
            self._reserved_arrays[key] = (reservation, died)
        return arr

    def commit(self, arr):
        """Publish an array from ``reserve_array``; it becomes read-only."""
        with self._lock:
            entry = self._reserved_arrays.get(id(arr))
            if entry is not None and entry[1]() is arr:
                del self._reserved_arrays[id(arr)]
            else:
                entry = None
        if entry is None:
            raise ValueError("commit() takes an array returned by this queue's "
                             "reserve_array() that was not committed yet")
        reservation = entry[0]
        arr.flags.writeable = False
        if self._auth is not None:
            self._auth.sign_in_place(reservation.view)
        reservation.commit()

    def recv(self, timeout: Optional[float] = None) -> "Received":
        """``with q.recv() as msg:`` -- ``msg.data`` is a read-only memoryview
        of the next message in shared memory, pinned while any view of it lives."""
        timeout = _timeout(True, timeout)
        lease = self._live_ring().recv(timeout)
        if self._auth is None:
            return Received(lease)
        checked = self._auth.verify_view(lease.view)   # before it is handed out
        if checked.__class__ is _auth.Rejected:
            lease.close()
            self._rejected(checked.error)
        return Received(lease, checked[1])

    # ------------------------------------------- at-least-once (see acks.py)
    #
    # Every method of this block delegates to ``fastmq.acks``; the per-handle
    # state (in-flight count, dead-letter queue handle) lives in ``_acks_state``,
    # created on first use.

    @property
    def _acks(self):
        state = self.__dict__.get("_acks_state")
        if state is None:
            state = self.__dict__.setdefault("_acks_state", acks.Acks(self))
        return state

    @property
    def max_in_flight(self) -> int:
        """Most un-acked leased messages this handle may hold (default
        10,000); beyond it ``get_message``/``get_messages`` raise
        ``fastmq.TooManyInFlight`` (they never block on it). Settable."""
        return self._acks.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value):
        self._acks.max_in_flight = acks.check_max_in_flight(value)

    @property
    def in_flight(self) -> int:
        """Un-acked messages this handle (in this process) holds."""
        return self._acks.in_flight

    def get_message(self, block=True, timeout=None, lease=acks.DEFAULT_LEASE):
        """Lease the next message -> ``fastmq.Message`` (at-least-once).

        The message is not consumed until ``msg.ack()``: if the lease
        (``lease`` seconds) runs out first, or this process dies, it goes back
        to the BACK of the queue with ``delivery_count + 1``. ``Empty`` as for
        ``get``; ``TooManyInFlight`` when this handle already holds
        ``max_in_flight`` un-acked messages.
        """
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if lease.__class__ is not float or not 0.0 < lease <= acks.MAX_LEASE:
            lease = acks.check_lease(lease)
        state = self.__dict__.get("_acks_state") or self._acks
        return state.get_messages(self._live_ring(), 1, timeout, lease)[0]

    def get_messages(self, max_messages=acks.DEFAULT_GET_MESSAGES, block=True,
                     timeout=None, lease=acks.DEFAULT_LEASE) -> list:
        """Batch form of ``get_message``: at least one leased message
        (``Empty`` where ``get`` would raise), at most ``max_messages``
        (fewer if the in-flight bound leaves less room), without waiting for
        more once one is available. Each has its own lease."""
        # Validation inlined for the common arguments: this is a hot path.
        if max_messages.__class__ is not int or not 1 <= max_messages <= 1 << 30:
            _check_int("max_messages", max_messages, 1, 1 << 30)
        if not block or timeout is not None:
            timeout = _timeout(block, timeout)
        if lease.__class__ is not float or not 0.0 < lease <= acks.MAX_LEASE:
            lease = acks.check_lease(lease)
        state = self.__dict__.get("_acks_state") or self._acks
        return state.get_messages(self._live_ring(), max_messages, timeout, lease)

    def ack_many(self, messages) -> int:
        """Ack several leased messages in one call; returns how many were
        acked now. Unlike ``Message.ack()``, a lost lease is not an exception
        here: that message is simply not counted (it was or will be
        redelivered). Messages already acked are skipped (not counted)."""
        state = self.__dict__.get("_acks_state") or self._acks
        return state.ack_many(self._live_ring(), messages)

    def pending(self) -> list:
        """In-flight (leased, un-acked) messages of the whole queue, as dicts:
        ``id``, ``pid`` (holder; 0 if none), ``idle`` (seconds since
        leased), ``delivery_count``, ``orphaned`` (no live consumer holds
        it: it is coming back to the queue), ``dead_letter`` (waiting for,
        or being forwarded to, the dead-letter queue), plus ``token`` and
        ``expires_in`` (negative once expired; None for a dead letter).
        Read-only: it redelivers nothing (``redeliver_expired()`` does)."""
        return acks.pending(self._acks, self._live_ring())

    def redeliver_expired(self) -> int:
        """Requeue now every expired lease and every lease of a dead
        consumer (normally done by the next ``get_message``); returns how
        many."""
        ring = self._live_ring()
        n = ring.redeliver_due()
        self._acks.forward_dead_letters(ring, force=True)
        return n

    # ------------------------------------------- asyncio (see asyncio_support)
    #
    # Each tries the operation without blocking; if it would block, the
    # coroutine parks while a waiter thread sleeps in the ring's wait for it.
    # Waiting takes nothing, so a cancelled (or timed-out) await loses nothing.

    async def get_async(self, timeout=None):
        """``get()`` for asyncio: await the next object (``Empty`` after
        ``timeout`` seconds; None waits forever). An idle await costs no CPU."""
        timeout = _timeout(True, timeout)
        return await asyncio_support.call(self, lambda: self.get(block=False), False, timeout)

    async def put_async(self, obj, timeout=None):
        """``put()`` for asyncio: await room for ``obj`` (``Full`` after
        ``timeout`` seconds; None waits forever)."""
        timeout = _timeout(True, timeout)
        try:
            return self.put(obj, block=False)
        except Full:
            if timeout == 0:
                raise
        # Serialized once, here: retries must not pickle again, and the wait
        # needs the size to wait for room that fits.
        payload = self._encode(obj)
        ring = self._live_ring()
        return await asyncio_support.call(self, lambda: ring.put(payload, 0), True, timeout,
                                          len(payload))

    async def get_many_async(self, max_messages=DEFAULT_GET_MANY, timeout=None) -> list:
        """``get_many()`` for asyncio: at least one object, at most
        ``max_messages``, without waiting for more once one is available."""
        _check_int("max_messages", max_messages, 1, 1 << 30)
        timeout = _timeout(True, timeout)
        return await asyncio_support.call(
            self, lambda: self.get_many(max_messages, block=False), False, timeout)

    async def get_message_async(self, timeout=None, lease=acks.DEFAULT_LEASE):
        """``get_message()`` for asyncio: await the next message, leased
        (ack it when done; see ``get_message``)."""
        timeout = _timeout(True, timeout)
        lease = acks.check_lease(lease)
        return await asyncio_support.call(
            self, lambda: self.get_message(block=False, lease=lease), False, timeout)


class _ReservationContext:
    """What ``Queue.reserve`` returns: claims the space on ``__enter__``."""

    __slots__ = ("_ring", "_nbytes", "_timeout", "_reservation", "_auth", "_view")

    def __init__(self, ring, nbytes, timeout, auth=None):
        self._ring, self._nbytes, self._timeout = ring, nbytes, timeout
        self._reservation = None
        self._auth, self._view = auth, None

    def __enter__(self) -> memoryview:
        if self._reservation is not None:
            raise RuntimeError("a reserve() context can be entered only once")
        if self._auth is None:
            self._reservation = self._ring.reserve(self._nbytes, self._timeout)
            return self._reservation.view
        # Room for the tag in front; the user writes after it, and the tag
        # is computed over what they wrote when the block exits.
        self._reservation = self._ring.reserve(self._nbytes + _auth.OVERHEAD, self._timeout)
        self._view = memoryview(self._reservation.view)
        return self._view[_auth.OVERHEAD:]

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: object) -> None:
        if exc_type is None:
            if self._auth is not None:
                self._auth.sign_in_place(self._view)
            self._reservation.commit()
        else:
            self._reservation.abort()


class Received:
    """One message received with ``Queue.recv``.

    ``data`` is a read-only memoryview of the message. Leaving the ``with``
    block releases it once no view derived from ``data`` is alive (deferred,
    never an error); ``release()`` releases it now and raises ``BufferError``
    while such views are alive.
    """

    __slots__ = ("_view", "_data")

    def __init__(self, view, data=None):
        self._view = view             # the ring's ReceivedView (not a lease: nothing to ack)
        self._data = data             # the checked payload, past the tag (authkey=)

    @property
    def data(self) -> memoryview:
        return self._view.view if self._data is None else self._data

    @property
    def nbytes(self) -> int:
        return self._view.nbytes if self._data is None else self._data.nbytes

    def release(self) -> None:
        data = self._data
        if data is not None:
            data.release()            # our own slice; views derived from it keep it
        self._view.release()

    def __enter__(self) -> "Received":
        return self

    def __exit__(self, *exc: object) -> None:
        data = self._data
        if data is not None:
            try:
                data.release()
            except BufferError:
                pass                  # views of it live on; closing defers to them
        self._view.close()


# ------------------------------------------------------------------- helpers

def _backend_resolve(name):
    if name is not None and name not in _backend.BACKENDS:
        raise ValueError(f"unknown fastmq backend {name!r}; expected one of "
                         f"{_backend.BACKENDS}")
    return _backend.resolve(name)


def _check_sizes(payloads, limit):
    for payload in payloads:
        n = memoryview(payload).nbytes
        if n > limit:
            raise MessageTooLarge(f"message of {n} bytes exceeds this queue's "
                                  f"max_message_size of {limit} bytes; nothing was sent")


def _abandon_array(queue_ref, key, died=None):
    """An array from reserve_array died uncommitted: give its space back
    (``died``: its weak reference, which calls this)."""
    queue = queue_ref()
    if queue is None:
        return
    with queue._lock:
        entry = queue._reserved_arrays.get(key)
        if entry is None or (died is not None and entry[1] is not died):
            return                   # not this array's entry (committed, or a newer one)
        del queue._reserved_arrays[key]
    reservation = entry[0]
    if reservation is not None:
        try:
            reservation.abort()
        except Exception:
            pass


def _numpy():
    try:
        import numpy
    except ImportError:
        raise ImportError("reserve_array needs numpy: pip install numpy") from None
    return numpy


def _remove_dead_creators_files(path):
    """A creator killed before it linked the file into place leaves its
    temporary file (``<file>.tmp-<pid>-<random>``): removed once that pid is
    gone. A live creator's file is never touched."""
    directory, base = os.path.split(path)
    prefix = base + ".tmp-"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for entry in names:
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix):].split("-", 1)[0])
            os.kill(pid, 0)
            continue                      # its creator is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue                      # not ours to judge
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


def _durable_backend(name, url):
    """Durable queues live in the native core only: the pure backend would
    need a second implementation of the flush protocol and of the recovery
    scan (the crash-critical part), and could not share the files anyway
    (its layout differs). So it is a typed error that says what to do."""
    # As on redis://, the url picks the location and _backend= is not used to
    # choose anything else; only a pure ring (asked for, or the default) is refused.
    backend, module = _backend.resolve("pure" if name == "pure" else None)
    if backend != "native":
        raise NotImplementedError(
            f"durable queues ({_location.mask(url)!r}) need fastmq's native backend (the C "
            "core); this process uses the pure-Python one -- install a fastmq wheel for this "
            "platform (or build it with a C compiler) and unset FASTMQ_BACKEND=pure")
    return backend, module


def _reopen(segment, anonymous, serializer, backend, authkey=None, path=None):
    """Unpickle a handle: open its segment (or its durable file) in this process."""
    module = _backend.ring_module(backend)
    try:
        ring = module.Ring.open(segment) if path is None else module.Ring.open(segment,
                                                                                path=path)
    except QueueNotFound:
        what = "anonymous queue" if anonymous else f"queue {_names.queue_name_of(segment)!r}"
        raise QueueNotFound(f"cannot unpickle fastmq handle: the {what} no longer "
                            "exists (every open handle to it was closed)") from None
    return Queue._from_ring(ring, backend, _names.queue_name_of(segment), serializer, authkey)
