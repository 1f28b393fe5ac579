"""Where a named queue or exchange lives: the ``url=`` of its constructors.

``url=None`` means the environment's ``FASTMQ_URL`` and, without it, shared
memory on this host. The forms:

* ``shm:`` -- POSIX shared memory on this host (the default);
* ``redis://[user:password@]host:port/db`` and ``rediss://...`` (TLS) -- a
  Redis (>= 7) or Valkey server, through ``fastmq._redis`` (needs the
  ``redis`` extra: ``pip install fastmq[redis]``); ``unix:///path/redis.sock``
  is a Redis server on a Unix socket of this host;
* ``file:///dir`` -- durable queues in a directory: not in this version, so
  it is a ``ValueError`` that says so rather than a silent fall-back.

``mask()`` is what every message, ``repr`` and CLI line shows of a URL: the
password (and the user name) replaced by ``***``.

A location other than shared memory is served by a module named in
``_LOCATIONS`` and imported by that name when first needed (the same registry
pattern as ``_backend._MODULES``): those modules import this one (for
``resolve`` and ``mask``) and build on ``fastmq.queue``, so a plain import of
them from here would make every layer an import cycle.
"""
from __future__ import annotations

import importlib
import os
import re
import urllib.parse

__all__ = ["resolve", "queue_class", "exchange_class", "mask", "ENV"]

ENV = "FASTMQ_URL"
_SCHEMES = ("shm", "redis", "rediss", "unix", "file")


def resolve(url):
    """``(scheme, url)`` for ``url`` (``None``: ``$FASTMQ_URL``, else ``shm:``)."""
    if url is None:
        url = os.environ.get(ENV) or "shm:"
    if not isinstance(url, str):
        raise TypeError(f"url must be a str or None, not {type(url).__name__}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in _SCHEMES:
        raise ValueError(f"unsupported fastmq location {mask(url)!r}: use shm:, "
                         "redis://host:port/db or rediss://host:port/db")
    if scheme == "file":
        raise ValueError(f"durable file:// queues are not available in this version "
                         f"({mask(url)!r}); use shm: (this host) or redis:// (many hosts)")
    if scheme in ("redis", "rediss") and not urllib.parse.urlsplit(url).hostname:
        raise ValueError(f"{mask(url)!r}: a redis url needs a host "
                         "(redis://[user:password@]host:port/db)")
    return scheme, url


# scheme -> the module that serves it (shm: is the caller's own)
_LOCATIONS = {"redis": "fastmq._redis", "rediss": "fastmq._redis", "unix": "fastmq._redis"}


def location_module(scheme, part=""):
    """The module serving ``scheme`` (``part``: one of its submodules, e.g.
    ``".cli"``); ImportError saying what to install when its client library
    is missing."""
    try:
        return importlib.import_module(_LOCATIONS[scheme] + part)
    except ImportError as exc:         # the optional client library is missing
        raise ImportError(f"a {scheme}:// location needs the redis client library: "
                          f"pip install fastmq[redis] ({exc})") from None


def queue_class(url):
    """The queue class for ``url``, or None for shared memory (the caller's own)."""
    scheme, _ = resolve(url)
    return None if scheme == "shm" else location_module(scheme).RedisQueue


def exchange_class(url):
    """The exchange class for ``url``, or None for shared memory."""
    scheme, _ = resolve(url)
    return None if scheme == "shm" else location_module(scheme).RedisExchange


_CREDENTIALS = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^@/]*@")


def mask(url) -> str:
    """``url`` without its credentials (``redis://***@host:6379/0``); also
    masks ``password=`` query parameters."""
    text = _CREDENTIALS.sub(r"\1***@", str(url))
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", text)
