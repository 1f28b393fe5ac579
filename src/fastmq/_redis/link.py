"""One handle's connection to a Redis server: scripts, waits, and outages.

``Link.call(name, key, args, timeout)`` runs one of the scripts of
``scripts.py`` (``EVALSHA``; redis-py loads a script again when the server
lost its script cache, e.g. after a restart). A connection failure is retried
with backoff (50 ms doubling to 1 s) for the call's outage budget: its own
timeout when it has one (at least ``MIN_OUTAGE`` seconds, so a non-blocking
call still tries to reconnect once or twice), else the retry window: 10
seconds, or ``retry_window=SECONDS`` in the url's query
(``redis://host:6379/0?retry_window=30``).

Redis Cluster: ``?cluster=1`` in the url (any node's address) uses redis-py's
cluster client. Every key of a queue carries the hash tag ``{name}``, so a
queue lives in one slot and each script runs on the node that owns it;
different queues spread over the nodes. Exchanges touch several queues in one
script, so they need a single server (``RedisExchange`` refuses cluster=1).

Replication: Redis replicates asynchronously, so a failover can lose the
writes a replica had not received yet. ``?wait_replicas=N`` (and
``wait_timeout=SECONDS``, default 1) makes every writing script wait (``WAIT``,
on the same connection) until N replicas have it; a put that is not
confirmed in time raises ``Unavailable`` saying it was applied on the primary. Past the budget the call raises ``fastmq.Unavailable``
naming the url with its credentials masked. redis-py's own retries are off so
that this is the only retry loop: a retried ``put`` carries the same request
number and is applied once (see ``scripts.PUT``).

Waiting (a ``get`` on an empty queue, a ``put`` on a full one) is an
``XREAD BLOCK`` on a one-entry signal stream for at most ``WAIT_SLICE``
seconds at a time: the server holds the socket, so an idle waiter costs no
CPU; ``close()`` disconnects the pool, which wakes a waiter blocked in
another thread at once; Ctrl-C interrupts the socket read.

The hot path (a single server, no ``wait_replicas``): each thread keeps one
connection of its own (made by the pool's connection class, so TLS, auth and
db are the url's) and sends ``EVALSHA`` packed once with hiredis, without
redis-py's per-command machinery (pool checkout, retry wrapper, metrics,
response callbacks -- a script's reply has none). A script the server lost is
loaded again (``SCRIPT LOAD``) and the call resent; a connection that failed
or was interrupted mid-call (Ctrl-C) is dropped, so a stale reply is never
read as the next call's; ``close()`` drops these connections too, which wakes
a thread blocked on one.

asyncio: ``acall``/``await_signal`` do the same through a ``redis.asyncio``
client, one per event loop (asyncio connections belong to the loop that made
them).
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
import weakref

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.retry import Retry

from .. import _lifetime
from .._location import mask
from ..errors import QueueClosed, QueueExists, QueueNotFound, Unavailable
from . import scripts

__all__ = ["Link", "WAIT_SLICE"]

WAIT_SLICE = 2.0          # seconds one XREAD BLOCK may take before re-checking
FLAG_TTL_MS = 5000        # "somebody waits" flags outlive one slice
MIN_OUTAGE = 0.5
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)
_SOURCES = scripts.sources()
# Scripts that write (``wait_replicas`` waits after them) and the puts among
# them (whose unconfirmed replication is reported).
_WRITES = frozenset({"create", "unlink", "put", "get", "lease", "ack", "ack_batches", "settle",
                     "unpark",
                     "x_create", "x_bind", "x_unlink", "x_publish"})
_PUTS = frozenset({"put", "x_publish", "create"})


try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:                        # redis-py packs it then (slower)
    _hiredis_pack = None


def _pack(conn, args):
    """One command in RESP (a list of chunks, as ``send_packed_command``
    takes it): packed by hiredis in one C call when it is installed."""
    if _hiredis_pack is not None:
        return [_hiredis_pack(args)]
    return conn.pack_command(*args)


def _cluster_options():
    return dict(socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))


def _options(url):
    opts = dict(socket_connect_timeout=2.0, health_check_interval=0,
                retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
    if not url.startswith("unix:"):
        opts["socket_keepalive"] = True
    return opts


_OWN = {"retry_window": float, "wait_replicas": int, "wait_timeout": float, "cluster": int}


def _own_options(url):
    """Strip fastmq's own query parameters from ``url``: ``retry_window``
    (seconds), ``wait_replicas`` (N) and ``wait_timeout`` (seconds). Returns
    (the url for redis-py, {name: value})."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own, kept = {}, []
    for k, v in query:
        if k in _OWN:
            try:
                own[k] = _OWN[k](v)
            except ValueError:
                raise ValueError(f"{k} in {mask(url)!r} must be a number") from None
            if not own[k] >= 0:
                raise ValueError(f"{k} in {mask(url)!r} must be >= 0")
        else:
            kept.append((k, v))
    if not own:
        return url, own
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept))), own


