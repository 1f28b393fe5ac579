"""Backup, restore and migration of a named queue: ``fastmq dump`` / ``fastmq restore``.

Everything here goes through the public queue API (``Queue.open``/``create``
with ``url=``, ``get_messages``, ``ack_many``, ``nack``, ``put_many_bytes``),
so a dump taken from one location (this host's shared memory, native or pure
backend, Redis, ...) restores into any other. Payloads are copied as the
queue stores them -- the serialized bytes -- so they are never unpickled
here, and a restored queue hands its consumers exactly what the original
would have.

The dump file (format version 1; integers little-endian)
--------------------------------------------------------

::

    header   magic     8 bytes  89 46 4D 51 0D 0A 1A 0A  ("\\x89FMQ\\r\\n\\x1a\\n")
             version   u16      1
             flags     u16      0 (reserved)
             length    u32      of the JSON text that follows (at most 1 MiB)
             json      UTF-8    an object: "format": "fastmq-dump", "name",
                                "source" (the location, credentials masked),
                                "backend", "created" (Unix time), "fastmq"
                                (version), "mode" ("copy" or "drain"), and
                                "queue": the options that recreate it --
                                "maxsize" (0: no message bound),
                                "max_message_size", "capacity_bytes" (null:
                                the location's default), "max_deliveries",
                                "dead_letter" (null: none), "file_mode"
                                (null: unknown), and for a durable
                                queue "sync" and "sync_interval"
             crc       u32      CRC-32 of every header byte before it
    record   tag       1 byte   "R"                     (zero or more records,
             deliveries u32     times it had been        in queue order)
                                delivered before the dump
             length    u32      payload bytes
             payload   bytes    the message as the queue stores it
             crc       u32      CRC-32 of the record's bytes before it
    trailer  tag       1 byte   "T"
             count     u64      number of records
             total     u64      sum of their payload lengths
             sha256    32 bytes SHA-256 of every byte of the file before it
             end       8 bytes  "FMQ-END\\n"

A reader checks all of it -- magic, version, every CRC, the count, the
total, the digest, and that nothing follows the end marker -- before it
trusts any of it: ``read_dump`` raises ``CorruptDump`` (naming the offset and
the record) for a file that is truncated, bit-flipped, padded or of another
format version, and ``restore`` verifies the whole file before its first put,
so a damaged dump restores nothing at all.

Reading a queue without consuming it
------------------------------------

No location offers a read that leaves the queue untouched (a peek), so a
dump *leases* the messages (``get_messages``): while the dump holds them
they are invisible to consumers, and leases are what make a crash safe --
messages a dead process held go back to the queue by themselves.

What is in a dump: the messages that are ready, at most as many as were
queued when it starts (producers putting meanwhile cannot keep it going
forever). Not in it, and left in the queue: messages other consumers hold
leased at that moment, and ready messages for which the queue's in-flight
table has no entry left (it holds ``maxsize`` leases in all); the report
counts both.

How it is written: to a temporary file next to ``FILE`` (mode 0600), flushed
to disk (``fsync``), and only then named ``FILE`` (a link, so an existing
``FILE`` is never overwritten unless ``force``). A ``FILE`` therefore always
holds a complete dump; a dump that was killed leaves at most a
``FILE.*.partial`` file (``restore`` refuses it as truncated unless the kill
came after its last byte). Then:

* a **copy** (the default) gives every message back with ``nack()``, one by
  one in queue order, so a queue nobody else used meanwhile ends with the
  same messages in the same order. Killed at any point, it loses nothing:
  the messages it still held come back by themselves, and the one it was
  giving back at that instant may come back twice (a queue requeues a
  message before it frees the old entry, so a crash in between duplicates
  rather than loses it). Limits, all of which come from having no
  peek: every message's ``delivery_count`` goes up by one (the dump was a
  delivery; consumers see ``redelivered``); a message that the dump received
  on its last allowed delivery (``max_deliveries``) would be dead-lettered by
  a ``nack``, so it is put back as a fresh copy (its count starts over) and
  the original acked (killed between the two: the copy stays and the
  original is dead-lettered); messages put or taken by others during the
  dump interleave with the returned ones.
* a **drain** (``drain=True``) acks the messages once ``FILE`` is complete and
  on disk: they move into the file exactly. Killed before ``FILE`` is
  complete: every message comes back to the queue (``delivery_count`` + 1,
  and not necessarily in order). Killed after: ``FILE`` is complete and the
  messages not yet acked are *also* back in the queue -- duplicated, never
  lost.
* either way, a dump killed while it holds a message on its last allowed
  delivery leaves that message to the queue's dead-letter policy, as for any
  consumer that dies then; a dump that fails (an error, Ctrl-C) gives back
  what it holds before it reports the error.

Restoring
---------

``restore`` verifies the whole file, then creates the queue with the options
in its header (``QueueExists`` never happens by accident: an existing queue
is used as it is, with its own options). It refuses a queue that already
holds messages (ready or in flight) unless ``append=True``, which puts the
dump's messages behind them. The messages go in, in order, as one atomic
batch where the location offers atomic batches and the dump fits in one (at
most ``ATOMIC_MAX`` messages, and the queue's ``maxsize``): a restore killed
mid-way then leaves nothing of itself. Otherwise they go in batches, and a
restore killed mid-way leaves the first messages of the dump in the queue
(one that fails says how many). Delivery counts are recorded in the dump but not restored:
no location lets a put set one, so restored messages start at delivery 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import tempfile
import time
import zlib

from . import _location
from .errors import Empty, Error, Full, LeaseLost, QueueNotFound

__all__ = ["CorruptDump", "FORMAT_VERSION", "MAGIC", "DumpWriter", "read_dump",
           "dump_queue", "restore_queue", "queue_options"]

MAGIC = b"\x89FMQ\r\n\x1a\n"
END = b"FMQ-END\n"
FORMAT_VERSION = 1
FORMAT_NAME = "fastmq-dump"
MAX_HEADER = 1 << 20
MAX_RECORD = (1 << 32) - 1        # the u32 length field
_HEAD = struct.Struct("<8sHHI")   # magic, version, flags, json length
_U32 = struct.Struct("<I")
_REC = struct.Struct("<cII")      # tag, deliveries, length
_TRAIL = struct.Struct("<cQQ")    # tag, count, total
TRAILER_SIZE = _TRAIL.size + 32 + len(END)

DEFAULT_LEASE = 300.0             # seconds a dump holds its leases between renewals
# Messages per get_messages / ack_many call: at least this many, and at most
# ten calls for the whole queue (a backend may scan its in-flight table per call).
LEASE_BATCH = 1000
PUT_BATCH = 1000                  # messages per put_many_bytes call (non-atomic)
ATOMIC_MAX = 4096                 # at most this many go in as one atomic batch
ACK_BATCH = 1000


def _batch(n, floor):
    return max(floor, -(-n // 10))


class CorruptDump(Error, ValueError):
    """The file is not a complete, intact fastmq dump of a format version
    this fastmq reads; nothing was restored from it."""


def _crashpoint(label):
    """Tests kill the dumping process here (``FASTMQ_DUMP_CRASHPOINT=label``),
    with SIGKILL: nothing is flushed or cleaned up, as in a real crash."""
    if os.environ.get("FASTMQ_DUMP_CRASHPOINT") == label:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ format

class DumpWriter:
    """Writes one dump to a binary file object: the header at once, then
    ``add()`` per message, then ``finish()`` (the trailer)."""

    def __init__(self, f, header: dict):
        self._f = f
        self._sha = hashlib.sha256()
        self.count = 0
        self.total = 0
        text = json.dumps(header, sort_keys=True).encode("utf-8")
        if len(text) > MAX_HEADER:
            raise ValueError("dump header too large")
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, 0, len(text)) + text
        self._write(head + _U32.pack(zlib.crc32(head)))

    def _write(self, data):
        self._f.write(data)
        self._sha.update(data)

    def add(self, payload, deliveries: int = 0) -> None:
        n = memoryview(payload).nbytes
        if n > MAX_RECORD:
            raise ValueError(f"a message of {n} bytes does not fit a dump record")
        head = _REC.pack(b"R", min(max(deliveries, 0), 0xFFFFFFFF), n)
        crc = zlib.crc32(payload, zlib.crc32(head))
        self._write(head)
        self._write(payload)
        self._write(_U32.pack(crc))
        self.count += 1
        self.total += n

    def finish(self) -> None:
        self._write(_TRAIL.pack(b"T", self.count, self.total))
        digest = self._sha.digest()
        self._f.write(digest + END)


class Dump:
    """A verified dump: ``header`` (dict), ``records`` (list of
    ``(deliveries, memoryview)`` in order), ``total`` (payload bytes)."""

    def __init__(self, header, records, total):
        self.header, self.records, self.total = header, records, total

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def max_length(self) -> int:
        return max((m.nbytes for _, m in self.records), default=0)


def read_dump(path) -> Dump:
    """Read and verify the dump at ``path`` as a whole; ``CorruptDump`` if
    anything about it is wrong (the message says what and where)."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_dump(data, str(path))


