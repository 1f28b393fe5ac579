"""``fastmq.Exchange`` over Redis: bindings in the server, ``publish`` as one script.

An exchange is the hash ``fmq:x:{name}`` (kind, a bindings version, the
round-robin turn) and the zset ``fmq:x:{name}:b`` of its bindings in the
order they were made. The routing rules are those of the shared-memory
exchange (``fastmq.exchange``): direct (exact key), topic (``*`` one word,
``#`` zero or more), fanout, hash (CRC-32 of the key over the bound queues in
name order), round_robin (the turn is kept in the server, shared by every
publisher), random. A queue matched by several bindings gets one copy.

The client matches keys against the bindings it cached for the version it
read; the publish script refuses a stale version (the client re-reads and
tries again), checks every target for room, and only then appends to all of
them: a publish goes to all its queues or, when one stays full until the
timeout, to none (``Full``). A bound queue deleted since is skipped.

The script touches the target queues' keys, so it needs every queue in the
exchange's server: a Redis Cluster deployment is not supported here.
"""
from __future__ import annotations

import random
import time
import zlib

from .. import _names, _serialize
from ..errors import Full, MessageTooLarge, QueueClosed, QueueNotFound
from ..exchange import KINDS, Exchange, _check_key
from .link import Link

__all__ = ["RedisExchange"]


def _key(name):
    return f"fmq:x:{{{name}}}"


