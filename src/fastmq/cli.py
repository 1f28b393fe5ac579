"""The ``fastmq`` command (also ``python -m fastmq``).

    fastmq bench [...]            the comparison benchmark (fastmq.bench)
    fastmq ls [--json]            named queues (depth, capacity, owner) and exchanges
    fastmq stat NAME [--watch] [--json | --prometheus]
                                  the stats block of one queue (live, with rates and
                                  fill, with --watch; JSON, or the Prometheus text
                                  exposition format, for monitoring)
    fastmq pending NAME           messages in flight (leased, not yet acked)
    fastmq rm NAME...             unlink named queues or exchanges (handles keep
                                  working); removes every name that exists and
                                  reports the missing ones
    fastmq dump NAME -o FILE [--drain] [--force]
                                  write the queue's messages and options to a
                                  checksummed file (a copy, or with --drain a
                                  move); see fastmq._dump
    fastmq restore FILE NAME [--append]
                                  verify a dump as a whole, then recreate the
                                  queue from it (here or at another --url)
    fastmq --version

Exit status: 0 ok; 1 error, with a one-line message on stderr and no traceback
for errors the user can act on (no such queue, bad name, corrupt segment, no
permission, ...); 2 bad usage; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

QUEUE_PREFIX = "fastmq-q-"
STAT_KEYS = ("depth", "capacity", "enqueued", "dequeued", "bytes_in_use", "producers",
             "consumers", "redelivered", "abandoned", "dead_lettered")


class UserError(Exception):
    """An error reported as one line on stderr, exit status 1."""


def _err(msg: str) -> None:
    print(f"fastmq: error: {msg}", file=sys.stderr)


def _fastmq():
    try:
        import fastmq
    except ImportError as exc:
        raise UserError(f"cannot import fastmq: {exc}") from None
    return fastmq


def _user_errors():
    """Exception types turned into a one-line message (exit 1), not a traceback."""
    types = [OSError, ValueError, TypeError, UserError]
    try:
        import fastmq
        types.append(fastmq.Error)
    except ImportError:
        pass
    return tuple(types)


def _owner(uid: int) -> str:
    try:
        import pwd
        return f"{pwd.getpwuid(uid).pw_name}({uid})"
    except (ImportError, KeyError):
        return str(uid)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}".replace("\n", " ")


# ---------------------------------------------------------------- commands --

def _shm_dir(fastmq) -> str:
    """Where the default backend's named queues are (see fastmq._pure.portable)."""
    from . import _lifetime
    return _lifetime.NATIVE_SHM_DIR if fastmq.backend == "native" else _lifetime.SHM_DIR


def human_bytes(n) -> str:
    """1536 -> '1.5KiB' (IEC units, one decimal; no space, so columns split)."""
    if not isinstance(n, int) or isinstance(n, bool):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cmd_ls(args) -> int:
    fastmq = _fastmq()
    shm_dir = args.shm_dir or _shm_dir(fastmq)
    try:
        entries = sorted(e for e in os.listdir(shm_dir) if e.startswith(QUEUE_PREFIX))
    except OSError as exc:
        raise UserError(f"cannot list {shm_dir}: {exc.strerror or exc}") from None
    queues = [_queue_row(fastmq, shm_dir, e) for e in entries]
    exchanges = [_exchange_row(fastmq, n) for n in (
        fastmq.Exchange.list_names(args.shm_dir) if args.shm_dir
        else fastmq.Exchange.list_names())]
    if args.json:
        print(json.dumps({"directory": shm_dir, "backend": fastmq.backend,
                          "queues": queues, "exchanges": exchanges}, indent=2))
        return 0
    if queues:
        rows = [("NAME", "DEPTH", "CAPACITY", "FILL", "MEMORY", "CAP", "OWNER", "MODE",
                 "STATUS")]
        for q in queues:
            fill = (f"{100 * q['depth'] / q['capacity']:.0f}%"
                    if q.get("depth") is not None and q.get("capacity") else "-")
            rows.append((q["name"], _or_dash(q.get("depth")), _or_dash(q.get("capacity")),
                         fill, _bytes_or_dash(q.get("memory_bytes")),
                         _bytes_or_dash(q.get("capacity_bytes")),
                         q.get("owner") or "?", q.get("mode") or "?", q["status"]))
        _print_table(rows)
    else:
        print(f"no named fastmq queues in {shm_dir}")
    if exchanges:
        print()
        _print_table([("EXCHANGE", "KIND", "BINDINGS", "STATUS")] + [
            (x["name"], x.get("kind") or "-", _or_dash(x.get("bindings")), x["status"])
            for x in exchanges])
    return 0


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _bytes_or_dash(value) -> str:
    return "-" if value is None else human_bytes(value)