class _Outage:
    """One call's retries through an outage: 50 ms doubling to 1 s between
    attempts, for the call's budget (``Link._budget``) from its first failure."""

    __slots__ = ("_link", "_budget", "_start", "_delay")

    def __init__(self, link, timeout):
        self._link, self._budget = link, link._budget(timeout)
        self._start, self._delay = None, 0.05

    def pause(self, exc):
        """Seconds to wait before the next attempt after ``exc``; raises
        ``Unavailable`` once the budget is spent (``QueueClosed`` once the
        handle is closed)."""
        self._link._check_open()
        now = time.monotonic()
        if self._start is None:
            self._start = now
        left = self._budget - (now - self._start)
        if left <= 0:
            raise self._link.unavailable(exc) from None
        pause = min(self._delay, left)
        self._delay = min(self._delay * 2, 1.0)
        return pause


def _settle(attempt):
    """Done callback of an attempt nobody awaits any more: read its outcome,
    so an error it ends with is not reported as never retrieved."""
    if not attempt.cancelled():
        attempt.exception()


async def _apart(coro, on_cancel=None):
    """Await one redis-py command from outside the task that runs it.

    redis-py bounds each socket write with ``asyncio.wait_for``, and before
    Python 3.12 ``wait_for`` returns normally when its inner future finishes
    at the moment its task is cancelled: the cancel is lost, and a wait loop
    around the command would go on to its deadline (or forever). Here the
    command runs in a task of its own, and this coroutine awaits a shield of
    it, which a cancel always reaches. On a cancel the attempt is cancelled
    in turn, or handed to ``on_cancel(attempt)`` to finish and keep what it
    took; an attempt that loses that cancel too only finishes its command.
    """
    attempt = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        attempt.add_done_callback(_settle)
        if on_cancel is None:
            attempt.cancel()
        else:
            attempt.add_done_callback(on_cancel)
        raise


