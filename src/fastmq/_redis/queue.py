"""``fastmq.Queue`` over Redis streams: the same API, on a server many hosts share.

A ``RedisQueue`` is what ``fastmq.Queue.create/open(name, url="redis://...")``
return (a subclass of ``fastmq.Queue``). Each operation is one server-side
script (``scripts.py``); this module validates arguments, serializes, waits,
and keeps the little per-handle state there is:

* a producer identity and request number, so a ``put`` retried after a lost
  reply is applied once;
* a consumer identity (host, pid, a random token), heartbeated every second
  by one thread per process while the handle holds leases; a consumer whose
  heartbeat lapses for ``HEARTBEAT_TIMEOUT`` seconds (SIGKILL, a lost host,
  but also a process frozen that long: over a network the two cannot be told
  apart) gets its leases given back by the next script that reclaims;
* a stash of payloads that were taken from the server but not handed over
  (the rest of a ``get_many`` batch behind one that failed to deserialize, or
  the result of an ``*_async`` call cancelled while its script ran); the next
  ``get`` returns them first.

What differs from shared memory (documented, typed, never silent):

* no zero-copy: ``reserve``/``reserve_array``/``commit``/``recv`` and
  ``get(zero_copy=True)`` raise ``NotImplementedError``; ``Message.data`` is
  a view of a private copy;
* ``unlink`` deletes the queue and its messages; handles still open get
  ``QueueNotFound`` afterwards (there is no segment left to keep using);
* ``maxsize=0`` means no bound on the message count (``capacity_bytes``
  bounds the payload bytes when given, else the server's memory does);
  ``maxsize`` counts ready messages, as on shared memory (a redelivered
  message goes back even when that briefly exceeds it: nothing is refused);
* ``mode`` is accepted and ignored: access is the server's (ACL users);
* an auto-ack ``get`` whose reply is lost (connection drop mid-call) may
  lose the messages that call took (use ``get_message`` for at-least-once).
"""
from __future__ import annotations

import collections
import itertools
import os
import secrets
import socket
import threading
import time
import weakref

from .. import _lifetime, _names, _serialize, _transaction, acks
from .._contract import ACKED as _ACKED, HELD as _HELD, LOST as _LOST, NACKED as _NACKED
from ..errors import Empty, Full, LeaseLost, MessageTooLarge, QueueClosed, QueueNotFound
from ..queue import (DEFAULT_GET_MANY, DEFAULT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE, Queue,
                     _check_int, _check_serializer, _timeout)
from .link import FLAG_TTL_MS, Link

__all__ = ["RedisQueue", "RedisMessage", "HEARTBEAT_TIMEOUT"]

HEARTBEAT_INTERVAL = 1.0        # seconds between a consumer's heartbeats
HEARTBEAT_TIMEOUT = 5.0         # a consumer silent this long is gone
PUT_CHUNK = 2000                # payloads per put script call
TAKE_MAX = 1000                 # messages per get/lease script call
ACK_CHUNK = 1000
MAX_MAXSIZE = 1 << 40
_HB_MS = int(HEARTBEAT_TIMEOUT * 1000)
_HOST = socket.gethostname().replace(" ", "_") or "host"


def _lease_ms(seconds):
    return max(1, int(acks.check_lease(seconds) * 1000))


def _as_bytes(data):
    if type(data) is bytes:
        return data
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise TypeError(f"a payload must be bytes-like, not {type(data).__name__}") from None


def _no_zero_copy(what):
    raise NotImplementedError(f"{what} is not available on a redis:// queue: messages cross "
                              "the network as copies (zero-copy needs shared memory)")


