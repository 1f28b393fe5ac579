"""``fastmq ls/stat/pending/rm --url redis://...``: the commands on a Redis location.

Same output as on shared memory (``fastmq.cli``), with the url shown masked
(never its credentials).
"""
from __future__ import annotations

import json

from .. import cli as _cli
from .._location import resolve
from ..errors import QueueNotFound
from .exchange import RedisExchange
from .link import Link
from .queue import RedisQueue


def _url(args):
    return resolve(getattr(args, "url", None))[1]


def queue_names(url):
    link = Link(url)
    try:
        names = set()
        for k in link.client.scan_iter(match="fmq:{*}:m", count=1000):
            k = k.decode()
            names.add(k[len("fmq:{"):-len("}:m")])
        return sorted(names)
    finally:
        link.close()


def _ls_json(url, masked, names):
    queues, exchanges = [], []
    for name in names:
        try:
            q = RedisQueue.open(name, url=url)
            try:
                queues.append({"name": name, "status": "ok", **q.stats()})
            finally:
                q.close()
        except Exception as exc:  # noqa: BLE001
            queues.append({"name": name, "status": _cli._describe(exc)})
    for name in RedisExchange.list_names(url):
        try:
            ex = RedisExchange.open(name, url=url)
            try:
                exchanges.append({"name": name, "kind": ex.kind,
                                  "bindings": len(ex.bindings()), "status": "ok"})
            finally:
                ex.close()
        except Exception as exc:  # noqa: BLE001
            exchanges.append({"name": name, "status": _cli._describe(exc)})
    print(json.dumps({"url": masked, "backend": "redis", "queues": queues,
                      "exchanges": exchanges}, indent=2))
    return 0


def cmd_ls(args) -> int:
    url = _url(args)
    names = queue_names(url)
    masked = Link(url).masked
    if getattr(args, "json", False):
        return _ls_json(url, masked, names)
    if not names:
        print(f"no named fastmq queues at {masked}")
    else:
        print(f"queues at {masked}")
        rows = [("NAME", "DEPTH", "CAPACITY", "BYTES", "IN FLIGHT", "STATUS")]
        for name in names:
            try:
                q = RedisQueue.open(name, url=url)
                try:
                    s = q.stats()
                finally:
                    q.close()
                rows.append((name, str(s["depth"]), str(s["capacity"] or "-"),
                             str(s["bytes_in_use"]), str(s["in_flight"]), "ok"))
            except Exception as exc:  # noqa: BLE001 - one bad queue must not hide the others
                rows.append((name, "-", "-", "-", "-", _cli._describe(exc)))
        _cli._print_table(rows)
    xs = RedisExchange.list_names(url)
    if xs:
        rows = [("EXCHANGE", "KIND", "BINDINGS", "STATUS")]
        for name in xs:
            try:
                ex = RedisExchange.open(name, url=url)
                try:
                    rows.append((name, ex.kind, str(len(ex.bindings())), "ok"))
                finally:
                    ex.close()
            except Exception as exc:  # noqa: BLE001
                rows.append((name, "-", "-", _cli._describe(exc)))
        print()
        _cli._print_table(rows)
    return 0


def cmd_stat(args) -> int:
    q = RedisQueue.open(args.name, url=_url(args))
    try:
        return _cli._show_stats(args, q)      # stats(): QueueNotFound (exit 1) once removed
    finally:
        q.close()


def cmd_pending(args) -> int:
    q = RedisQueue.open(args.name, url=_url(args))
    try:
        items = q.pending()
    finally:
        q.close()
    if not items:
        print(f"no messages in flight in {args.name}")
        return 0
    print(f"{'ID':>18}  {'PID':>8}  {'IDLE s':>8}  {'EXPIRES IN s':>12}  {'DELIVERIES':>10}  "
          "CONSUMER")
    for m in sorted(items, key=lambda m: -m["idle"]):
        print(f"{m['id']:>18}  {m['pid']!s:>8}  {m['idle']:>8.1f}  {m['expires_in']:>12.1f}  "
              f"{m['delivery_count']!s:>10}  {m['consumer']}")
    return 0


def cmd_rm(args) -> int:
    url = _url(args)
    for name in args.names:
        try:
            RedisQueue.unlink(name, url=url)
        except QueueNotFound:
            try:
                RedisExchange.unlink(name, url=url)
            except QueueNotFound:
                raise QueueNotFound(f"no fastmq queue or exchange named {name!r} at "
                                    f"{Link(url).masked}") from None
    return 0


COMMANDS = {"ls": cmd_ls, "stat": cmd_stat, "pending": cmd_pending, "rm": cmd_rm}
