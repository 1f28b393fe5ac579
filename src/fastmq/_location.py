"""Where a named queue or exchange lives: the ``url=`` of its constructors.

``url=None`` means the environment's ``FASTMQ_URL`` and, without it, shared
memory on this host. The forms:

* ``shm:`` -- POSIX shared memory on this host (the default);
* ``redis://[user:password@]host:port/db`` and ``rediss://...`` (TLS) -- a
  Redis (>= 7) or Valkey server, through ``fastmq._redis`` (needs the
  ``redis`` extra: ``pip install fastmq[redis]``); ``unix:///path/redis.sock``
  is a Redis server on a Unix socket of this host;
* ``file:///dir`` -- durable queues: one file per queue (``<name>.fmq``) in
  that directory, on a real (disk) filesystem; see ``file_path``. Exchanges
  are not available there (``NotImplementedError``).

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

__all__ = ["resolve", "queue_class", "exchange_class", "mask", "ENV", "file_dir", "file_path",
           "FILE_SUFFIX"]

FILE_SUFFIX = ".fmq"                      # a durable queue's file: <dir>/<name>.fmq

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
                         "file:///dir, redis://host:port/db or rediss://host:port/db")
    if scheme == "file":
        file_dir(url)                     # checks the form
    if scheme in ("redis", "rediss") and not urllib.parse.urlsplit(url).hostname:
        raise ValueError(f"{mask(url)!r}: a redis url needs a host "
                         "(redis://[user:password@]host:port/db)")
    return scheme, url


def file_dir(url) -> str:
    """The directory of a ``file:///dir`` location (absolute, normalised)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ValueError(f"{mask(url)!r}: a durable location is file:///absolute/dir "
                         "(no host, query or fragment)")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"{mask(url)!r}: the directory must be absolute (file:///var/lib/q)")
    if "\0" in path:
        raise ValueError(f"{mask(url)!r}: the path contains a NUL")
    return os.path.normpath(path)


def file_path(url, name) -> str:
    """The file of durable queue ``name`` (a validated queue name) at ``url``."""
    return os.path.join(file_dir(url), name + FILE_SUFFIX)


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
    """The queue class for ``url``, or None for shared memory and durable
    files (both are the caller's own ``Queue``, on another ring)."""
    scheme, _ = resolve(url)
    return None if scheme in ("shm", "file") else location_module(scheme).RedisQueue


def exchange_class(url):
    """The exchange class for ``url``, or None for shared memory."""
    scheme, _ = resolve(url)
    if scheme == "file":
        raise NotImplementedError(f"exchanges are not available at a file:// location "
                                  f"({mask(url)!r}): create the exchange in shared memory "
                                  "(its bindings name queues there) or on redis://")
    return None if scheme == "shm" else location_module(scheme).RedisExchange


_CREDENTIALS = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^@/]*@")


def mask(url) -> str:
    """``url`` without its credentials (``redis://***@host:6379/0``); also
    masks ``password=`` query parameters."""
    text = _CREDENTIALS.sub(r"\1***@", str(url))
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", text)
