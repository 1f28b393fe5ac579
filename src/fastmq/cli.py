"""The ``fastmq`` command (also ``python -m fastmq``).

    fastmq bench [...]            the comparison benchmark (fastmq.bench)
    fastmq ls                     named queues (depth, capacity, owner) and exchanges
    fastmq stat NAME [--watch]    the stats block of one queue (live with --watch)
    fastmq pending NAME           messages in flight (leased, not yet acked)
    fastmq rm NAME                unlink a named queue or exchange (handles keep working)
    fastmq --version

Exit status: 0 ok; 1 error, with a one-line message on stderr and no traceback
for errors the user can act on (no such queue, bad name, corrupt segment, no
permission, ...); 2 bad usage; 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SHM_DIR = "/dev/shm"
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

def cmd_ls(args) -> int:
    fastmq = _fastmq()
    try:
        entries = sorted(e for e in os.listdir(args.shm_dir) if e.startswith(QUEUE_PREFIX))
    except OSError as exc:
        raise UserError(f"cannot list {args.shm_dir}: {exc.strerror or exc}") from None
    if entries:
        _ls_queues(fastmq, args.shm_dir, entries)
    else:
        print(f"no named fastmq queues in {args.shm_dir}")
    _ls_exchanges(fastmq, fastmq.Exchange.list_names(args.shm_dir))
    return 0


def _ls_queues(fastmq, shm_dir, entries):
    rows = [("NAME", "DEPTH", "CAPACITY", "BYTES", "OWNER", "MODE", "STATUS")]
    for entry in entries:
        name = entry[len(QUEUE_PREFIX):]
        path = os.path.join(shm_dir, entry)
        try:
            st = os.stat(path)
            owner, mode, size = _owner(st.st_uid), oct(st.st_mode & 0o777)[2:], st.st_size
        except OSError as exc:
            rows.append((name, "-", "-", "-", "?", "?", _describe(exc)))
            continue
        try:
            q = fastmq.Queue.open(name)
            try:
                s = q.stats()
            finally:
                q.close()
            rows.append((name, str(s.get("depth", "?")), str(s.get("capacity", "?")),
                         str(size), owner, mode, "ok"))
        except Exception as exc:  # noqa: BLE001 - one bad segment must not hide the others
            rows.append((name, "-", "-", str(size), owner, mode, _describe(exc)))
    _print_table(rows)


def _print_table(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def _ls_exchanges(fastmq, names):
    if not names:
        return
    rows = [("EXCHANGE", "KIND", "BINDINGS", "STATUS")]
    for name in names:
        try:
            with fastmq.Exchange.open(name) as ex:
                rows.append((name, ex.kind, str(len(ex.bindings())), "ok"))
        except Exception as exc:  # noqa: BLE001 - one bad file must not hide the others
            rows.append((name, "-", "-", _describe(exc)))
    print()
    _print_table(rows)


def _stats_block(name: str, stats: dict) -> str:
    lines = [f"queue {name}"]
    keys = [k for k in STAT_KEYS if k in stats] + sorted(k for k in stats if k not in STAT_KEYS)
    width = max(len(k) for k in keys) if keys else 0
    for k in keys:
        v = stats[k]
        lines.append(f"  {k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                     else f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def cmd_stat(args) -> int:
    fastmq = _fastmq()
    q = fastmq.Queue.open(args.name)
    try:
        if not args.watch:
            print(_stats_block(args.name, q.stats()))
            return 0
        tty = sys.stdout.isatty()
        try:
            while True:
                block = _stats_block(args.name, q.stats())
                stamp = time.strftime("%H:%M:%S")
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(f"{block}\n  (at {stamp}; every {args.interval:g} s, Ctrl-C to stop)",
                      flush=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0
    finally:
        q.close()


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
    for m in sorted(items, key=lambda m: -m.get("idle", 0)):
        pid = m.get("pid") or "orphan"     # 0: its holder is gone, due now
        if m.get("orphaned") and m.get("pid"):
            pid = f"{pid}*"                # * its holder exited: coming back
        print(f"{m.get('id', '?')!s:>8}  {pid!s:>8}  {_seconds(m.get('idle')):>8}  "
              f"{_seconds(m.get('expires_in')):>12}  {m.get('delivery_count', '?')!s:>10}")
    return 0


def _seconds(value):
    return f"{value:.1f}" if isinstance(value, (int, float)) else "?"


def cmd_rm(args) -> int:
    """Unlink queues, or exchanges of that name when there is no such queue."""
    fastmq = _fastmq()
    for name in args.names:
        try:
            fastmq.Queue.unlink(name)
        except fastmq.QueueNotFound:
            try:
                fastmq.Exchange.unlink(name)
            except fastmq.QueueNotFound:
                raise fastmq.QueueNotFound(f"no fastmq queue or exchange named {name!r}") \
                    from None
    return 0


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

    p = sub.add_parser("ls", help="list the named queues and exchanges on this host")
    p.add_argument("--shm-dir", default=SHM_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("stat", help="show a queue's stats block")
    p.add_argument("name")
    p.add_argument("-w", "--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("pending", help="list a queue's in-flight (unacked) messages")
    p.add_argument("name")
    p.set_defaults(func=cmd_pending)

    p = sub.add_parser("rm", help="unlink named queues or exchanges (open handles keep working)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_rm)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_usage(sys.stderr)
        print("fastmq: error: a command is required (bench, ls, stat, pending, rm)",
              file=sys.stderr)
        return 2
    if getattr(args, "interval", 1.0) <= 0:
        parser.error("--interval must be > 0")
    try:
        return args.func(args)
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
