"""fastmq over Redis (>= 7) or Valkey streams: ``url="redis://..."``.

``RedisQueue`` and ``RedisExchange`` are what ``fastmq.Queue`` and
``fastmq.Exchange`` return for a ``redis://`` or ``rediss://`` location (see
``queue.py`` for what differs from shared memory, ``scripts.py`` for the data
layout, ``link.py`` for connection failures). Needs the ``redis`` client
library: ``pip install fastmq[redis]``.
"""
from __future__ import annotations

import redis  # noqa: F401 - the ImportError here is what names the missing extra

from .exchange import RedisExchange
from .queue import HEARTBEAT_TIMEOUT, RedisMessage, RedisQueue

__all__ = ["RedisQueue", "RedisExchange", "RedisMessage", "HEARTBEAT_TIMEOUT"]