def _queue_row(fastmq, shm_dir, entry) -> dict:
    # size_bytes is the file's apparent size (address space: segments are
    # sparse); memory_bytes what it holds in /dev/shm (its allocated pages).
    row = {"name": entry[len(QUEUE_PREFIX):], "depth": None, "capacity": None,
           "size_bytes": None, "memory_bytes": None, "capacity_bytes": None,
           "owner": None, "mode": None, "status": "ok"}
    try:
        st = os.stat(os.path.join(shm_dir, entry))
        row.update(owner=_owner(st.st_uid), mode=oct(st.st_mode & 0o777)[2:],
                   size_bytes=st.st_size, memory_bytes=st.st_blocks * 512)
    except OSError as exc:
        row["status"] = _describe(exc)
        return row
    try:
        q = fastmq.Queue.open(row["name"])
        try:
            s = q.stats()
        finally:
            q.close()
        row.update(depth=s.get("depth"), capacity=s.get("capacity"),
                   capacity_bytes=s.get("capacity_bytes"))
    except Exception as exc:  # noqa: BLE001 - one bad segment must not hide the others
        row["status"] = _describe(exc)
    return row


def _exchange_row(fastmq, name) -> dict:
    try:
        with fastmq.Exchange.open(name) as ex:
            return {"name": name, "kind": ex.kind, "bindings": len(ex.bindings()),
                    "status": "ok"}
    except Exception as exc:  # noqa: BLE001 - one bad file must not hide the others
        return {"name": name, "kind": None, "bindings": None, "status": _describe(exc)}


def _print_table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


BYTE_KEYS = ("bytes_in_use", "max_message_size", "capacity_bytes")


def _stalled(value) -> str:
    if not value:
        return "no"
    if isinstance(value, dict):
        since = value.get("since_seconds")
        since = f" for {since:.1f} s" if isinstance(since, (int, float)) else ""
        return f"yes: pid {value.get('pid', '?')} {value.get('phase', '?')}{since}"
    return str(value)


def _stats_block(name: str, stats: dict, previous=None, elapsed=None) -> str:
    """The stats of ``name``; with ``previous`` (the stats ``elapsed`` seconds
    earlier), counters also show their rate and the sizes their fill."""
    lines = [f"queue {name}"]
    keys = [k for k in STAT_KEYS if k in stats] + sorted(k for k in stats if k not in STAT_KEYS)
    width = max(len(k) for k in keys) if keys else 0
    for k in keys:
        v = stats[k]
        if k == "stalled":
            text = _stalled(v)
        elif k == "memory" and isinstance(v, dict):
            text = ", ".join(
                f"{part} {n:,}" if part.startswith("slots") or not isinstance(n, int)
                else f"{part} {human_bytes(n)}" for part, n in v.items())
        elif isinstance(v, int) and not isinstance(v, bool):
            text = f"{v:,}"
            if k in BYTE_KEYS:
                text += f" ({human_bytes(v)})"
        else:
            text = str(v)
        if k == "depth" and stats.get("capacity"):
            text += f"  ({100 * v / stats['capacity']:.1f}% full)"
        if k == "bytes_in_use" and stats.get("capacity_bytes"):
            text += f"  ({100 * v / stats['capacity_bytes']:.1f}% of capacity_bytes)"
        if (previous is not None and elapsed and k in ("enqueued", "dequeued", "redelivered",
                                                       "dead_lettered", "abandoned")
                and isinstance(previous.get(k), int)):
            text += f"  ({(v - previous[k]) / elapsed:,.1f}/s)"
        lines.append(f"  {k:<{width}}  {text}")
    return "\n".join(lines)