def parse_dump(data: bytes, label: str = "the dump") -> Dump:
    view = memoryview(data)
    size = len(data)

    def bad(what):
        return CorruptDump(f"{label} is not a usable fastmq dump: {what}; nothing was restored")

    if size < _HEAD.size:
        if MAGIC.startswith(bytes(view[:len(MAGIC)])) and size:
            raise bad(f"truncated: the file ends after {size} bytes, inside the header")
        raise bad("not a fastmq dump (no fastmq dump header)")
    magic, version, flags, hlen = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise bad("not a fastmq dump (wrong magic bytes at offset 0)")
    if version != FORMAT_VERSION:
        newer = (" (written by a newer fastmq? upgrade to read it)"
                 if version > FORMAT_VERSION else "")
        raise bad(f"format version {version}, and this fastmq reads version "
                  f"{FORMAT_VERSION} only{newer}")
    if hlen > MAX_HEADER:
        raise bad(f"the header claims {hlen} bytes of metadata (at most {MAX_HEADER}): "
                  "the header is damaged")
    hend = _HEAD.size + hlen
    if size < hend + 4:
        raise bad(f"truncated: the file ends after {size} bytes, inside the header")
    (crc,) = _U32.unpack_from(view, hend)
    if zlib.crc32(view[:hend]) != crc:
        raise bad("the header's checksum does not match (the header is damaged)")
    if flags != 0:
        raise bad(f"unknown header flags {flags:#x}")
    try:
        header = json.loads(bytes(view[_HEAD.size:hend]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("the header's metadata is not valid JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise bad("the header does not describe a fastmq dump")
    _check_options(header.get("queue"), bad)

    pos = hend + 4
    records = []
    total = 0
    while True:
        if pos >= size:
            raise bad(f"truncated: the file ends after {size} bytes and {len(records)} "
                      "record(s), with no trailer (the dump did not finish, or the file "
                      "was cut short)")
        tag = view[pos:pos + 1].tobytes()
        if tag == b"T":
            break
        if tag != b"R":
            raise bad(f"unexpected byte {tag!r} at offset {pos}, where record "
                      f"{len(records) + 1} or the trailer should start")
        if pos + _REC.size > size:
            raise bad(f"truncated: the file ends inside record {len(records) + 1} "
                      f"(offset {pos})")
        _, deliveries, n = _REC.unpack_from(view, pos)
        end = pos + _REC.size + n
        if end + 4 > size:
            raise bad(f"record {len(records) + 1} at offset {pos} claims {n} bytes but the "
                      f"file ends after {size}: truncated, or its length is damaged")
        (crc,) = _U32.unpack_from(view, end)
        if zlib.crc32(view[pos:end]) != crc:
            raise bad(f"record {len(records) + 1} at offset {pos} is damaged (checksum "
                      "mismatch)")
        records.append((deliveries, view[pos + _REC.size:end]))
        total += n
        pos = end + 4
    if pos + TRAILER_SIZE > size:
        raise bad(f"truncated: the file ends inside the trailer (offset {pos})")
    _, count, ttotal = _TRAIL.unpack_from(view, pos)
    dpos = pos + _TRAIL.size
    digest = bytes(view[dpos:dpos + 32])
    if bytes(view[dpos + 32:dpos + 32 + len(END)]) != END:
        raise bad(f"the trailer at offset {pos} is damaged (no end marker)")
    if count != len(records) or ttotal != total:
        raise bad(f"the trailer says {count} message(s) of {ttotal} bytes, the file holds "
                  f"{len(records)} of {total}")
    if hashlib.sha256(view[:dpos]).digest() != digest:
        raise bad("the file's SHA-256 digest does not match (it was altered)")
    if dpos + 32 + len(END) != size:
        raise bad(f"{size - dpos - 32 - len(END)} unexpected byte(s) after the end of the dump")
    return Dump(header, records, total)


def _check_options(opts, bad):
    if not isinstance(opts, dict):
        raise bad("the header has no queue options")
    for key in ("maxsize", "max_message_size", "max_deliveries"):
        v = opts.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"the header's queue option {key!r} is {v!r}")
    for key in ("capacity_bytes", "file_mode"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise bad(f"the header's queue option {key!r} is {v!r}")
    if opts.get("dead_letter") is not None and not isinstance(opts["dead_letter"], str):
        raise bad("the header's queue option 'dead_letter' is not a name")
    if opts.get("sync") is not None and not isinstance(opts["sync"], str):
        raise bad("the header's queue option 'sync' is not a name")
    v = opts.get("sync_interval")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
        raise bad(f"the header's queue option 'sync_interval' is {v!r}")


# --------------------------------------------------------- queue metadata

def queue_options(q, url=None) -> dict:
    """What ``Queue.create`` needs to make another queue like ``q`` (which
    lives at ``url``)."""
    from .queue import unbounded_slots
    maxsize, cap = q.maxsize, q.capacity_bytes
    # A queue made with maxsize <= 0 has unbounded_slots(capacity_bytes)
    # slots and no message bound of its own: record it as 0, which every
    # location reads as "no message bound".
    if cap and maxsize == unbounded_slots(cap):
        maxsize = 0
    ring = getattr(q, "_ring", None)
    max_deliveries = getattr(q, "max_deliveries", None)
    if max_deliveries is None:
        max_deliveries = getattr(ring, "max_deliveries", 20)
    dead_letter = getattr(q, "dead_letter", None)
    if dead_letter is None:
        dead_letter = getattr(ring, "dead_letter", None)
    opts = {"maxsize": int(maxsize), "max_message_size": int(q.max_message_size),
            "capacity_bytes": None if cap is None else int(cap),
            "max_deliveries": int(max_deliveries), "dead_letter": dead_letter or None,
            "file_mode": _file_mode(q, url)}
    # A durable queue's flush policy (its stats say; other locations have none).
    stats = q.stats()
    if isinstance(stats.get("sync"), str):
        opts["sync"] = stats["sync"]
        if isinstance(stats.get("sync_interval"), (int, float)):
            opts["sync_interval"] = stats["sync_interval"]
    return opts


def _file_mode(q, url):
    """The permission bits of a shared-memory queue's segment, else None."""
    ring = getattr(q, "_ring", None)
    if (_location.resolve(url)[0] != "shm" or ring is None
            or getattr(q, "backend", None) not in ("native", "pure")):
        return None
    from . import _lifetime
    base = _lifetime.NATIVE_SHM_DIR if q.backend == "native" else _lifetime.SHM_DIR
    try:
        return os.stat(os.path.join(base, ring.name)).st_mode & 0o777
    except (OSError, TypeError):
        return None


def _where(url) -> str:
    return _location.mask(_location.resolve(url)[1])


# ------------------------------------------------------------------- dump

class _Held:
    """The messages a dump leased, kept alive (touched) until settled."""

    def __init__(self, q, lease):
        self.q, self.lease = q, lease
        self.messages = []
        self._renewed = time.monotonic()

    def keep_alive(self, start=0):
        """Renew the leases (of the held messages from ``start`` on) once a
        third of a lease has gone by since the last renewal."""
        now = time.monotonic()
        if now - self._renewed < self.lease / 3:
            return
        for m in self.messages[start:]:
            m.touch(self.lease)
        self._renewed = time.monotonic()

    def give_back(self, max_deliveries):
        """Return every held message to the queue, in order (see the module
        doc); returns how many had already come back on their own. Each is
        dropped from the held list once settled, so a second call after a
        failure never puts a copy twice."""
        lost = 0
        msgs, done = self.messages, 0
        try:
            while done < len(msgs):
                m = msgs[done]
                if m.delivery_count >= max_deliveries:
                    # A nack now would dead-letter it: a fresh copy instead.
                    with m.data as data:
                        self.q.put_bytes(data, timeout=self.lease / 3)
                    done += 1
                    _crashpoint("copy-put")
                    settle = m.ack
                else:
                    done += 1
                    settle = m.nack
                try:
                    settle()
                except LeaseLost:
                    lost += 1     # expired and requeued meanwhile: back already
                self.keep_alive(done)
        finally:
            del msgs[:done]
        return lost

    def ack(self):
        acked = 0
        msgs, self.messages = self.messages, []
        step = _batch(len(msgs), ACK_BATCH)
        for i in range(0, len(msgs), step):
            acked += self.q.ack_many(msgs[i:i + step])
            _crashpoint("drain-acked-some")
        return len(msgs) - acked


def dump_queue(name, path, *, url=None, drain=False, force=False, lease=DEFAULT_LEASE,
               _open=None) -> dict:
    """Dump the queue ``name`` (at ``url``) to the file ``path``; see the
    module doc. Returns a summary dict (``count``, ``bytes``, ``drained``,
    ``already_back``, ``in_flight_elsewhere``: messages other consumers held,
    not in the dump, ``left_behind``: ready messages the dump could not
    lease because the in-flight table was full, not in the dump either)."""
    from .queue import Queue
    path = os.fspath(path)
    if not force and os.path.lexists(path):
        raise FileExistsError(f"{path} exists; pass --force to overwrite it")
    q = (_open or Queue.open)(name, url=url)
    tmp = None
    held = _Held(q, float(lease))
    try:
        opts = queue_options(q, url)
        header = {"format": FORMAT_NAME, "name": name, "source": _where(url),
                  "backend": getattr(q, "backend", None), "created": time.time(),
                  "fastmq": _version(), "mode": "drain" if drain else "copy", "queue": opts}
        try:
            q.max_in_flight = max(q.maxsize, 1)   # the dump holds them all at once
        except (NotImplementedError, AttributeError, ValueError):
            pass
        want = q.qsize()
        step = _batch(want, LEASE_BATCH)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                   suffix=".partial", dir=os.path.dirname(path) or ".")
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            writer = DumpWriter(f, header)
            left_behind = 0
            while len(held.messages) < want:
                try:
                    batch = q.get_messages(min(want - len(held.messages), step),
                                           block=False, lease=held.lease)
                except Empty:
                    # Messages still ready that no lease could take: the
                    # in-flight table is full (other consumers hold the rest).
                    left_behind = min(q.qsize(), want - len(held.messages))
                    break
                held.messages.extend(batch)
                for m in batch:
                    with m.data as data:
                        writer.add(data, m.delivery_count - 1)
                _crashpoint("leased-some")
                held.keep_alive()
            writer.finish()
            f.flush()
            _crashpoint("written")
            os.fsync(f.fileno())
        _publish(tmp, path, force)
        tmp = None
        _crashpoint("published")
        held.keep_alive()
        count, total = writer.count, writer.total
        back = held.ack() if drain else held.give_back(opts["max_deliveries"])
        return {"count": count, "bytes": total, "drained": drain, "already_back": back,
                "path": path, "in_flight_elsewhere": len(q.pending()),
                "left_behind": left_behind}
    finally:
        try:
            if held.messages:             # failed before settling: give them back
                held.give_back(queue_options(q, url)["max_deliveries"])
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            q.close()


def _publish(tmp, path, force):
    """Give the complete, flushed file its name; never overwrite without force."""
    if force:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)            # fails if path appeared meanwhile
        except FileExistsError:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it") from None
        except OSError:                   # a filesystem without hard links
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists; pass --force to overwrite it") from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    try:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)                     # the new name is durable too
    except OSError:
        pass
    finally:
        os.close(dfd)


def _version():
    try:
        from . import __version__
        return __version__
    except ImportError:
        return None


# ---------------------------------------------------------------- restore

def _supports_atomic(q):
    import inspect
    try:
        return "atomic" in inspect.signature(q.put_many_bytes).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def restore_queue(path, name, *, url=None, append=False, timeout=30.0, _dump=None) -> dict:
    """Restore the dump at ``path`` into the queue ``name`` (at ``url``); see
    the module doc. ``timeout``: seconds a put may wait for room. Returns a
    summary dict (``count``, ``bytes``, ``created``, ``atomic``)."""
    from .queue import Queue
    dump = _dump if _dump is not None else read_dump(path)     # all of it, first
    opts = dump.header["queue"]
    where = _where(url)
    created = False
    try:
        q = Queue.open(name, url=url)
    except QueueNotFound:
        kw = dict(maxsize=opts["maxsize"], max_message_size=opts["max_message_size"],
                  capacity_bytes=opts["capacity_bytes"],
                  max_deliveries=max(opts["max_deliveries"], 1),
                  dead_letter=opts["dead_letter"])
        if opts.get("file_mode") is not None:
            kw["mode"] = opts["file_mode"]
        if opts.get("sync") and _location.resolve(url)[0] == "file":
            kw["sync"] = opts["sync"]         # durable to durable: the same flush policy
            if opts.get("sync_interval"):
                kw["sync_interval"] = opts["sync_interval"]
        q = Queue.create(name, url=url, **kw)
        created = True
    try:
        if not created:
            held = q.qsize() + len(q.pending())
            if held and not append:
                raise Error(f"queue {name!r} at {where} already holds {held} message(s); "
                            "restore adds to it only with --append (nothing was restored)")
            if dump.max_length > q.max_message_size:
                raise Error(f"queue {name!r} at {where} takes messages of at most "
                            f"{q.max_message_size} bytes and the dump holds one of "
                            f"{dump.max_length} (nothing was restored)")
        payloads = [p for _, p in dump.records]
        atomic = False
        if (payloads and len(payloads) <= ATOMIC_MAX and _supports_atomic(q)
                and (not q.maxsize or len(payloads) <= q.maxsize)):
            try:
                if q.put_many_bytes(payloads, timeout=timeout, atomic=True) != len(payloads):
                    raise Full
                atomic = True
            except Full:
                raise Error(f"queue {name!r} at {where} had no room for the dump's "
                            f"{len(payloads)} message(s) within {timeout:g} s "
                            "(nothing was restored)") from None
            except ValueError:
                pass                      # larger than one atomic batch may be: batches
        if not atomic:
            _put_batches(q, payloads, timeout, name, where)
        return {"count": dump.count, "bytes": dump.total, "created": created,
                "atomic": atomic, "redelivered": sum(1 for d, _ in dump.records if d)}
    finally:
        q.close()


def _put_batches(q, payloads, timeout, name, where):
    done = 0
    while done < len(payloads):
        n = q.put_many_bytes(payloads[done:done + PUT_BATCH], timeout=timeout)
        done += n
        if n == 0:
            raise Error(f"queue {name!r} at {where} stayed full for {timeout:g} s: restored "
                        f"{done} of {len(payloads)} message(s) (the first {done} of the dump)")
        _crashpoint("restore-put-some")