class RedisMessage:
    """A message leased with ``get_message()`` from a redis:// queue.

    Same surface as ``fastmq.Message``: ``value``, ``data`` (read-only
    memoryview of a private copy), ``delivery_count``, ``redelivered``,
    ``id`` (the entry of this delivery, as in ``pending()``), ``acked``,
    ``ack()``, ``nack(requeue=True)``, ``touch(seconds)``. ``ack``/``nack``/
    ``touch`` are checked on the server against the lease's owner and its
    deadline (server clock): once the lease expired they raise ``LeaseLost``.
    """

    # _rid and _batch stay bytes (the batch as the server sent it, the id
    # derived from it): an ack passes them back without encoding anything.
    __slots__ = ("_q", "_rid", "delivery_count", "_payload", "_state", "_value", "_consumer",
                 "_batch", "_bsize", "__weakref__")

    def __init__(self, q, rid, count, payload, consumer, batch, bsize):
        self._q = q
        self._rid = rid
        self.delivery_count = count
        self._payload = payload
        self._consumer = consumer
        self._batch = batch               # the lease batch, and how many it had
        self._bsize = bsize
        self._state = _HELD

    @property
    def id(self) -> str:
        return self._rid.decode()

    @property
    def value(self):
        try:
            return self._value
        except AttributeError:
            self._value = self._q._decode(self._payload)
            return self._value

    @property
    def data(self) -> memoryview:
        return memoryview(self._payload).toreadonly()

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def acked(self) -> bool:
        return self._state == _ACKED

    def _check_held(self, what):
        if self._state == _HELD:
            return
        reason = {_ACKED: "was acked", _NACKED: "was nacked",
                  _LOST: "lease was already reported lost"}[self._state]
        raise LeaseLost(f"cannot {what} message {self.id}: it {reason}")

    def ack(self) -> None:
        if self._state == _ACKED:
            return
        self._check_held("ack")
        if self._q._ack([self]) != 1:
            self._state = _LOST
            raise LeaseLost(f"message {self.id}: its lease expired or was reclaimed "
                            "(it is delivered again)")

    def nack(self, requeue: bool = True) -> None:
        self._check_held("nack")
        self._settle("nack" if requeue else "dead", 0)
        self._state = _NACKED
        self._q._forward_dead_letters(force=True)

    def touch(self, seconds: float = acks.DEFAULT_LEASE) -> None:
        ms = max(1, int(acks.check_lease(seconds, "seconds") * 1000))
        self._check_held("touch")
        self._settle("touch", ms)
        self._batch = b"t" + self._rid       # the lease now has a batch of its own
        self._bsize = 1

    def _settle(self, what, ms):
        q = self._q
        ok = q._link.call("settle", q._mkey, (q._prefix, self._consumer, self._rid,
                                              self._batch, what, ms))
        if ok != 1:
            self._state = _LOST
            raise LeaseLost(f"cannot {what} message {self.id}: its lease expired or was "
                            "reclaimed (it is delivered again)")

    def __repr__(self):
        state = ("held", "acked", "nacked", "lost")[self._state]
        return (f"<fastmq.Message id={self.id} delivery_count={self.delivery_count} "
                f"{len(self._payload)} bytes {state}>")


# ------------------------------------------------------ heartbeats (per process)

class _Heartbeats:
    def __init__(self):
        self.lock = _lifetime.ForkSafeLock()
        self.generation = None
        self.handles = weakref.WeakSet()
        self.wake = threading.Event()

    def register(self, q):
        with self.lock:
            if self.generation != _lifetime.fork_generation:   # first use, or a forked child
                self.generation = _lifetime.fork_generation
                self.handles = weakref.WeakSet()
                self.wake = threading.Event()
                threading.Thread(target=self._run, args=(self.handles,), daemon=True,
                                 name="fastmq-redis-heartbeat").start()
            self.handles.add(q)

    def _run(self, handles):
        while True:
            time.sleep(HEARTBEAT_INTERVAL)
            for q in list(handles):
                if q._link.closed:
                    handles.discard(q)
                    continue
                try:
                    q._link.call("heartbeat", q._mkey,
                                 (q._prefix, q._ident(), _HB_MS, "0"), timeout=1.0)
                except Exception:  # noqa: BLE001 - the next beat tries again
                    pass


_heartbeats = _Heartbeats()


# ------------------------------------------------------------------ the queue