# Prometheus: which stats are counters (only go up); the rest are gauges.
COUNTERS = ("enqueued", "dequeued", "redelivered", "abandoned", "dead_lettered",
            "reclaimed_blocks", "recoveries")
HELP = {
    "depth": "Messages in the queue.",
    "capacity": "Capacity of the queue in messages (maxsize).",
    "enqueued": "Messages put into the queue.",
    "dequeued": "Messages taken from the queue.",
    "bytes_in_use": "Bytes of shared memory holding messages.",
    "producers": "Processes that have put into the queue and are alive.",
    "consumers": "Processes that have taken from the queue and are alive.",
    "redelivered": "Leased messages delivered again after their lease ran out.",
    "abandoned": "Messages whose writer or reader died mid-way.",
    "dead_lettered": "Messages moved to the dead-letter queue.",
    "stalled": "1 if a live participant has been stuck in a slot (stopped?), else 0.",
}


def prometheus_text(name: str, stats: dict) -> str:
    """``stats`` in the Prometheus text exposition format (version 0.0.4)."""
    label = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    out = []
    keys = [k for k in STAT_KEYS if k in stats] + sorted(k for k in stats if k not in STAT_KEYS)
    for k in keys:
        v = stats[k]
        if k == "stalled":
            samples = [("fastmq_stalled", 1 if v else 0)]
            if isinstance(v, dict) and isinstance(v.get("since_seconds"), (int, float)):
                samples.append(("fastmq_stalled_seconds", v["since_seconds"]))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            metric = f"fastmq_{k}_total" if k in COUNTERS else f"fastmq_{k}"
            samples = [(metric, v)]
        else:
            continue
        for metric, value in samples:
            kind = "counter" if metric.endswith("_total") else "gauge"
            out.append(f"# HELP {metric} {HELP.get(k, k.replace('_', ' ') + '.')}")
            out.append(f"# TYPE {metric} {kind}")
            out.append(f'{metric}{{queue="{label}"}} {value}')
    return "\n".join(out) + "\n"


def _queue_exists(name: str) -> bool:
    """Does the name still refer to a queue (of either backend)?"""
    from . import _lifetime, _names
    segment = _names.segment_for(name)
    return any(os.path.exists(os.path.join(d, segment))
               for d in (_lifetime.NATIVE_SHM_DIR, _lifetime.SHM_DIR))


def _json_stats(name: str, stats: dict) -> str:
    return json.dumps({"queue": name, "time": time.time(), "stats": stats})


def cmd_stat(args) -> int:
    fastmq = _fastmq()
    q = fastmq.Queue.open(args.name)
    try:
        return _show_stats(args, q, lambda: _queue_exists(args.name))
    finally:
        q.close()