class Link:
    def __init__(self, url, retry_window=10.0):
        self.url = url
        self.masked = mask(url)
        url, own = _own_options(url)
        self.retry_window = own.get("retry_window", retry_window)
        self.wait_replicas = own.get("wait_replicas", 0)
        self.wait_timeout_ms = int(own.get("wait_timeout", 1.0) * 1000)
        self.cluster = bool(own.get("cluster", 0))
        if self.cluster and self.wait_replicas:
            raise ValueError(f"{self.masked!r}: wait_replicas is not available with cluster=1")
        self._redis_url = url
        self.closed = False
        try:
            if self.cluster:
                self.client = redis.cluster.RedisCluster.from_url(url, **_cluster_options())
            else:
                self.client = redis.Redis.from_url(url, **_options(url))
        except ValueError as exc:
            raise ValueError(f"bad redis url {self.masked!r}: {mask(str(exc))}") from None
        self.scripts = {n: self.client.register_script(s) for n, s in _SOURCES.items()}
        self._sha = {n: sc.sha.encode() for n, sc in self.scripts.items()}
        # The hot path's per-thread connections (see the module doc).
        self._fast = not self.cluster and not self.wait_replicas
        self._local = threading.local()
        self._conns = weakref.WeakSet()
        self._conns_lock = _lifetime.ForkSafeLock()
        self._aclients = {}               # event loop -> (client, scripts)
        self._alock = _lifetime.ForkSafeLock()

    # ------------------------------------------------------------ errors

    def unavailable(self, exc):
        return Unavailable(f"redis at {self.masked} is unreachable: "
                           f"{mask(str(exc)) or type(exc).__name__}")

    def _refusal(self, exc, what):
        """What a call raises for a server's refusal: a lost authentication
        is an outage to the caller, a fastmq script error its typed error."""
        if isinstance(exc, AuthenticationError):
            return self.unavailable(exc)
        return self.translate(exc, what)

    def translate(self, exc, what):
        text = str(exc)
        if text.startswith("FMQNOTFOUND"):
            return QueueNotFound(f"no fastmq {what} at {self.masked}")
        if text.startswith("FMQEXISTS"):
            return QueueExists(f"fastmq {what} exists at {self.masked}")
        return exc

    def _budget(self, timeout):
        if timeout is None:
            return self.retry_window
        return max(timeout, MIN_OUTAGE)

    def _check_open(self):
        if self.closed:
            raise QueueClosed("operation on a closed fastmq handle")

    # ------------------------------------------------------------- sync

    def _conn(self):
        """This thread's own connection (made again in a forked child)."""
        local = self._local
        generation = _lifetime.fork_generation
        if getattr(local, "generation", None) != generation:
            pool = self.client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            with self._conns_lock:
                self._conns.add(conn)
            local.conn, local.generation = conn, generation
            if self.closed:                # close() ran meanwhile: it missed this one
                conn.disconnect()
                self._check_open()
        return local.conn

    def _fast_call(self, name, key, args):
        conn = self._conn()
        packed = _pack(conn, (b"EVALSHA", self._sha[name], 1, key, *args))
        try:
            conn.send_packed_command(packed, check_health=False)
            try:
                return conn.read_response()
            except NoScriptError:          # the server lost its script cache
                conn.send_command("SCRIPT", "LOAD", _SOURCES[name], check_health=False)
                conn.read_response()
                conn.send_packed_command(packed, check_health=False)
                return conn.read_response()
        except ResponseError:
            raise                          # a whole reply was read: the connection is fine
        except BaseException:
            conn.disconnect()              # a reply may still be on its way: never reuse
            raise

    def call(self, name, key, args, timeout=None, what="queue"):
        """Run script ``name`` with KEYS=[key]; retries an outage (see above)."""
        if self.closed:
            raise QueueClosed("operation on a closed fastmq handle")
        outage = _Outage(self, timeout)
        while True:
            try:
                if self._fast:
                    return self._fast_call(name, key, args)
                script = self.scripts[name]
                if self.wait_replicas and name in _WRITES:
                    return self._call_and_wait(name, script, key, args)
                return script(keys=(key,), args=args, client=self.client)
            except Unavailable:
                raise
            except (AuthenticationError, ResponseError) as exc:
                raise self._refusal(exc, what) from None
            except _TRANSIENT as exc:
                time.sleep(outage.pause(exc))

    def _call_and_wait(self, name, script, key, args):
        """The script, then ``WAIT`` on the same connection (a pipeline):
        its writes reached ``wait_replicas`` replicas, or, for a put, an
        ``Unavailable`` that says it was applied on the primary only."""
        pipe = self.client.pipeline(transaction=False)
        script(keys=(key,), args=args, client=pipe)
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        return self._confirmed(name, *pipe.execute()[-2:])

    async def _acall_and_wait(self, name, script, key, args, client):
        """``_call_and_wait`` for asyncio."""
        pipe = client.pipeline(transaction=False)
        await script(keys=(key,), args=args, client=pipe)       # queues it
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        return self._confirmed(name, *(await pipe.execute())[-2:])

    def _confirmed(self, name, res, confirmed):
        """The script's reply, once ``WAIT`` said how many replicas have it."""
        if confirmed < self.wait_replicas and name in _PUTS:
            raise Unavailable(f"redis at {self.masked}: the write was applied on the primary "
                              f"but confirmed by {confirmed} of {self.wait_replicas} replicas "
                              f"within {self.wait_timeout_ms} ms (a failover may lose it)")
        return res

    def wait_signal(self, key, last_id, seconds):
        """Block until the signal stream ``key`` moves past ``last_id`` or
        ``seconds`` pass. Connection trouble just ends the wait (the next
        ``call`` deals with it)."""
        self._check_open()
        ms = max(1, int(min(seconds, WAIT_SLICE) * 1000))
        try:
            self.client.xread({key: last_id}, count=1, block=ms)
        except _TRANSIENT:
            self._check_open()
            time.sleep(min(0.05, seconds))

    def close(self):
        self.closed = True
        try:
            if self.cluster:
                self.client.disconnect_connection_pools()
            else:
                self.client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - closing must not raise
            pass
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.disconnect()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
        self._aclients.clear()

    # ------------------------------------------------------------ asyncio

    def _async(self):
        loop = asyncio.get_running_loop()
        entry = self._aclients.get(loop)
        if entry is None:
            with self._alock:
                for old in [lp for lp in self._aclients if lp.is_closed()]:
                    del self._aclients[old]
                if self.cluster:
                    client = redis.asyncio.cluster.RedisCluster.from_url(
                        self._redis_url, **_cluster_options())
                else:
                    client = redis.asyncio.Redis.from_url(self._redis_url,
                                                          **_options(self._redis_url))
                entry = (client, {n: client.register_script(s) for n, s in _SOURCES.items()})
                self._aclients[loop] = entry
        return entry

    async def acall(self, name, key, args, timeout=None, what="queue", on_cancel=None):
        """``call`` for asyncio; ``on_cancel(attempt)`` (see ``_apart``) gets
        the attempt in flight when the caller is cancelled."""
        self._check_open()
        client, table = self._async()
        script = table[name]
        outage = _Outage(self, timeout)
        while True:
            try:
                if self.wait_replicas and name in _WRITES:
                    return await _apart(self._acall_and_wait(name, script, key, args, client),
                                        on_cancel)
                return await _apart(script(keys=(key,), args=args, client=client), on_cancel)
            except Unavailable:
                raise
            except (AuthenticationError, ResponseError) as exc:
                raise self._refusal(exc, what) from None
            except _TRANSIENT as exc:
                await asyncio.sleep(outage.pause(exc))

    async def await_signal(self, key, last_id, seconds):
        self._check_open()
        client, _ = self._async()
        ms = max(1, int(min(seconds, WAIT_SLICE) * 1000))
        try:
            await _apart(client.xread({key: last_id}, count=1, block=ms))
        except _TRANSIENT:
            self._check_open()
            await asyncio.sleep(min(0.05, seconds))