class RedisQueue(Queue):
    """A named queue in a Redis (>= 7) or Valkey server (see the module doc)."""

    backend = "redis"

    def __init__(self, *_args, **_kwargs):
        raise TypeError("a redis:// queue has a name: use fastmq.Queue.create(name, url=...) "
                        "or fastmq.Queue.open(name, url=...)")

    @classmethod
    def _make(cls, link, name, meta, serializer):
        self = object.__new__(cls)
        self._link = link
        self.name = name
        self._prefix = f"fmq:{{{name}}}:"
        self._mkey = self._prefix + "m"
        maxsize, mms, maxbytes, maxdel, dlq = meta
        self._maxsize, self._mms, self._maxbytes = int(maxsize), int(mms), int(maxbytes)
        self._max_deliveries = int(maxdel)
        self._dead_letter = (dlq or b"").decode() or None
        self._serializer = serializer
        self._lock = _lifetime.ForkSafeLock()
        self._stash = collections.deque()
        self._id_generation = None        # the fork generation _id was made in
        self._id = None
        self._local = threading.local()
        self._active_at = [-1e9, -1e9]   # last put, last take recorded
        self._dlq = None
        self._dl_checked = 0.0
        self._leased = False
        return self

    @classmethod
    def create(cls, name, *, url=None, maxsize=0, max_message_size=None, capacity_bytes=None,
               mode=0o600, exist_ok=False, serializer=None, max_deliveries=20,
               dead_letter=None, retry_window=10.0, **_ignored):
        """Create the queue ``name`` on the server at ``url``."""
        _names.validate_name(name)
        _check_int("maxsize", maxsize, 0, MAX_MAXSIZE)
        if max_message_size is None:
            max_message_size = DEFAULT_MAX_MESSAGE_SIZE
        _check_int("max_message_size", max_message_size, 1, MAX_MESSAGE_SIZE)
        if capacity_bytes is not None:
            _check_int("capacity_bytes", capacity_bytes, max_message_size, 1 << 50)
        _check_int("mode", mode, 0, 0o7777)
        _check_int("max_deliveries", max_deliveries, 1, 1 << 30)
        if dead_letter is not None:
            _names.validate_name(dead_letter)
        serializer = _check_serializer(serializer)
        link = _link(url, retry_window)
        prefix = f"fmq:{{{name}}}:"
        try:
            meta = link.call("create", prefix + "m",
                             (prefix, maxsize, max_message_size, capacity_bytes or 0,
                              max_deliveries, dead_letter or "", int(bool(exist_ok))))
        except BaseException:
            link.close()
            raise
        return cls._make(link, name, meta, serializer)

    @classmethod
    def open(cls, name, serializer=None, *, url=None, retry_window=10.0, **_ignored):
        """Open the existing queue ``name`` (``QueueNotFound`` if the server
        does not have it -- also after it restarted without persistence)."""
        _names.validate_name(name)
        serializer = _check_serializer(serializer)
        link = _link(url, retry_window)
        prefix = f"fmq:{{{name}}}:"
        try:
            meta = link.call("open", prefix + "m", (prefix,))
        except QueueNotFound:
            link.close()
            raise QueueNotFound(f"no fastmq queue named {name!r} at {link.masked}") from None
        except BaseException:
            link.close()
            raise
        return cls._make(link, name, meta, serializer)

    @staticmethod
    def unlink(name, *, url=None, **_ignored):
        """Delete the queue ``name`` and its messages from the server."""
        _names.validate_name(name)
        link = _link(url, 10.0)
        prefix = f"fmq:{{{name}}}:"
        try:
            link.call("unlink", prefix + "m", (prefix,))
        except QueueNotFound:
            raise QueueNotFound(f"no fastmq queue named {name!r} at {link.masked}") from None
        finally:
            link.close()

    # ------------------------------------------------------------ lifecycle

    def __reduce__(self):
        # The url travels with its credentials: the copy must be able to
        # connect. It is never shown (repr, errors and the CLI mask it).
        self._check_open()
        return (_reopen, (self._link.url, self.name, self._serializer))

    def _check_open(self):
        if self._link.closed:
            raise QueueClosed("operation on a closed fastmq queue handle")

    def close(self):
        """Stop using this handle (idempotent). Messages it leased and did
        not settle go back to the queue now."""
        link = self.__dict__.get("_link")
        if link is None or link.closed:
            return
        if self._leased and self._id_generation == _lifetime.fork_generation:
            try:
                link.call("heartbeat", self._mkey, (self._prefix, self._id, _HB_MS, "1"),
                          timeout=1.0)
            except Exception:  # noqa: BLE001 - the heartbeat lapse gives them back anyway
                pass
        with self._lock:
            stash = list(self._stash) if self._id_generation == _lifetime.fork_generation else []
            self._stash.clear()
        if stash:
            # Taken from the server but never returned (a batch cut at an
            # undecodable message): they go back (at the back) for the
            # other consumers rather than vanish with this handle.
            try:
                self._put(stash, 1.0)
            except Exception:  # noqa: BLE001 - the server is gone: nothing to give back to
                pass
        dlq = self._dlq
        self._dlq = None
        if dlq is not None:
            dlq.close()
        link.close()

    @property
    def closed(self) -> bool:
        return self._link.closed

    def __enter__(self):
        self._check_open()
        return self

    def __del__(self):
        link = self.__dict__.get("_link")
        if link is not None:
            link.close()                  # no round trip from a finalizer

    def __repr__(self):
        state = "closed" if self._link.closed else f"maxsize={self._maxsize}"
        return (f"<fastmq.Queue name={self.name!r} url={self._link.masked!r} "
                f"backend=redis {state}>")

    @property
    def url(self) -> str:
        """Where the queue lives, with its credentials masked."""
        return self._link.masked

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def max_message_size(self) -> int:
        return self._mms

    @property
    def capacity_bytes(self):
        return self._maxbytes or None

    @property
    def max_deliveries(self) -> int:
        return self._max_deliveries

    @property
    def dead_letter(self):
        return self._dead_letter

    def _ident(self):
        """This handle's consumer identity in this process."""
        generation = _lifetime.fork_generation
        if self._id_generation != generation:      # first use, or a forked child
            with self._lock:
                if self._id_generation != generation:
                    self._id = f"{_HOST}:{os.getpid()}:{secrets.token_hex(6)}"
                    self._leased = False
                    self._id_generation = generation   # last: another thread may read _id now
        return self._id

    def _activity(self, role):
        """'1' at most once a second per role (0: put, 1: take): the call
        also records this handle as active, for ``stats()["producers"]`` /
        ``["consumers"]``. One clock per role: a put must not hide the take
        that follows it within the second."""
        now = time.monotonic()
        if now - self._active_at[role] < 1.0:
            return "0"
        self._active_at[role] = now
        return "1"

    def _request(self):
        """(producer identity, request number) for a put: one producer per
        thread, so a retried request is always that producer's last one."""
        local = self._local
        if getattr(local, "generation", None) != _lifetime.fork_generation:
            local.producer = f"{self._ident()}/{threading.get_ident()}"
            local.seq = itertools.count(1)
            local.generation = _lifetime.fork_generation
        return local.producer, next(local.seq)

    # ------------------------------------------------------------------- put

    def _payload(self, obj):
        data = self._dumps(obj) if self._serializer is not None else _serialize.encode(obj)
        return _as_bytes(data)

    def _check_size(self, payload):
        if len(payload) > self._mms:
            raise MessageTooLarge(f"message of {len(payload)} bytes exceeds this queue's "
                                  f"max_message_size of {self._mms} bytes")

    def _put(self, payloads, timeout, atomic=False):
        """Enqueue in order; returns how many went in before ``timeout``."""
        self._check_open()
        total = len(payloads)
        if total == 0:
            return 0
        if atomic and self._maxsize and total > self._maxsize:
            raise ValueError(f"an atomic batch of {total} messages can never fit in a queue "
                             f"of maxsize {self._maxsize}")
        deadline = None if not timeout else time.monotonic() + timeout
        wait_ms = 0 if timeout == 0 else FLAG_TTL_MS
        done = 0
        link, prefix = self._link, self._prefix
        while done < total:
            chunk = payloads if atomic else payloads[done:done + PUT_CHUNK]
            producer, seq = self._request()
            n, last = link.call("put", self._mkey,
                                (prefix, producer, seq, int(atomic), wait_ms, self._activity(0),
                                 *[b"0:" + p for p in chunk]), timeout)
            done += n
            if n == len(chunk):
                continue
            left = _wait_left(timeout, deadline)
            if left is None:
                break
            link.wait_signal(prefix + "fr", last, left)
        return done

    def put(self, obj, block=True, timeout=None):
        """Serialize ``obj`` and enqueue it; ``Full`` if no room in time."""
        self.put_bytes(self._payload(obj), block, timeout)

    def put_bytes(self, data, block=True, timeout=None):
        timeout = _timeout(block, timeout)
        payload = _as_bytes(data)
        self._check_size(payload)
        if self._put([payload], timeout) != 1:
            raise Full(f"queue {self.name!r} stayed full ({self._maxsize} messages)")

    def put_many(self, iterable, block=True, timeout=None, *, atomic=False) -> int:
        """Enqueue a batch in order; returns how many went in. ``atomic=True``:
        all of them in one step or none (``Full`` if they do not fit in time)."""
        timeout = _timeout(block, timeout)
        payloads = [self._payload(obj) for obj in iterable]
        for p in payloads:
            self._check_size(p)
        n = self._put(payloads, timeout, atomic)
        if atomic and n != len(payloads):
            raise Full(f"queue {self.name!r}: no room for the atomic batch of "
                       f"{len(payloads)} messages in time")
        return n

    def put_many_bytes(self, items, block=True, timeout=None, *, atomic=False) -> int:
        timeout = _timeout(block, timeout)
        payloads = [_as_bytes(d) for d in items]
        for p in payloads:
            self._check_size(p)
        n = self._put(payloads, timeout, atomic)
        if atomic and n != len(payloads):
            raise Full(f"queue {self.name!r}: no room for the atomic batch in time")
        return n

    def transaction(self, block=True, timeout=None):
        """``with q.transaction() as tx: tx.put(a); tx.put_bytes(b)`` -- one
        atomic batch (``put_many(..., atomic=True)``) when the block ends
        normally, nothing if it raises."""
        timeout = _timeout(block, timeout)

        def encode(obj):
            payload = self._payload(obj)
            self._check_size(payload)
            return payload

        def encode_bytes(data):
            payload = _as_bytes(data)
            self._check_size(payload)
            return payload

        def commit(payloads):
            n = self._put(payloads, timeout, True)
            if n != len(payloads):
                raise Full(f"queue {self.name!r}: no room for the atomic batch of "
                           f"{len(payloads)} messages in time")
            return n
        return _transaction.Transaction(encode, encode_bytes, commit)

    # ------------------------------------------------------------------- get

    def _take(self, n, timeout, lease_ms=None):
        """One script call that takes up to ``n`` (waiting up to ``timeout``)."""
        self._check_open()
        deadline = None if not timeout else time.monotonic() + timeout
        wait_ms = 0 if timeout == 0 else FLAG_TTL_MS
        link, prefix, n = self._link, self._prefix, min(n, TAKE_MAX)
        while True:
            res = link.call(*self._take_request(n, wait_ms, lease_ms), timeout)
            if res[0]:
                return res
            left = _wait_left(timeout, deadline)
            if left is None:
                raise Empty
            link.wait_signal(prefix + "sig", res[1], left)

    def _take_request(self, n, wait_ms, lease_ms):
        """(script, key, arguments) of one take: plain, or leases of ``lease_ms``."""
        if lease_ms is None:
            return "get", self._mkey, (self._prefix, n, self._ident(), wait_ms,
                                       self._activity(1))
        return "lease", self._mkey, (self._prefix, n, self._ident(), lease_ms, _HB_MS, wait_ms,
                                     self._activity(1))

    def _pop_stash(self, n):
        """Up to ``n`` stashed payloads (kept back by a failed decode or a
        cancelled asyncio take), oldest first."""
        out = []
        if self._stash:
            with self._lock:
                while self._stash and len(out) < n:
                    out.append(self._stash.popleft())
        return out

    def _get_payloads(self, n, timeout):
        return self._pop_stash(n) or _strip(self._take(n, timeout)[1:])

    def _decode_batch(self, payloads):
        out = []
        for i, p in enumerate(payloads):
            try:
                out.append(self._decode(p))
            except Exception:
                if not out:
                    with self._lock:
                        self._stash.extendleft(reversed(payloads[i + 1:]))
                    raise
                with self._lock:
                    self._stash.extendleft(reversed(payloads[i:]))
                break
        return out

    def get(self, block=True, timeout=None, *, zero_copy=False):
        """Dequeue and deserialize one object; ``Empty`` if none in time."""
        if zero_copy:
            _no_zero_copy("get(zero_copy=True)")
        return self._decode_batch(self._get_payloads(1, _timeout(block, timeout)))[0]

    def get_bytes(self, block=True, timeout=None) -> bytes:
        return self._get_payloads(1, _timeout(block, timeout))[0]

    def get_many(self, max_messages=DEFAULT_GET_MANY, block=True, timeout=None) -> list:
        """At least one object, at most ``max_messages`` (and at most 1000 per
        call), without waiting for more once one is available."""
        _check_int("max_messages", max_messages, 1, 1 << 30)
        return self._decode_batch(self._get_payloads(max_messages, _timeout(block, timeout)))

    def get_many_bytes(self, max_messages=DEFAULT_GET_MANY, block=True, timeout=None) -> list:
        _check_int("max_messages", max_messages, 1, 1 << 30)
        return self._get_payloads(max_messages, _timeout(block, timeout))

    # ------------------------------------------------------------ inspection

    def qsize(self) -> int:
        return self._stats_raw()[1]

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    def _stats_raw(self):
        self._check_open()
        return self._link.call("stats", self._mkey, (self._prefix,))

    def stats(self) -> dict:
        """depth, capacity (``maxsize``; 0: no bound), enqueued, dequeued,
        bytes_in_use, producers (put in the last minute), consumers (took or
        waited in the last minute), redelivered, abandoned (given back
        because their consumer's heartbeat lapsed), dead_lettered, in_flight,
        parked_dead_letters, max_message_size, url (credentials masked)."""
        self._forward_dead_letters(force=True)
        fields, depth, in_flight, leasing, producers, getters, parked, _now = self._stats_raw()
        meta = {fields[i].decode(): fields[i + 1] for i in range(0, len(fields), 2)}

        def num(k):
            return int(meta.get(k, 0) or 0)
        return {
            "depth": depth, "capacity": self._maxsize, "enqueued": num("enqueued"),
            "dequeued": num("dequeued"), "bytes_in_use": num("bytes"),
            "producers": producers, "consumers": max(getters, leasing),
            "redelivered": num("redelivered"), "abandoned": num("abandoned"),
            "dead_lettered": num("dead_lettered"), "in_flight": in_flight,
            "parked_dead_letters": parked, "max_message_size": self._mms,
            "max_deliveries": self._max_deliveries, "backend": "redis",
            "url": self._link.masked,
        }

    # ------------------------------------------------------------- zero-copy

    def reserve(self, nbytes, timeout=None):
        _no_zero_copy("reserve()")

    def reserve_array(self, shape, dtype, *, timeout=None):
        _no_zero_copy("reserve_array()")

    def commit(self, arr):
        _no_zero_copy("commit()")

    def recv(self, timeout=None):
        _no_zero_copy("recv()")

    # ------------------------------------------------------- at-least-once

    @property
    def max_in_flight(self):
        return None                        # no per-handle bound over Redis

    @max_in_flight.setter
    def max_in_flight(self, value):
        raise NotImplementedError("max_in_flight is not available on a redis:// queue")

    @property
    def in_flight(self) -> int:
        """Un-acked messages this handle (in this process) holds: its
        consumer's entries in ``pending()`` (one server call)."""
        if self._id_generation != _lifetime.fork_generation:
            return 0
        ident = self._id
        return sum(1 for p in self.pending() if p["consumer"] == ident)

    def _messages(self, res):
        # res: n, now, batch b"b<number>", then the elements; the i-th
        # element's lease id is b"<number>.<i>".
        ident, n, batch = self._id, res[0], res[2]
        pre = batch[1:] + b"."
        out = []
        append = out.append
        for i in range(1, n + 1):
            e = res[i + 2]
            if e[:2] == b"0:":                 # a first delivery: the common case
                append(RedisMessage(self, pre + b"%d" % i, 1, e[2:], ident, batch, n))
            else:
                at = e.index(b":")
                append(RedisMessage(self, pre + b"%d" % i, int(e[:at]) + 1, e[at + 1:], ident,
                                    batch, n))
        if not self._leased:
            self._leased = True
            _heartbeats.register(self)
        return out

    def get_message(self, block=True, timeout=None, lease=acks.DEFAULT_LEASE):
        """Lease the next message -> a Message (at-least-once): it comes back
        at the BACK of the queue with ``delivery_count + 1`` unless acked
        within ``lease`` seconds (server clock), or soon after this consumer
        stops heartbeating."""
        return self._messages(self._take(1, _timeout(block, timeout), _lease_ms(lease)))[0]

    def get_messages(self, max_messages=acks.DEFAULT_GET_MESSAGES, block=True, timeout=None,
                     lease=acks.DEFAULT_LEASE) -> list:
        _check_int("max_messages", max_messages, 1, 1 << 30)
        out = self._messages(self._take(max_messages, _timeout(block, timeout),
                                        _lease_ms(lease)))
        self._forward_dead_letters()
        return out

    def _ack(self, messages):
        """Ack ``messages`` (held, of this handle); returns how many were acked.
        A whole lease batch -- every message one get_messages call returned --
        goes as one (batch, size) pair (``scripts.ACK_BATCHES``); the others
        message by message (``scripts.ACK``)."""
        first = messages[0]
        n = len(messages)
        if n == first._bsize:
            # The common case: exactly the messages of one get_messages call.
            batch, consumer = first._batch, first._consumer
            for m in messages:
                if m._batch is not batch or m._consumer is not consumer:
                    break
            else:
                if n == 1 or len({m._rid for m in messages}) == n:
                    r = self._link.call("ack_batches", self._mkey,
                                        (self._prefix, consumer, batch, n))[0]
                    if r != -1:
                        state = _ACKED if r == 1 else _LOST
                        for m in messages:
                            m._state = state
                        return n if r == 1 else 0
        by_consumer = {}
        for m in messages:
            by_consumer.setdefault(m._consumer, {}).setdefault(m._batch, {})[m._rid] = m
        done = 0
        for consumer, batches in by_consumer.items():
            singles = []
            whole = [(b, ms) for b, ms in batches.items()
                     if len(ms) == next(iter(ms.values()))._bsize]
            for b, ms in batches.items():
                if len(ms) != next(iter(ms.values()))._bsize:
                    singles += ms.values()
            for start in range(0, len(whole), ACK_CHUNK):
                part = whole[start:start + ACK_CHUNK]
                args = [self._prefix, consumer]
                for b, ms in part:
                    args += (b, len(ms))
                res = self._link.call("ack_batches", self._mkey, args)
                for (b, ms), r in zip(part, res):
                    if r == -1:                # no longer whole: one by one
                        singles += ms.values()
                        continue
                    for m in ms.values():
                        m._state = _ACKED if r == 1 else _LOST
                    done += len(ms) if r == 1 else 0
            for start in range(0, len(singles), ACK_CHUNK):
                part = singles[start:start + ACK_CHUNK]
                args = [self._prefix, consumer]
                for m in part:
                    args += (m._rid, m._batch)
                res = self._link.call("ack", self._mkey, args)
                for m, ok in zip(part, res):
                    m._state = _ACKED if ok == 1 else _LOST
                    done += ok == 1
        return done

    def ack_many(self, messages) -> int:
        """Ack several leased messages in one round trip per 1000; returns how
        many were acked now (lost leases and already-settled ones are not
        counted)."""
        self._check_open()
        held = []
        for m in messages:
            if m.__class__ is not RedisMessage or m._q is not self:
                raise TypeError("ack_many() takes Messages leased from this queue handle")
            if m._state == _HELD:
                held.append(m)
        return self._ack(held) if held else 0

    def pending(self) -> list:
        """In-flight messages: ``id``, ``pid`` (holder), ``idle`` (seconds
        since leased), ``delivery_count``, ``consumer``, ``expires_in``."""
        self._check_open()
        now, metas = self._link.call("pending", self._mkey, (self._prefix,))
        out = []
        for i in range(0, len(metas), 2):
            id_ = metas[i].decode()
            count, consumer, leased_at, deadline = metas[i + 1].decode().split(" ")
            try:
                pid = int(consumer.split(":")[-2])
            except (IndexError, ValueError):
                pid = 0
            out.append({"id": id_, "pid": pid, "consumer": consumer,
                        "idle": max(0.0, (now - int(leased_at)) / 1000.0),
                        "delivery_count": int(count), "token": id_,
                        "expires_in": (int(deadline) - now) / 1000.0})
        return out

    def redeliver_expired(self) -> int:
        """Give back now every expired lease and the leases of consumers
        whose heartbeat lapsed; returns how many."""
        self._check_open()
        n = self._link.call("heartbeat", self._mkey, (self._prefix, "-", _HB_MS, "0"))
        self._forward_dead_letters(force=True)
        return max(0, n)

    def _forward_dead_letters(self, force=False):
        """Move parked dead letters to the dead-letter queue (another slot in
        a cluster, so this is the client's job; at-least-once: a crash between
        the put and the unpark forwards one batch twice)."""
        if self._dead_letter is None or self._link.closed:
            return
        now = time.monotonic()
        if not force and now - self._dl_checked < 0.25:
            return
        self._dl_checked = now
        token = secrets.token_hex(8)
        for _ in range(64):
            parked = self._link.call("parked", self._mkey, (self._prefix, 256, token))
            if not parked:
                return
            try:
                if self._dlq is None:        # created on demand, default sizes
                    self._dlq = RedisQueue.create(self._dead_letter, url=self._link.url,
                                                  exist_ok=True)
                n = self._dlq._put(parked, 0)
            except QueueNotFound:
                n = 0                               # kept parked until it exists
            self._link.call("unpark", self._mkey, (self._prefix, token, n))
            if n < len(parked):
                return

    # -------------------------------------------------------------- asyncio

    async def _atake(self, n, timeout, lease_ms=None):
        """Take up to ``n`` messages for asyncio. A plain take returns their
        payloads, the stash's first -- looked at again after every wait,
        because another task's cancelled take may have stashed what it took
        meanwhile (a wait lasts at most ``WAIT_SLICE``). A lease returns the
        script's reply."""
        self._check_open()
        deadline = None if not timeout else time.monotonic() + timeout
        wait_ms = 0 if timeout == 0 else FLAG_TTL_MS
        link, prefix, n = self._link, self._prefix, min(n, TAKE_MAX)
        while True:
            if lease_ms is None:
                stashed = self._pop_stash(n)
                if stashed:
                    return stashed
                # Taken but not handed over (the caller was cancelled): stashed.
                res = await link.acall(*self._take_request(n, wait_ms, None), timeout,
                                       on_cancel=self._rescue)
                if res[0]:
                    return _strip(res[1:])
            else:
                # A lease taken for a cancelled caller just expires and comes back.
                res = await link.acall(*self._take_request(n, wait_ms, lease_ms), timeout)
                if res[0]:
                    return res
            left = _wait_left(timeout, deadline)
            if left is None:
                raise Empty
            await link.await_signal(prefix + "sig", res[1], left)

    def _rescue(self, attempt):
        if attempt.cancelled() or attempt.exception() is not None:
            return
        res = attempt.result()
        if res[0]:
            with self._lock:
                self._stash.extend(_strip(res[1:]))

    async def get_async(self, timeout=None):
        """``get()`` for asyncio (``redis.asyncio``; an idle await costs no CPU)."""
        timeout = _timeout(True, timeout)
        return self._decode_batch(await self._atake(1, timeout))[0]

    async def get_many_async(self, max_messages=DEFAULT_GET_MANY, timeout=None) -> list:
        _check_int("max_messages", max_messages, 1, 1 << 30)
        timeout = _timeout(True, timeout)
        return self._decode_batch(await self._atake(max_messages, timeout))

    async def get_message_async(self, timeout=None, lease=acks.DEFAULT_LEASE):
        timeout = _timeout(True, timeout)
        return self._messages(await self._atake(1, timeout, _lease_ms(lease)))[0]

    async def get_messages_async(self, max_messages=acks.DEFAULT_GET_MESSAGES, timeout=None,
                                 lease=acks.DEFAULT_LEASE) -> list:
        _check_int("max_messages", max_messages, 1, 1 << 30)
        timeout = _timeout(True, timeout)
        return self._messages(await self._atake(max_messages, timeout, _lease_ms(lease)))

    async def put_async(self, obj, timeout=None):
        """``put()`` for asyncio: await room (``Full`` after ``timeout``)."""
        timeout = _timeout(True, timeout)
        payload = self._payload(obj)
        self._check_size(payload)
        self._check_open()
        deadline = None if not timeout else time.monotonic() + timeout
        wait_ms = 0 if timeout == 0 else FLAG_TTL_MS
        link, prefix = self._link, self._prefix
        while True:
            producer, seq = self._request()
            n, last = await link.acall("put", self._mkey,
                                       (prefix, producer, seq, 0, wait_ms, self._activity(0),
                                        b"0:" + payload), timeout)
            if n == 1:
                return
            left = _wait_left(timeout, deadline)
            if left is None:
                raise Full(f"queue {self.name!r} stayed full ({self._maxsize} messages)")
            await link.await_signal(prefix + "fr", last, left)


WAIT = 3600.0          # "forever", one slice at a time


def _wait_left(timeout, deadline):
    """Seconds the next wait may take (``WAIT``: no deadline), or None when
    the call's time is up (``timeout`` 0: it never waits)."""
    if timeout == 0:
        return None
    if deadline is None:
        return WAIT
    left = deadline - time.monotonic()
    return left if left > 0 else None


def _strip(elements):
    """Payloads of queue elements ("<deliveries>:<payload>")."""
    return [e[e.index(b":") + 1:] for e in elements]


def _link(url, retry_window):
    from .._location import resolve
    _, url = resolve(url)
    return Link(url, retry_window)


def _reopen(url, name, serializer):
    return RedisQueue.open(name, serializer, url=url)