def _show_stats(args, q, still_there=None) -> int:
    """``fastmq stat`` on the open queue ``q``, wherever it lives: one
    snapshot (text, --json or --prometheus), or with --watch one every
    --interval seconds, with rates, until Ctrl-C (exit 0). ``still_there()``
    says whether the name still refers to the queue (removed: exit 1); a
    location whose ``stats()`` raises QueueNotFound once the queue is gone
    needs none."""
    if not args.watch:
        stats = q.stats()
        if args.json:
            print(_json_stats(args.name, stats))
        elif args.prometheus:
            sys.stdout.write(prometheus_text(args.name, stats))
        else:
            print(_stats_block(args.name, stats))
        return 0
    tty = sys.stdout.isatty() and not args.json
    previous = then = None
    try:
        while True:
            if still_there is not None and not still_there():
                raise UserError(f"queue {args.name!r} was removed")
            stats, now = q.stats(), time.monotonic()
            if args.json:
                print(_json_stats(args.name, stats), flush=True)
            else:
                block = _stats_block(args.name, stats, previous,
                                     None if then is None else now - then)
                stamp = time.strftime("%H:%M:%S")
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(f"{block}\n  (at {stamp}; every {args.interval:g} s, "
                      f"Ctrl-C to stop)", flush=True)
            previous, then = stats, now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_pending(args) -> int:
    fastmq = _fastmq()
    q = fastmq.Queue.open(args.name)
    try:
        items = q.pending()       # read-only: lists every in-flight entry
    finally:
        q.close()
    if not items:
        print(f"no messages in flight in {args.name}")
        return 0
    print(f"{'ID':>8}  {'PID':>8}  {'IDLE s':>8}  {'EXPIRES IN s':>12}  {'DELIVERIES':>10}")
    if any(m.get("orphaned") and m.get("pid") for m in items):
        print("(* its consumer exited: the message goes back to the queue within about "
              "a second while any consumer uses it)")
    if any(m.get("dead_letter") for m in items):
        print("(dlq: a dead letter waiting to be forwarded to the dead-letter queue)")
    for m in sorted(items, key=lambda m: -m.get("idle", 0)):
        pid = m.get("pid") or "orphan"     # 0: its holder is gone, due now
        if m.get("orphaned") and m.get("pid"):
            pid = f"{pid}*"                # * its holder exited: coming back
        expires = _seconds(m.get("expires_in"))
        if m.get("dead_letter"):
            pid, expires = "dlq", "-"
        print(f"{m.get('id', '?')!s:>8}  {pid!s:>8}  {_seconds(m.get('idle')):>8}  "
              f"{expires:>12}  {m.get('delivery_count', '?')!s:>10}")
    return 0


def _seconds(value):
    return f"{value:.1f}" if isinstance(value, (int, float)) else "?"


def cmd_rm(args) -> int:
    """Unlink queues, or exchanges of that name when there is no such queue.

    Every name is tried; the ones that could not be removed are reported
    together on one line (exit 1)."""
    fastmq = _fastmq()
    missing, failed = [], []
    for name in args.names:
        try:
            try:
                fastmq.Queue.unlink(name)
            except fastmq.QueueNotFound:
                fastmq.Exchange.unlink(name)
        except fastmq.QueueNotFound:
            missing.append(name)
        except _user_errors() as exc:
            failed.append(f"{name!r}: {_describe(exc)}")
    problems = failed
    if missing:
        problems = [f"no fastmq queue or exchange named "
                    f"{', '.join(repr(n) for n in missing)}"] + failed
    if problems:
        removed = len(args.names) - len(missing) - len(failed)
        raise UserError("; ".join(problems) + (f" (removed the other {removed})"
                                               if removed else ""))
    return 0


def _located(args):
    """The command for a ``--url`` / ``FASTMQ_URL`` elsewhere than this host's
    shared memory (``fastmq._redis.cli``), or None."""
    if args.command not in ("ls", "stat", "pending", "rm"):
        return None
    from . import _location
    scheme, url = _location.resolve(args.url)
    if scheme == "shm":
        return None
    if scheme == "file":
        return _file_command(args.command, url)
    try:
        located = _location.location_module(scheme, ".cli")
    except ImportError as exc:
        raise UserError(f"{args.url or os.environ.get(_location.ENV)!r}: {exc}") from None
    return located.COMMANDS[args.command]


def cmd_dump(args) -> int:
    from . import _dump
    done = _dump.dump_queue(args.name, args.output, url=args.url, drain=args.drain,
                            force=args.force, lease=args.lease)
    what = (f"dumped {done['count']} message(s) ({human_bytes(done['bytes'])}) of queue "
            f"{args.name!r} to {done['path']}")
    if args.drain:
        tail = "drained: they left the queue"
        if done["already_back"]:
            tail += (f"; {done['already_back']} lease(s) ran out first, so those are also "
                     "still in the queue")
    else:
        tail = "copied: they are back in the queue, each delivery count one higher"
    if done["left_behind"]:
        tail += (f"; {done['left_behind']} ready message(s) are not in it: the queue's "
                 "in-flight table was full (consumers hold many leases)")
    if done["in_flight_elsewhere"]:
        tail += (f"; {done['in_flight_elsewhere']} message(s) leased by consumers are not "
                 "in it")
    print(f"{what} ({tail})")
    return 0


