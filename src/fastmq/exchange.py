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
queue that was unlinked since is skipped (not counted); one that was removed
and created again gets the messages published from _RECHECK seconds after
(a publisher checks that each queue name still refers to the segment it has
open at most that often). ``publish(..., mandatory=True)`` raises
``Unroutable`` instead of returning 0 when no queue took the message.

The file. A 64-byte header -- magic, version, round-robin counter, and the
offset and length of the JSON body (kind and bindings) -- then the body.
Writers (create/bind/unbind) hold an exclusive ``flock``, write the new body
where it does not overlap the current one and then the header in one
``pwrite``, so a writer killed at any point leaves the previous bindings
intact. Publishers read the header under a shared ``flock`` and re-read the
body only when the version changed. ``flock`` does not exclude threads that
share a handle's file descriptor, so each handle also has a thread lock.

Creating: the file is written complete under a temporary name
(``fastmq-xtmp-<pid>-<random>``, held with ``flock``) and linked into place;
``fastmq.cleanup()`` removes the temporary file of a creator that died. The
name is opened with ``O_NOFOLLOW`` and must be a regular file, so a symlink
planted there is refused, never written through.

Trust. Whoever can write the file can change the routing; what it cannot do
is crash a publisher: the file is only ever read with ``pread`` (never
mapped, so truncating it cannot raise SIGBUS), and every field and the body
are validated, so a damaged file raises ``CorruptQueue``.
"""
from __future__ import annotations

import errno
import json
import os
import random
import stat
import struct
import threading
import time
import zlib
from multiprocessing.context import get_spawning_popen

from . import _auth, _lifetime, _location, _names, _serialize
from ._pure import portable
from .errors import (CorruptQueue, Full, QueueClosed, QueueExists, QueueNotFound,
                     Unroutable)

__all__ = ["Exchange", "KINDS"]

KINDS = ("direct", "fanout", "topic", "hash", "round_robin", "random")
PREFIX = "fastmq-x-"
TMP_PREFIX = _lifetime.EXCHANGE_TMP_PREFIX   # an exchange being created (see create)
SHM_DIR = _lifetime.SHM_DIR      # beside the pure backend's files (FASTMQ_SHM_DIR)
LOCK_SH, LOCK_EX = portable.flock_shared_wait, portable.flock_exclusive  # flock(2)

_MAGIC = b"FMQEXCH1"
_HEADER = struct.Struct("<8sQQQQ")      # magic, version, turn, body offset, body length
_HEADER_SIZE = 64
_VERSION = struct.Struct("<Q")
_MAX_BODY = 16 << 20                    # a sanity bound for a corrupted length
_MAX_OFFSET = 1 << 32                   # likewise for a corrupted offset
_U64 = (1 << 64) - 1
_RECHECK = 0.02                         # seconds between checks of cached queues
_pread = os.pread
_monotonic = time.monotonic


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
        self._version_raw = None         # _VERSION.pack(_version): the fast check
        self._kind = None
        self._bindings = []              # [(queue, key)] as stored
        self._routes = {}                # key -> [queue names], for this version
        self._queues = {}                # queue name -> open Queue
        self._closing = False            # close() has begun (read without the lock)
        self._idents = {}                # queue name -> (dev, ino) its name had
        self._checked = time.monotonic()  # when _idents were last compared
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
        not exclude the parent, and our LOCK_UN would drop the parent's lock.
        So the child gets its own description of the same file."""
        self._generation = _lifetime.fork_generation
        self._rlock = threading.RLock()
        if self._fd is None:
            return
        fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.dup2(fd, self._fd, inheritable=False)
        finally:
            os.close(fd)

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
        # exchange, and a creator killed half-way leaves only the temporary
        # file, which cleanup() removes (it is locked while we live).
        tmp, fd = _lifetime.create_temp(0o600, TMP_PREFIX)
        self = cls._new(name, fd, _backend)
        self._authkey = authkey
        try:
            self._write_body(0, {"kind": kind, "bindings": []}, turn=0, current=None)
            os.link(tmp, path)
            portable.funlock(fd)
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
            # O_NOFOLLOW: never write through a symlink planted under the
            # name; O_NONBLOCK: never hang on a FIFO planted there.
            fd = os.open(_path(name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise QueueNotFound(f"no fastmq exchange named {name!r} "
                                f"(create it with fastmq.Exchange.create)") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptQueue(f"exchange {name!r} is a symbolic link, not an "
                                   "exchange file") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptQueue(f"exchange {name!r} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        self = cls._new(name, fd, _backend)
        self._authkey = authkey
        try:
            self._refresh()
        except BaseException:
            self.close()
            raise
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
            self._idents = {}
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
        if magic != _MAGIC or not _HEADER_SIZE <= offset <= _MAX_OFFSET \
                or not 0 < length <= _MAX_BODY:
            raise CorruptQueue(f"exchange {self.name!r}: not a valid exchange file")
        return version, turn, offset, length

    def _refresh(self):
        """Re-read kind and bindings if another handle changed them. The
        common case -- nothing changed -- is one ``pread`` of the version, no
        lock: a writer publishes a change by writing the header last, so a
        stale version only means routing as just before the change (which had
        not completed yet). Not a mapping: a truncated file is a short read
        here (then CorruptQueue below), where a mapping would be a SIGBUS."""
        fd = self._fd
        if fd is not None:
            raw = _pread(fd, 16, 0)
            if raw[8:] == self._version_raw:
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
        self._version_raw = _VERSION.pack(version)

    def _read_body(self, offset, length):
        """(kind, [(queue, key)]) from the body the header points at."""
        raw = os.pread(self._fd, length, offset)
        if len(raw) != length:
            raise CorruptQueue(f"exchange {self.name!r}: the file is truncated")
        try:
            body = json.loads(raw)
            kind, stored = body["kind"], body["bindings"]
            if not isinstance(kind, str) or not isinstance(stored, list):
                raise TypeError("wrong types")
            bindings = []
            for binding in stored:
                q, k = binding
                if not isinstance(q, str) or not isinstance(k, str):
                    raise TypeError(f"binding {binding!r}")
                bindings.append((_names.validate_name(q), k))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptQueue(f"exchange {self.name!r}: unreadable bindings "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
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
        self._point_to(raw, offset, (version + 1) & _U64, turn)
        if offset >= _HEADER_SIZE + len(raw) and offset > _HEADER_SIZE:
            self._point_to(raw, _HEADER_SIZE, (version + 2) & _U64, turn)
            os.ftruncate(self._fd, _HEADER_SIZE + len(raw))

    def _point_to(self, raw, offset, version, turn):
        os.pwrite(self._fd, raw, offset)
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, version, turn, offset, len(raw)), 0)

    def _change(self, edit):
        """Apply ``edit(bindings) -> bindings`` under the exclusive lock."""
        with self._locked(LOCK_EX):
            version, turn, offset, length = self._read_header()
            self._version = self._version_raw = None   # re-read below, in any case
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

    def _binding_key(self, queue_name, key, *, binding):
        """Check ``queue_name`` and ``key`` for a bind (``binding``: a topic
        exchange takes a pattern, checked once the kind is read) or an unbind
        (a plain key, checked before), reading the bindings afresh; the key as
        a binding stores it: '' for the kinds that ignore keys. Both backends."""
        _names.validate_name(queue_name)
        if not binding:
            _check_key(key)
        self._refresh()
        if binding:
            key = _check_pattern(key) if self._kind == "topic" else _check_key(key)
        if self._kind not in ("direct", "topic"):
            key = ""
        return key

    def bind(self, queue_name, key=""):
        """Route messages to the named queue (which must exist): ``key`` is
        the exact key (direct) or a pattern (topic); other kinds ignore it."""
        key = self._binding_key(queue_name, key, binding=True)
        if not self._queue_exists(queue_name):
            raise QueueNotFound(f"cannot bind queue {queue_name!r} to exchange "
                                f"{self.name!r}: no such queue (create it first)")
        self._change(lambda bs: bs if (queue_name, key) in bs else bs + [(queue_name, key)])

    def unbind(self, queue_name, key=""):
        """Remove a binding (no error if there is none)."""
        key = self._binding_key(queue_name, key, binding=False)
        self._change(lambda bs: [b for b in bs if b != (queue_name, key)])

    def bindings(self):
        """[(queue name, key)] in the order they were made."""
        self._refresh()
        return list(self._bindings)

    # -------------------------------------------------------------- routing

    def _bound_to(self, key):
        """The queue names whose bindings match ``key`` under the cached
        version: each once, in first-match order (fanout: sorted by name);
        kept per key."""
        routes = self._routes.get(key)
        if routes is None:
            kind = self._kind
            if kind == "direct":
                hit = [q for q, k in self._bindings if k == key]
            elif kind == "topic":
                hit = [q for q, k in self._bindings if topic_matches(k, key)]
            else:
                hit = sorted(q for q, _ in self._bindings)
            routes = list(dict.fromkeys(hit))
            if len(self._routes) > 4096:
                self._routes.clear()
            self._routes[key] = routes
        return routes

    def _targets(self, key):
        """The queue names a message with ``key`` goes to (one of the bound
        ones, for the kinds that deliver to one)."""
        routes = self._bound_to(key)
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
            os.pwrite(self._fd, _HEADER.pack(_MAGIC, version, (turn + 1) & _U64, offset,
                                             length), 0)
        return turn

    def _queue_exists(self, name):
        try:
            self._open_queue(name)
            return True
        except QueueNotFound:
            return False

    @staticmethod
    def _ident(name):
        """(dev, ino) of the queue's segment file now, or None if absent."""
        try:
            st = os.stat(_lifetime.segment_path(_names.segment_for(name)),
                         follow_symlinks=False)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _open_queue(self, name):
        q = self._queues.get(name)
        if q is None:
            from .queue import Queue
            # The identity is taken before the open: if the name is replaced
            # in between, the next check reopens once (never sticks to a
            # handle on a removed segment).
            ident = self._ident(name)
            q = self._queues[name] = Queue.open(name, _backend=self._backend,
                                                authkey=getattr(self, "_authkey", None))
            self._idents[name] = ident
        return q

    def _drop_replaced_queues(self):
        """Forget cached queues whose name was removed or now refers to
        another segment (a queue unlinked and created again): publishing into
        the old one would lose the message while counting it delivered."""
        self._checked = _monotonic()
        for name, ident in list(self._idents.items()):
            if ident is None or self._ident(name) != ident:
                self._idents.pop(name, None)
                q = self._queues.pop(name, None)
                if q is not None:
                    q.close()

    def publish(self, obj, key="", timeout=None, *, mandatory=False) -> int:
        """Send ``obj`` to every queue ``key`` routes to; returns how many
        got it. Waits up to ``timeout`` (None: forever) for room in each; a
        queue still full then raises ``Full``, saying how many got it before.
        With ``mandatory=True``, a message no queue takes raises
        ``Unroutable`` instead of returning 0."""
        _check_key(key)
        return self._send(_serialize.encode(obj), key, timeout, mandatory)

    def publish_many(self, items, key="", *, mandatory=False):
        """Publish each item: an object (routed with ``key``), or, when
        ``key`` is empty, a ``(key, obj)`` pair -- a 2-tuple whose first
        element is a str. Returns the total number of deliveries. With
        ``mandatory=True``, the first item no queue takes raises
        ``Unroutable`` (the items before it were published)."""
        _check_key(key)
        total = 0
        for n, item in enumerate(items):
            k = key
            if not key and type(item) is tuple and len(item) == 2 and isinstance(item[0], str):
                k, item = item
            try:
                total += self._send(_serialize.encode(item), k, None, mandatory)
            except Unroutable as exc:
                raise Unroutable(f"{exc} (item {n}; the {n} item(s) before it were "
                                 "published)") from None
        return total

    def _send(self, payload, key, timeout, mandatory=False):
        with self._lock:
            if self._fd is None:
                raise QueueClosed(f"exchange {self.name!r} handle is closed")
            self._refresh()
            if _monotonic() - self._checked >= _RECHECK:
                self._drop_replaced_queues()
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
            if mandatory and not delivered:
                why = ("no binding matches it" if not targets else
                       "the queue(s) it matches no longer exist")
                raise Unroutable(f"exchange {self.name!r}: a message with key {key!r} "
                                 f"reached no queue: {why}")
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
