"""``fastmq.Exchange``: routing one published message to named queues.

An exchange is a small file in /dev/shm (``fastmq-x-<name>``) that holds its
kind and its bindings, so a binding made in one process is used by
``publish`` in every process. ``publish`` serializes the object once and puts
the same bytes on each queue it routes to, with the queue's default
serialization (consumers use ``get()`` as usual).

Kinds:

* ``direct`` -- the queues bound with exactly the published key;
* ``topic`` -- binding keys are patterns over words separated by ".": ``*``
  matches one word, ``#`` zero or more (``stock.#`` matches ``stock``);
* ``fanout`` -- every bound queue;
* ``hash`` -- one queue, chosen by a stable hash (CRC-32) of the key among
  the bound queues in name order: the same key goes to the same queue while
  the bindings stay the same, so per-key order holds;
* ``round_robin`` -- one queue, in turn; the turn is a counter in the file,
  so it is shared by every publishing process;
* ``random`` -- one queue, at random.

A queue matched by several bindings gets one copy and counts once. A bound
queue that was unlinked since is skipped (not counted).

The file. A 64-byte header -- magic, version, round-robin counter, and the
offset and length of the JSON body (kind and bindings) -- then the body.
Writers (create/bind/unbind) hold an exclusive ``flock``, write the new body
where it does not overlap the current one and then the header in one
``pwrite``, so a writer killed at any point leaves the previous bindings
intact. Publishers read the header under a shared ``flock`` and re-read the
body only when the version changed. ``flock`` does not exclude threads that
share a handle's file descriptor, so each handle also has a thread lock.
"""
from __future__ import annotations

import json
import mmap
import os
import random
import secrets
import struct
import threading
import zlib
from multiprocessing.context import get_spawning_popen

from . import _auth, _lifetime, _location, _names, _serialize
from ._pure import portable
from .errors import CorruptQueue, Full, QueueClosed, QueueExists, QueueNotFound

__all__ = ["Exchange", "KINDS"]

KINDS = ("direct", "fanout", "topic", "hash", "round_robin", "random")
PREFIX = "fastmq-x-"
TMP_PREFIX = "fastmq-xtmp-"             # an exchange being created (see create)
SHM_DIR = _lifetime.SHM_DIR      # beside the pure backend's files (FASTMQ_SHM_DIR)
LOCK_SH, LOCK_EX = portable.flock_shared_wait, portable.flock_exclusive  # flock(2)

_MAGIC = b"FMQEXCH1"
_HEADER = struct.Struct("<8sQQQQ")      # magic, version, turn, body offset, body length
_HEADER_SIZE = 64
_VERSION = struct.Struct("<Q")
_MAX_BODY = 16 << 20                    # a sanity bound for a corrupted length


def _path(name):
    return os.path.join(SHM_DIR, PREFIX + _names.validate_name(name))


def _check_key(key):
    if not isinstance(key, str):
        raise TypeError(f"routing key must be a str, not {type(key).__name__}")
    return key


def _check_pattern(pattern):
    """A topic binding: words separated by '.', each non-empty."""
    _check_key(pattern)
    if pattern and any(w == "" for w in pattern.split(".")):
        raise ValueError(f"invalid topic pattern {pattern!r}: empty word "
                         "(words are separated by single dots)")
    return pattern


def topic_matches(pattern, key):
    """Does the topic ``pattern`` match the routing ``key``? ('*' one word,
    '#' zero or more words)."""
    p = pattern.split(".") if pattern else []
    k = key.split(".") if key else []
    # reach[j]: the first i pattern words can match the first j key words
    reach = [True] + [False] * len(k)
    for word in p:
        if word == "#":
            for j in range(1, len(k) + 1):
                reach[j] = reach[j] or reach[j - 1]
        else:
            for j in range(len(k), 0, -1):
                reach[j] = reach[j - 1] and (word == "*" or word == k[j - 1])
            reach[0] = False
    return reach[len(k)]