class RedisExchange(Exchange):
    """A named exchange in a Redis server (see the module doc)."""

    backend = "redis"

    @classmethod
    def _make(cls, link, name, kind):
        self = object.__new__(cls)
        self.name = name
        self._link = link
        self._key = _key(name)
        self._kind = kind
        self._version = None
        self._bindings = []
        self._routes = {}
        return self

    @classmethod
    def create(cls, name, kind, *, url=None, exist_ok=False, retry_window=10.0, **_ignored):
        _names.validate_name(name)
        if kind not in KINDS:
            raise ValueError(f"unknown exchange kind {kind!r}; choose one of {', '.join(KINDS)}")
        link = _link(url, retry_window)
        try:
            got = link.call("x_create", _key(name), (kind, int(bool(exist_ok))), what="exchange")
        except BaseException:
            link.close()
            raise
        if got.decode() != kind:
            link.close()
            raise ValueError(f"exchange {name!r} exists with kind {got.decode()!r}, not {kind!r}")
        return cls._make(link, name, got.decode())

    @classmethod
    def open(cls, name, *, url=None, retry_window=10.0, **_ignored):
        _names.validate_name(name)
        link = _link(url, retry_window)
        self = cls._make(link, name, None)
        try:
            self._refresh()
        except QueueNotFound:
            link.close()
            raise QueueNotFound(f"no fastmq exchange named {name!r} at {link.masked} "
                                f"(create it with fastmq.Exchange.create)") from None
        except BaseException:
            link.close()
            raise
        return self

    @staticmethod
    def unlink(name, *, url=None, **_ignored):
        _names.validate_name(name)
        link = _link(url, 10.0)
        try:
            link.call("x_unlink", _key(name), (), what="exchange")
        except QueueNotFound:
            raise QueueNotFound(f"no fastmq exchange named {name!r} at {link.masked}") from None
        finally:
            link.close()

    @staticmethod
    def list_names(url=None):
        link = _link(url, 10.0)
        try:
            names = set()
            for k in link.client.scan_iter(match="fmq:x:{*}", count=1000):
                k = k.decode()
                if k.endswith("}"):
                    names.add(k[len("fmq:x:{"):-1])
            return sorted(names)
        finally:
            link.close()

    def close(self):
        link = self.__dict__.get("_link")
        if link is not None:
            link.close()

    @property
    def closed(self):
        return self._link.closed

    def __del__(self):
        self.close()

    def __reduce__(self):
        return (_reopen, (self._link.url, self.name))

    def __repr__(self):
        state = "closed" if self._link.closed else f"kind={self._kind}"
        return f"<fastmq.Exchange name={self.name!r} url={self._link.masked!r} {state}>"

    @property
    def kind(self):
        return self._kind

    # ----------------------------------------------------------------- state

    def _check_open(self):
        if self._link.closed:
            raise QueueClosed(f"exchange {self.name!r} handle is closed")

    def _refresh(self):
        self._check_open()
        res = self._link.call("x_read", self._key, (), what="exchange")
        kind, version = res[0].decode(), res[1]
        if version != self._version:
            bindings = []
            for member in res[2:]:
                key, queue = member.decode().split("\n", 1)
                bindings.append((queue, key))
            self._kind, self._bindings, self._routes = kind, bindings, {}
            self._version = version

    def bind(self, queue_name, key=""):
        key = self._binding_key(queue_name, key, binding=True)
        try:
            self._link.call("x_bind", self._key,
                            ("bind", f"{key}\n{queue_name}", f"fmq:{{{queue_name}}}:m"),
                            what="exchange")
        except Exception as exc:
            if str(exc).startswith("FMQNOQUEUE"):
                raise QueueNotFound(f"cannot bind queue {queue_name!r} to exchange "
                                    f"{self.name!r}: no such queue (create it first)") from None
            raise

    def unbind(self, queue_name, key=""):
        key = self._binding_key(queue_name, key, binding=False)
        self._link.call("x_bind", self._key, ("unbind", f"{key}\n{queue_name}", ""),
                        what="exchange")

    def bindings(self):
        self._refresh()
        return list(self._bindings)

    # --------------------------------------------------------------- publish

    def _route(self, key):
        """('all' | 'turn', [queue names]) for ``key`` under the cached version
        ('turn': the server picks the next of them)."""
        routes = self._bound_to(key)
        kind = self._kind
        if not routes or kind in ("direct", "topic", "fanout"):
            return "all", routes
        if kind == "hash":
            return "all", [routes[zlib.crc32(key.encode()) % len(routes)]]
        if kind == "random":
            return "all", [random.choice(routes)]
        return "turn", routes

    def _send(self, payload, key, timeout):
        if self._version is None:
            self._refresh()
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pick, targets = self._route(key)
            args = (self._version, pick, payload, *(f"fmq:{{{q}}}:" for q in targets))
            res = self._link.call("x_publish", self._key, args, timeout, what="exchange")
            if res[0] >= 0:
                return res[0]
            if res[0] == -1:                     # bindings changed: route again
                self._refresh()
                continue
            queue = res[1].decode()[len("fmq:{"):-len("}:")]
            if res[0] == -3:
                raise MessageTooLarge(f"exchange {self.name!r}: a message of {len(payload) - 2} "
                                      f"bytes exceeds queue {queue!r}'s max_message_size")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Full(f"exchange {self.name!r}: queue {queue!r} stayed full; the "
                           "message went to none of its queues")
            self._link.wait_signal(res[1] + b"fr", res[2], 3600.0 if left is None else left)

    def publish(self, obj, key="", timeout=None) -> int:
        """Send ``obj`` to every queue ``key`` routes to, all or none;
        returns how many got it (``Full`` if one stays full past ``timeout``)."""
        _check_key(key)
        return self._send(_payload(obj), key, timeout)

    def publish_many(self, items, key=""):
        _check_key(key)
        total = 0
        for item in items:
            k = key
            if not key and type(item) is tuple and len(item) == 2 and isinstance(item[0], str):
                k, item = item
            total += self._send(_payload(item), k, None)
        return total


def _payload(obj):
    """The queue element for ``obj`` (see ``scripts``: ``0:`` + the payload)."""
    return b"0:" + _serialize.encode(obj)


def _link(url, retry_window):
    from .._location import resolve
    _, url = resolve(url)
    link = Link(url, retry_window)
    if link.cluster:
        link.close()
        raise ValueError(f"{link.masked!r}: exchanges route to several queues in one script, "
                         "so they need a single Redis server, not a cluster (cluster=1)")
    return link


def _reopen(url, name):
    return RedisExchange.open(name, url=url)
