"""fastmq over Redis (>= 7) or Valkey: ``url="redis://..."``.

``RedisQueue`` and ``RedisExchange`` are what ``fastmq.Queue`` and
``fastmq.Exchange`` return for a ``redis://``, ``rediss://`` (TLS) or
``unix://`` location (see ``queue.py`` for what differs from shared memory,
``scripts.py`` for the data layout, ``link.py`` for connection failures,
replication and Redis Cluster). Needs the ``redis`` client library:
``pip install fastmq[redis]``.

The url: ``redis://[user:password@]host:port/db`` plus, in its query, the
options redis-py knows (``ssl_ca_certs=...`` for ``rediss``, ...) and
fastmq's own: ``retry_window=SECONDS`` (how long a call without a timeout
rides out an outage; default 10), ``wait_replicas=N`` and
``wait_timeout=SECONDS`` (wait for replication after each write),
``cluster=1`` (Redis Cluster). A pickled handle carries its url, password
included, so the copy can connect; ``repr``, ``stats()["url"]``, errors and
the CLI show the url with its credentials masked.
"""
from __future__ import annotations

import redis  # noqa: F401 - the ImportError here is what names the missing extra

from .exchange import RedisExchange
from .queue import HEARTBEAT_TIMEOUT, RedisMessage, RedisQueue

__all__ = ["RedisQueue", "RedisExchange", "RedisMessage", "HEARTBEAT_TIMEOUT"]