def cmd_restore(args) -> int:
    from . import _dump
    done = _dump.restore_queue(args.file, args.name, url=args.url, append=args.append,
                               timeout=args.timeout)
    where = "new queue" if done["created"] else "queue"
    how = "as one atomic batch" if done["atomic"] else "in order"
    print(f"restored {done['count']} message(s) ({human_bytes(done['bytes'])}) into {where} "
          f"{args.name!r} {how}" + (f"; {done['redelivered']} had been delivered before "
                                    "(their delivery counts start over)"
                                    if done["redelivered"] else ""))
    return 0


def _positive(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _file_command(command, url):
    """ls/stat/pending/rm on a ``file:///dir`` location (durable queues)."""
    from . import _location

    def ls(args) -> int:
        fastmq = _fastmq()
        directory = _location.file_dir(url)
        try:
            names = sorted(n[:-len(_location.FILE_SUFFIX)] for n in os.listdir(directory)
                           if n.endswith(_location.FILE_SUFFIX))
        except OSError as exc:
            raise UserError(f"cannot list {directory}: {exc.strerror or exc}") from None
        queues = []
        for name in names:
            path = os.path.join(directory, name + _location.FILE_SUFFIX)
            row = {"name": name, "depth": None, "capacity": None, "sync": None,
                   "disk_bytes": None, "status": "ok"}
            try:
                st = os.stat(path)
                row["disk_bytes"] = st.st_blocks * 512
                q = fastmq.Queue.open(name, url=url)
                try:
                    stats = q.stats()
                finally:
                    q.close()
                row.update(depth=stats["depth"], capacity=stats["capacity"],
                           sync=stats.get("sync"))
            except Exception as exc:  # one bad file must not hide the others
                row["status"] = f"error: {_describe(exc)}"
            queues.append(row)
        if args.json:
            print(json.dumps({"directory": directory, "queues": queues}, indent=2))
            return 0
        if not queues:
            print(f"no durable fastmq queues in {directory}")
            return 0
        rows = [("NAME", "DEPTH", "CAPACITY", "SYNC", "DISK", "STATUS")]
        for q in queues:
            rows.append((q["name"], _or_dash(q["depth"]), _or_dash(q["capacity"]),
                         q["sync"] or "-", _bytes_or_dash(q["disk_bytes"]), q["status"]))
        _print_table(rows)
        return 0

    def via_env(args) -> int:
        # stat/pending/rm open the queue by name: the location comes from here
        os.environ[_location.ENV] = url
        return args.func(args)

    return ls if command == "ls" else via_env


def cmd_bench(args) -> int:
    from . import bench
    return bench.run_from_args(args, args._parser)


# ------------------------------------------------------------------ parser --

def _version() -> str:
    try:
        import fastmq
        return f"fastmq {fastmq.__version__} (backend {getattr(fastmq, 'backend', '?')})"
    except Exception as exc:  # noqa: BLE001
        return f"fastmq (not importable: {exc})"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and backend, then exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" where there is a default worth showing (not on flags)."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _url_and_command(p, func):
    """The end of every command's parser but bench's: ``--url`` (the location)
    and ``func``, the command."""
    p.add_argument("--url", help="where (default: $FASTMQ_URL, else this host's shared memory)")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmq", description="fastmq: shared-memory message queues for Python processes.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from . import bench
    p = sub.add_parser("bench", help="compare fastmq with multiprocessing, faster-fifo, pyzmq",
                       description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(p)
    p.set_defaults(func=cmd_bench, _parser=p)

    fmt = _DefaultsFormatter
    p = sub.add_parser("ls", help="list the named queues and exchanges on this host",
                       description="List the named queues (depth, capacity, fill, size of "
                       "the shared memory, owner, mode) and the exchanges.",
                       formatter_class=fmt)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document instead of the tables")
    p.add_argument("--shm-dir", default=None, help=argparse.SUPPRESS)
    _url_and_command(p, cmd_ls)

    p = sub.add_parser("stat", help="show a queue's stats block",
                       description="Show the stats of one named queue.", formatter_class=fmt)
    p.add_argument("name", help="the queue's name (as given to Queue.create)")
    p.add_argument("-w", "--watch", action="store_true",
                   help="refresh until Ctrl-C, with rates (per second) and fill; "
                   "exits 1 if the queue is removed")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes with --watch")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="print the stats as one JSON object (one per line with --watch)")
    out.add_argument("--prometheus", action="store_true",
                     help="print the stats in the Prometheus text exposition format")
    _url_and_command(p, cmd_stat)

    p = sub.add_parser("pending", help="list a queue's in-flight (unacked) messages",
                       description="List the messages of a queue that are leased "
                       "(get_message) and not yet acked.", formatter_class=fmt)
    p.add_argument("name", help="the queue's name")
    _url_and_command(p, cmd_pending)

    p = sub.add_parser("rm", help="unlink named queues or exchanges (open handles keep working)",
                       description="Unlink named queues (or exchanges, where no queue has "
                       "the name). Every name is tried; missing ones are reported "
                       "together and make the exit status 1.", formatter_class=fmt)
    p.add_argument("names", nargs="+", metavar="NAME", help="queue or exchange names")
    _url_and_command(p, cmd_rm)

    p = sub.add_parser("dump", help="back a queue up to a file (a copy, or a move with --drain)",
                       description="Write the queue's messages, in order, and the options "
                       "that recreate it to FILE: a versioned, checksummed dump. The "
                       "messages are leased while they are written, so a dump killed at any "
                       "moment loses none. Without --drain they are given back afterwards "
                       "(a copy: each one's delivery count goes up by one); with --drain "
                       "they are acked once FILE is complete and on disk (a move; killed "
                       "after that, some may be in both places, none in neither).",
                       formatter_class=fmt)
    p.add_argument("name", help="the queue's name")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="the dump file (written under a temporary name, then renamed)")
    p.add_argument("--drain", action="store_true",
                   help="move the messages: ack them once FILE is safely written")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--lease", type=_positive, default=300.0, metavar="SECONDS",
                   help="lease of the messages while the dump holds them (renewed while "
                   "it runs; a dump that is stopped, not killed, keeps them this long)")
    _url_and_command(p, cmd_dump)

    p = sub.add_parser("restore", help="recreate a queue from a dump file",
                       description="Verify the whole dump (magic, version, checksums, "
                       "count), then create the queue NAME with the options it records "
                       "and put its messages in, in order. A damaged or truncated dump is "
                       "refused before anything is put. An existing queue is used as it "
                       "is; one that holds messages is refused unless --append.",
                       formatter_class=fmt)
    p.add_argument("file", metavar="FILE", help="a file written by fastmq dump")
    p.add_argument("name", help="the queue to restore into (created if it does not exist)")
    p.add_argument("--append", action="store_true",
                   help="restore into a queue that already holds messages, behind them")
    p.add_argument("--timeout", type=_positive, default=30.0, metavar="SECONDS",
                   help="how long a put may wait for room in the queue")
    _url_and_command(p, cmd_restore)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("fastmq: error: a command is required (bench, ls, stat, pending, rm, dump, "
              "restore)",
              file=sys.stderr)
        return 2
    if getattr(args, "interval", 1.0) <= 0:
        parser.error("--interval must be > 0")
    if getattr(args, "watch", False) and getattr(args, "prometheus", False):
        parser.error("--prometheus prints one snapshot; it does not combine with --watch "
                     "(a Prometheus scraper polls on its own)")
    try:
        return (_located(args) or args.func)(args)
    except KeyboardInterrupt:
        print("fastmq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:            # e.g. `fastmq ls | head -1`: not an error worth a line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _user_errors() as exc:
        _err(str(exc) if isinstance(exc, UserError) else _describe(exc))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