class Exchange:
    """A handle on a named exchange (see the module doc)."""

    def __init__(self, *_args, **_kwargs):
        raise TypeError("use fastmq.Exchange.create(name, kind) or fastmq.Exchange.open(name)")

    # ---------------------------------------------------------------- lifetime

    @classmethod
    def _new(cls, name, fd, backend):
        self = object.__new__(cls)
        self.name = name
        self._fd = fd
        self._backend = backend
        self._rlock = threading.RLock()
        self._generation = _lifetime.fork_generation
        self._version = None
        self._kind = None
        self._bindings = []              # [(queue, key)] as stored
        self._routes = {}                # key -> [queue names], for this version
        self._queues = {}                # queue name -> open Queue
        self._hdr = None                 # read-only map of the header
        self._closing = False            # close() has begun (read without the lock)
        return self

    @property
    def _lock(self):
        """The handle's thread lock (the file lock's partner, see _FileLock),
        after making the handle this process's own if it was inherited."""
        if self._generation != _lifetime.fork_generation:
            self._after_fork()
        return self._rlock

    def _after_fork(self):
        """First use in a forked child. The parent's thread lock may be held
        by a parent thread the child does not have (a publish waiting on a full
        queue): take a new one. The descriptor shares the parent's open file
        description, and flock belongs to the description: our LOCK_EX would
        not exclude the parent, our LOCK_UN would drop the parent's lock, and
        if the parent died holding it, our inherited mapping of the header
        (a mapping refers to its description too) would keep it held. So the
        child gets its own description of the same file, and maps it anew."""
        self._generation = _lifetime.fork_generation
        self._rlock = threading.RLock()
        if self._fd is None:
            return
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.dup2(fd, self._fd, inheritable=False)
        finally:
            os.close(fd)
        if self._hdr is not None:
            self._hdr.close()
            self._hdr = None
            self._map_header()

    def _map_header(self):
        if os.fstat(self._fd).st_size < _HEADER_SIZE:
            raise CorruptQueue(f"exchange {self.name!r}: the file is truncated "
                               "(or its creator died before writing it)")
        self._hdr = mmap.mmap(self._fd, _HEADER_SIZE, prot=mmap.PROT_READ)

    @classmethod
    def create(cls, name, kind, *, exist_ok=False, authkey=None, _backend=None, url=None):
        """Create the exchange ``name`` of ``kind`` (one of KINDS).
        ``QueueExists`` if it exists, unless ``exist_ok`` and of the same kind.
        ``authkey``: the key of the bound queues that use one (``Queue``'s
        ``authkey``): publish signs each message with it (shared memory)."""
        authkey = _auth.check_authkey(authkey)
        impl = _location.exchange_class(url)
        if impl is not None:
            _auth.only_in_shared_memory(authkey, url)
            return impl.create(name, kind, url=url, exist_ok=exist_ok)
        if kind not in KINDS:
            raise ValueError(f"unknown exchange kind {kind!r}; expected one of {', '.join(KINDS)}")
        path = _path(name)
        # Written complete under a temporary name, then linked into place
        # (which fails if the name exists): an opener never sees a half-made
        # exchange, and a creator killed half-way leaves no exchange at all.
        tmp = os.path.join(SHM_DIR, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self = cls._new(name, fd, _backend)
        self._authkey = authkey
        try:
            self._write_body(0, {"kind": kind, "bindings": []}, turn=0, current=None)
            os.link(tmp, path)
        except FileExistsError:
            self.close()
            if not exist_ok:
                raise QueueExists(f"exchange {name!r} already exists "
                                  "(pass exist_ok=True to open it)") from None
            ex = cls.open(name, authkey=authkey, _backend=_backend)
            if ex.kind != kind:
                ex.close()
                raise ValueError(f"exchange {name!r} exists with kind {ex.kind!r}, "
                                 f"not {kind!r}") from None
            return ex
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(tmp)
        self._map_header()
        self._refresh()
        return self

    @classmethod
    def open(cls, name, *, authkey=None, _backend=None, url=None):
        """Open an existing exchange; ``FileNotFoundError`` (``QueueNotFound``)
        if there is none of that name. ``authkey`` as for ``create``."""
        authkey = _auth.check_authkey(authkey)
        impl = _location.exchange_class(url)
        if impl is not None:
            _auth.only_in_shared_memory(authkey, url)
            return impl.open(name, url=url)
        try:
            fd = os.open(_path(name), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise QueueNotFound(f"no fastmq exchange named {name!r} "
                                f"(create it with fastmq.Exchange.create)") from None
        self = cls._new(name, fd, _backend)
        self._authkey = authkey
        self._map_header()
        self._refresh()
        return self

    @staticmethod
    def unlink(name, *, url=None):
        """Remove the exchange ``name`` (open handles keep working on it)."""
        impl = _location.exchange_class(url)
        if impl is not None:
            return impl.unlink(name, url=url)
        try:
            os.unlink(_path(name))
        except FileNotFoundError:
            raise QueueNotFound(f"no fastmq exchange named {name!r}") from None

    @staticmethod
    def list_names(shm_dir=SHM_DIR):
        """Names of the exchanges on this host."""
        try:
            entries = os.listdir(shm_dir)
        except OSError:
            return []
        return sorted(e[len(PREFIX):] for e in entries if e.startswith(PREFIX))

    def close(self):
        # A publish blocked on a full queue holds self._lock for as long as it
        # waits: close the queues first, without the lock, so that its put
        # raises QueueClosed and the lock comes free.
        self._closing = True
        for q in list(self._queues.values()):
            q.close()
        with self._lock:
            queues, self._queues = self._queues, {}
            if self._hdr is not None:
                self._hdr.close()
                self._hdr = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        for q in queues.values():
            q.close()

    @property
    def closed(self):
        return self._fd is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass

    def __reduce__(self):
        # The authkey only while spawning a multiprocessing child (see Queue).
        if getattr(self, "_authkey", None) and get_spawning_popen() is not None:
            return (_reopen, (self.name, self._backend, self._authkey))
        return (_reopen, (self.name, self._backend))

    def __repr__(self):
        state = "closed" if self.closed else self._kind
        return f"<fastmq.Exchange name={self.name!r} {state}>"

    # -------------------------------------------------------------- the file

    def _locked(self, how):
        return _FileLock(self, how)

    def _read_header(self):
        raw = os.pread(self._fd, _HEADER.size, 0)
        if len(raw) != _HEADER.size:
            raise CorruptQueue(f"exchange {self.name!r}: the file is truncated")
        magic, version, turn, offset, length = _HEADER.unpack(raw)
        if magic != _MAGIC or offset < _HEADER_SIZE or length > _MAX_BODY:
            raise CorruptQueue(f"exchange {self.name!r}: not a valid exchange file")
        return version, turn, offset, length

    def _refresh(self):
        """Re-read kind and bindings if another handle changed them. The
        common case -- nothing changed -- is one load from the mapped header,
        no lock and no system call: a writer publishes a change by writing
        the header last, so a stale version only means routing as just before
        the change (which had not completed yet)."""
        hdr = self._hdr
        if hdr is not None and _VERSION.unpack_from(hdr, 8)[0] == self._version:
            return
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self):
        with self._locked(LOCK_SH):
            version, _, offset, length = self._read_header()
            if version == self._version:
                return
            kind, bindings = self._read_body(offset, length)
        self._kind, self._bindings = kind, bindings
        self._routes = {}
        self._version = version

    def _read_body(self, offset, length):
        """(kind, [(queue, key)]) from the body the header points at."""
        try:
            body = json.loads(os.pread(self._fd, length, offset))
            kind, bindings = body["kind"], [(str(q), str(k)) for q, k in body["bindings"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptQueue(f"exchange {self.name!r}: unreadable bindings ({exc})") from None
        if kind not in KINDS:
            raise CorruptQueue(f"exchange {self.name!r}: unknown kind {kind!r}")
        return kind, bindings

    def _write_body(self, version, body, turn, current):
        """Write ``body`` clear of the ``current`` (offset, length), then the
        header that points at it: a crash before the header leaves the old
        bindings in force. Then, if it had to go after the current body, write
        it again at the front (clear of the copy just published) so the file
        does not grow with every change."""
        raw = json.dumps(body, separators=(",", ":")).encode()
        offset = _HEADER_SIZE
        if current is not None and offset + len(raw) > current[0]:
            offset = current[0] + current[1]
        self._point_to(raw, offset, version + 1, turn)
        if offset >= _HEADER_SIZE + len(raw) and offset > _HEADER_SIZE:
            self._point_to(raw, _HEADER_SIZE, version + 2, turn)
            os.ftruncate(self._fd, _HEADER_SIZE + len(raw))

    def _point_to(self, raw, offset, version, turn):
        os.pwrite(self._fd, raw, offset)
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, version, turn, offset, len(raw)), 0)

    def _change(self, edit):
        """Apply ``edit(bindings) -> bindings`` under the exclusive lock."""
        with self._locked(LOCK_EX):
            version, turn, offset, length = self._read_header()
            self._version = None                     # re-read below, in any case
            kind, bindings = self._read_body(offset, length)
            new = edit(bindings)
            if new != bindings:
                self._write_body(version, {"kind": kind, "bindings": [list(b) for b in new]},
                                 turn, (offset, length))
        self._refresh()

    # -------------------------------------------------------------- bindings

    @property
    def kind(self):
        return self._kind

    def bind(self, queue_name, key=""):
        """Route messages to the named queue (which must exist): ``key`` is
        the exact key (direct) or a pattern (topic); other kinds ignore it."""
        _names.validate_name(queue_name)
        self._refresh()
        key = _check_pattern(key) if self._kind == "topic" else _check_key(key)
        if self._kind not in ("direct", "topic"):
            key = ""
        if not self._queue_exists(queue_name):
            raise QueueNotFound(f"cannot bind queue {queue_name!r} to exchange "
                                f"{self.name!r}: no such queue (create it first)")
        self._change(lambda bs: bs if (queue_name, key) in bs else bs + [(queue_name, key)])

    def unbind(self, queue_name, key=""):
        """Remove a binding (no error if there is none)."""
        _names.validate_name(queue_name)
        _check_key(key)
        self._refresh()
        if self._kind not in ("direct", "topic"):
            key = ""
        self._change(lambda bs: [b for b in bs if b != (queue_name, key)])

    def bindings(self):
        """[(queue name, key)] in the order they were made."""
        self._refresh()
        return list(self._bindings)

    # -------------------------------------------------------------- routing

    def _targets(self, key):
        """The queue names ``key`` routes to (before choosing one, for the
        kinds that deliver to one)."""
        routes = self._routes.get(key)
        if routes is None:
            kind = self._kind
            if kind == "direct":
                hit = [q for q, k in self._bindings if k == key]
            elif kind == "topic":
                hit = [q for q, k in self._bindings if topic_matches(k, key)]
            else:
                hit = sorted(q for q, _ in self._bindings)
            routes = list(dict.fromkeys(hit))       # one copy per queue, first match order
            if len(self._routes) > 4096:
                self._routes.clear()
            self._routes[key] = routes
        kind = self._kind
        if not routes or kind in ("direct", "topic", "fanout"):
            return routes
        if kind == "hash":
            return [routes[zlib.crc32(key.encode()) % len(routes)]]
        if kind == "random":
            return [random.choice(routes)]
        return [routes[self._next_turn() % len(routes)]]   # round_robin

    def _next_turn(self):
        with self._locked(LOCK_EX):
            version, turn, offset, length = self._read_header()
            os.pwrite(self._fd, _HEADER.pack(_MAGIC, version, turn + 1, offset, length), 0)
        return turn

    def _queue_exists(self, name):
        try:
            self._open_queue(name)
            return True
        except QueueNotFound:
            return False

    def _open_queue(self, name):
        q = self._queues.get(name)
        if q is None:
            from .queue import Queue
            q = self._queues[name] = Queue.open(name, _backend=self._backend,
                                                authkey=getattr(self, "_authkey", None))
        return q

    def publish(self, obj, key="", timeout=None) -> int:
        """Send ``obj`` to every queue ``key`` routes to; returns how many
        got it. Waits up to ``timeout`` (None: forever) for room in each; a
        queue still full then raises ``Full``, saying how many got it before."""
        _check_key(key)
        return self._send(_serialize.encode(obj), key, timeout)

    def publish_many(self, items, key=""):
        """Publish each item: an object (routed with ``key``), or, when
        ``key`` is empty, a ``(key, obj)`` pair -- a 2-tuple whose first
        element is a str. Returns the total number of deliveries."""
        _check_key(key)
        total = 0
        for item in items:
            k = key
            if not key and type(item) is tuple and len(item) == 2 and isinstance(item[0], str):
                k, item = item
            total += self._send(_serialize.encode(item), k, None)
        return total

    def _send(self, payload, key, timeout):
        with self._lock:
            if self._fd is None:
                raise QueueClosed(f"exchange {self.name!r} handle is closed")
            self._refresh()
            targets = self._targets(key)
            delivered = 0
            for name in targets:
                if self._closing:
                    raise QueueClosed(f"exchange {self.name!r} handle was closed while "
                                      f"publishing; the message went to {delivered} of "
                                      f"{len(targets)} queue(s)")
                try:
                    q = self._open_queue(name)
                except QueueNotFound:
                    continue                          # unlinked since it was bound
                if q.closed:
                    self._queues.pop(name, None)
                    continue
                try:
                    q.put_bytes(payload, timeout=timeout)
                except Full:
                    raise Full(f"exchange {self.name!r}: queue {name!r} stayed full; the "
                               f"message went to {delivered} of {len(targets)} queue(s) "
                               "before it") from None
                delivered += 1
            return delivered


class _FileLock:
    """``flock`` on the exchange file (between processes) and the handle's
    re-entrant thread lock (between its threads, which share the descriptor,
    so ``flock`` alone would not keep them apart)."""

    __slots__ = ("_ex", "_how")

    def __init__(self, ex, how):
        self._ex, self._how = ex, how

    def __enter__(self):
        ex = self._ex
        ex._lock.acquire()
        try:
            if ex._fd is None:
                raise QueueClosed(f"exchange {ex.name!r} handle is closed")
            self._how(ex._fd)
        except BaseException:
            ex._lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            portable.funlock(self._ex._fd)
        finally:
            self._ex._lock.release()


def _reopen(name, backend, authkey=None):
    return Exchange.open(name, _backend=backend, authkey=authkey)
