"""Leases (at-least-once delivery) for the pure-Python ring.

``InFlightTable`` is the pure backend's in-flight table: the shared state of
at-least-once delivery, the same contract as the native one in
``csrc/fmq_lease.c``. One is owned by each pure ``Ring`` handle (composed, not
mixed in) and reaches the ring only through the ring's table port -- the
methods ``locked``, ``wait_for``, ``register_consumer``, ``append_locked``,
``peek_locked``, ``write_state``, ``commit_with`` and ``write_bytes`` listed
in ``ring.py`` -- so the ring's other internals stay its own. The per-handle
consumer (``consumer.py``) settles messages through it.

Every operation runs under the ring's two locks (``Ring.locked``), and crash
safety comes from the order of ``pwrite``s plus single-``pwrite`` commit
points (a write inside one page is never torn by the death of its writer: the
syscall completes or never happened).

Layout (after the ring's data area, see ``ring.py``)::

    lease state line     offset 576, right after the ring state line at 512, so
                         one 128-byte pwrite commits both (``_commit``, through
                         the ring's ``commit_with``)
    in-flight table      ``maxsize`` entries of 128 bytes (page-aligned, so an
                         entry never crosses a page); only ``[0, hwm)`` is used
    payload halves       two areas of ``capacity_bytes``: in-flight payloads
                         are appended to the active half; when it is full the
                         live ones are copied to the other half and the active
                         half flips in one write (a crash mid-copy leaves the
                         old half intact: semispace compaction)

Taking (``lease``): bump ``attempt`` (intent), copy payloads and write LEASED
entries stamped ``take_gen = attempt``, then commit the ring head and the lease
state (``committed = attempt``) in ONE pwrite. If the taker dies before the
commit, the messages are still in the ring and its entries are void: every
lease operation first frees entries whose ``take_gen == attempt != committed``
(``_recover``). So a message is never both queued and leased.

Redelivery (expiry, dead or departed holder, nack): the payload is appended to
the BACK of the ring with its delivery count (the record header carries it)
and committed, and only then is the entry freed: a crash in between gives a
duplicate, never a loss. Past ``max_deliveries`` the message is dead-lettered:
parked (DEAD) for the Python layer when the queue has a dead-letter name,
otherwise dropped and counted.

Liveness: an entry names its holder by pid + process start time (pid reuse)
+ a per-handle id. A holder whose process is gone is dead; a handle that is
closed gives its leases back in ``Ring.close``. Checked by a sweep at most once
a second, by whoever calls ``lease``/``redeliver_due``. Deadlines are
CLOCK_MONOTONIC nanoseconds: one clock for every process of the host.
"""
from __future__ import annotations

import os
import struct
import time
import weakref

from . import errors
from ..errors import CorruptQueue, LeaseLost
from .procs import alive, start_time

# lease state: attempt, committed, tail, active_half, next_due_ns,
# last_sweep_ns, hwm, spare
LEASE_STATE = struct.Struct("<8Q")
LEASE_STATE_OFFSET = 576
# state, token, pid, start, handle, deliveries, length, spare,
# take_gen, off[0], off[1], leased_ns, deadline_ns
ENTRY = struct.Struct("<8I5Q")
ENTRY_SIZE = 128
FREE, LEASED, DEAD, TAKING = 0, 1, 2, 3
SWEEP_NS = 1_000_000_000
PAGE = 4096
_ATTEMPT, _COMMITTED, _TAIL, _HALF, _NEXT_DUE, _LAST_SWEEP, _HWM = range(7)

assert ENTRY.size <= ENTRY_SIZE and PAGE % ENTRY_SIZE == 0


def page_up(n):
    return (n + PAGE - 1) // PAGE * PAGE


def layout(data_end, maxsize, capacity_bytes):
    """(table offset, halves offset, file size) for a segment whose ring data
    area ends at ``data_end``."""
    table = page_up(data_end)
    halves = page_up(table + maxsize * ENTRY_SIZE)
    return table, halves, halves + 2 * capacity_bytes


def now_ns():
    return time.monotonic_ns()


class _Entry:
    """One in-flight table entry, unpacked (``write`` packs it back)."""

    __slots__ = ("index", "state", "token", "pid", "start", "handle", "deliveries",
                 "length", "take_gen", "off", "leased_ns", "deadline_ns")

    def __init__(self, index, raw, at=0):
        (self.state, self.token, self.pid, self.start, self.handle, self.deliveries,
         self.length, _, self.take_gen, off0, off1, self.leased_ns,
         self.deadline_ns) = ENTRY.unpack_from(raw, at)
        self.index = index
        self.off = [off0, off1]

    def pack(self):
        return ENTRY.pack(self.state, self.token, self.pid, self.start, self.handle,
                          self.deliveries, self.length, 0, self.take_gen, self.off[0],
                          self.off[1], self.leased_ns, self.deadline_ns)


class InFlightTable:
    """The in-flight table of one pure ring handle (see module docstring)."""

    def __init__(self, ring, data_end, handle_id):
        # A weak reference: the ring owns this table, and a strong one back
        # would make every handle a reference cycle (freed only by the cycle
        # collector, which would delay closing an anonymous queue).
        self._ring = weakref.proxy(ring)
        self.name, self.maxsize = ring.name, ring.maxsize
        self.capacity_bytes, self.max_message_size = ring.capacity_bytes, ring.max_message_size
        self.max_deliveries, self.dead_letter = ring.max_deliveries, ring.dead_letter
        self._table_offset, self._halves_offset, _ = layout(data_end, self.maxsize,
                                                            self.capacity_bytes)
        self._handle_id = handle_id
        self._owner = None                 # (pid, start time, handle id)
        self._ever_leased = False

    # ---------------------------------------------------------- plumbing

    def _me(self):
        pid = os.getpid()
        if self._owner is None or self._owner[0] != pid:
            self._owner = (pid, start_time(pid), self._handle_id)
        return self._owner

    def _read_lstate(self, fd):
        raw = os.pread(fd, LEASE_STATE.size, LEASE_STATE_OFFSET)
        if len(raw) != LEASE_STATE.size:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        ls = list(LEASE_STATE.unpack(raw))
        if ls[_HWM] > self.maxsize or ls[_HALF] > 1 or ls[_TAIL] > self.capacity_bytes:
            raise CorruptQueue(f"segment {self.name!r} has an inconsistent in-flight "
                               f"table state {ls}")
        return ls

    @staticmethod
    def _write_lstate(fd, ls):
        os.pwrite(fd, LEASE_STATE.pack(*ls), LEASE_STATE_OFFSET)

    def _commit(self, fd, state, ls):
        """Ring state and lease state in one page-internal pwrite."""
        self._ring.commit_with(fd, state, LEASE_STATE.pack(*ls))

    def _entries(self, fd, ls):
        n = ls[_HWM]
        raw = os.pread(fd, n * ENTRY_SIZE, self._table_offset) if n else b""
        if len(raw) != n * ENTRY_SIZE:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        return [_Entry(i, raw, i * ENTRY_SIZE) for i in range(n)]

    def _entry(self, fd, ls, slot):
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < ls[_HWM]:
            return None
        raw = os.pread(fd, ENTRY.size, self._table_offset + slot * ENTRY_SIZE)
        if len(raw) != ENTRY.size:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        return _Entry(slot, raw)

    def _write_entry(self, fd, e):
        os.pwrite(fd, e.pack(), self._table_offset + e.index * ENTRY_SIZE)

    def _payload(self, fd, ls, e):
        if e.length > self.max_message_size or e.off[ls[_HALF]] + e.length > self.capacity_bytes:
            raise CorruptQueue(f"in-flight entry {e.index} of {self.name!r} is corrupted")
        base = self._halves_offset + ls[_HALF] * self.capacity_bytes
        data = os.pread(fd, e.length, base + e.off[ls[_HALF]])
        if len(data) != e.length:
            raise CorruptQueue(f"segment {self.name!r} was truncated")
        return data

    def _lease_op(self, fn, *args):
        """Run ``fn(fd, state, ls, *args)`` locked, after crash recovery."""
        def run(fd, state):
            ls = self._read_lstate(fd)
            self._recover(fd, ls)
            return fn(fd, state, ls, *args)
        return self._ring.locked(run)

    def _recover(self, fd, ls):
        """Void the entries of a take whose taker died before its commit."""
        if ls[_ATTEMPT] == ls[_COMMITTED]:
            return
        for e in self._entries(fd, ls):
            if e.state == LEASED and e.take_gen == ls[_ATTEMPT]:
                e.state = FREE
                self._write_entry(fd, e)
        ls[_COMMITTED] = ls[_ATTEMPT]
        self._write_lstate(fd, ls)

    def _holder_gone(self, e):
        if e.pid == 0:
            return True                                  # orphaned: due now
        return not alive(e.pid, e.start)

    def _mine(self, fd, ls, slot, token, state=LEASED, check_deadline=True):
        e = self._entry(fd, ls, slot)
        pid, start, handle = self._me()
        if (e is None or e.state != state or e.token != token or e.pid != pid
                or e.handle != handle):
            errors.lease_lost(f"the lease of message {slot} was lost (expired and "
                              "redelivered, reclaimed, or not held by this handle)")
        if check_deadline and now_ns() > e.deadline_ns:
            errors.lease_lost(f"the lease of message {slot} expired; the message will "
                              "be redelivered")
        return e

    # ------------------------------------------------------------ taking

    def take(self, max_messages, timeout, lease_seconds):
        """Lease up to ``max_messages`` (at least one, waiting up to
        ``timeout``; Empty otherwise) -> [(slot, token, payload, deliveries)]."""
        ring = self._ring
        again = ring.AGAIN
        if isinstance(max_messages, bool) or not isinstance(max_messages, int):
            raise TypeError("max_messages must be an int")
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        if not 0 < lease_seconds <= 1e9:
            raise ValueError("lease must be a positive number of seconds")
        ring.register_consumer()
        self._ever_leased = True
        lease_ns = int(lease_seconds * 1e9)

        def attempt():
            return self._lease_op(self._take_locked, max_messages, lease_ns) or again

        # Re-attempt at least every 50 ms even if nothing changes the epoch:
        # leases expire (and holders die) silently.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 and timeout != 0:
                errors.empty()
            got = ring.wait_for(attempt, 0 if timeout == 0 else
                                (0.05 if left is None else min(0.05, left)))
            if got is not again:
                return got
            if timeout == 0:
                errors.empty()

    def _take_locked(self, fd, state, ls, max_messages, lease_ns):
        self._redeliver_locked(fd, state, ls, force=False)
        if not state[2]:
            return []
        entries = self._entries(fd, ls)
        free = [e.index for e in entries if e.state == FREE]
        room_entries = len(free) + (self.maxsize - ls[_HWM])
        records = self._ring.peek_locked(fd, state, min(max_messages, room_entries))
        if not records:
            return self._release_parked(fd, state, ls, entries, lease_ns)
        need = sum(len(r[0]) for r in records)
        if ls[_TAIL] + need > self.capacity_bytes:
            self._compact(fd, ls, entries)
        fit, total = 0, ls[_TAIL]
        for payload, *_ in records:
            if total + len(payload) > self.capacity_bytes:
                break
            total += len(payload)
            fit += 1
        records = records[:fit]
        if not records:                    # in-flight bytes full
            return self._release_parked(fd, state, ls, self._entries(fd, ls), lease_ns)
        pid, start, handle = self._me()
        ls[_ATTEMPT] += 1
        self._write_lstate(fd, ls)         # intent (see _recover)
        base = self._halves_offset + ls[_HALF] * self.capacity_bytes
        now = now_ns()
        out = []
        for payload, deliveries, _ in records:
            index = free.pop(0) if free else self._grow(ls)
            old = self._entry_raw(fd, index)
            e = _Entry(index, old)
            e.state, e.token = LEASED, (e.token + 1) & 0xFFFFFFFF or 1
            e.pid, e.start, e.handle = pid, start, handle
            e.deliveries = deliveries + 1
            e.length, e.take_gen = len(payload), ls[_ATTEMPT]
            e.off[ls[_HALF]] = ls[_TAIL]
            e.leased_ns, e.deadline_ns = now, now + lease_ns
            self._ring.write_bytes(fd, memoryview(payload), base + ls[_TAIL])
            ls[_TAIL] += len(payload)
            self._write_entry(fd, e)
            out.append((index, e.token, payload, e.deliveries))
        state[0] = records[-1][2]
        state[2] -= len(records)
        state[5] += len(records)
        if state[2] == 0:
            state[0] = state[1] = 0
        ls[_COMMITTED] = ls[_ATTEMPT]
        due = now + lease_ns
        if ls[_NEXT_DUE] == 0 or due < ls[_NEXT_DUE]:
            ls[_NEXT_DUE] = due
        self._commit(fd, state, ls)        # the hand-over
        return out

    def _release_parked(self, fd, state, ls, entries, lease_ns):
        """The queue is full AND the in-flight table (or payload area) is
        full of leases that are due but could not be requeued for lack of
        room: nothing could ever move again (a take needs a free entry, a
        requeue needs room in the ring). Break the cycle by redelivering one
        such message in place, to this taker: same entry, delivery count + 1,
        new holder and deadline (one entry write, so crash-safe). The only
        case where a redelivered message does not go to the back."""
        if not state[2]:
            return []
        now = now_ns()
        for e in entries:
            if e.state != LEASED or (e.deadline_ns > now and not self._holder_gone(e)):
                continue
            if e.deliveries >= self.max_deliveries:
                self._requeue(fd, state, ls, e)            # dead-letters it: room
                return []
            pid, start, handle = self._me()
            e.token = (e.token + 1) & 0xFFFFFFFF or 1
            e.pid, e.start, e.handle = pid, start, handle
            e.deliveries += 1
            e.leased_ns, e.deadline_ns = now, now + lease_ns
            self._write_entry(fd, e)
            state[6] += 1                                  # redelivered
            self._ring.write_state(fd, state)
            if ls[_NEXT_DUE] == 0 or e.deadline_ns < ls[_NEXT_DUE]:
                ls[_NEXT_DUE] = e.deadline_ns
                self._write_lstate(fd, ls)
            return [(e.index, e.token, self._payload(fd, ls, e), e.deliveries)]
        return []

    def _grow(self, ls):
        index = ls[_HWM]
        ls[_HWM] += 1                      # committed with the take
        return index

    def _entry_raw(self, fd, index):
        raw = os.pread(fd, ENTRY.size, self._table_offset + index * ENTRY_SIZE)
        return raw if len(raw) == ENTRY.size else bytes(ENTRY.size)

    def _compact(self, fd, ls, entries):
        """Copy live payloads to the other half, then flip (one write)."""
        old, new = ls[_HALF], 1 - ls[_HALF]
        base_new = self._halves_offset + new * self.capacity_bytes
        tail = 0
        for e in entries:
            if e.state == FREE:
                continue
            data = self._payload(fd, ls, e)
            self._ring.write_bytes(fd, memoryview(data), base_new + tail)
            e.off[new] = tail
            self._write_entry(fd, e)
            tail += len(data)
        ls[_HALF], ls[_TAIL] = new, tail
        self._write_lstate(fd, ls)
        del old

    # ----------------------------------------------------- ack and co.

    def ack(self, slot, token):
        """LeaseLost unless (slot, token) is a live lease of this handle."""
        self._lease_op(self._ack_locked, [(slot, token)], True)

    def ack_pairs(self, pairs):
        """[(slot, token)] -> [acked?] (a lost lease is False, not an error)."""
        return self._lease_op(self._ack_locked, pairs, False)

    def _ack_locked(self, fd, state, ls, pairs, strict):
        results = []
        for slot, token in pairs:
            try:
                e = self._mine(fd, ls, slot, token)
            except LeaseLost:
                if strict:
                    raise
                results.append(False)
                continue
            e.state, e.pid, e.handle = FREE, 0, 0
            self._write_entry(fd, e)
            results.append(True)
        if any(results):
            self._ring.write_state(fd, state)    # epoch: wakes takers waiting for room
        return results

    def touch(self, slot, token, seconds):
        if not 0 < seconds <= 1e9:
            raise ValueError("seconds must be a positive number")

        def run(fd, state, ls):
            e = self._mine(fd, ls, slot, token)
            e.deadline_ns = now_ns() + int(seconds * 1e9)
            self._write_entry(fd, e)
        self._lease_op(run)

    def nack(self, slot, token, requeue=True):
        def run(fd, state, ls):
            e = self._mine(fd, ls, slot, token)
            self._requeue(fd, state, ls, e, force_dead=not requeue)
        self._lease_op(run)

    # -------------------------------------------------------- redelivery

    def _requeue(self, fd, state, ls, e, force_dead=False):
        """Back to the ring (re-enqueue, THEN free) or dead-letter. Returns
        False when the ring had no room (the entry is then parked as an
        orphaned lease that is due at once)."""
        if force_dead or e.deliveries >= self.max_deliveries:
            if self.dead_letter:
                e.state, e.pid, e.start, e.handle = DEAD, 0, 0, 0
                self._write_entry(fd, e)
            else:
                e.state, e.pid, e.handle = FREE, 0, 0
                self._write_entry(fd, e)
                state[7] += 1                          # dead_lettered
                self._ring.write_state(fd, state)
            return True
        payload = self._payload(fd, ls, e)
        state[6] += 1                                  # redelivered, with the commit
        if not self._ring.append_locked(fd, state, (memoryview(payload),), e.deliveries):
            state[6] -= 1
            e.pid, e.start, e.handle, e.deadline_ns = 0, 0, 0, 0
            self._write_entry(fd, e)
            ls[_NEXT_DUE] = 1
            self._write_lstate(fd, ls)
            return False
        e.state, e.pid, e.handle = FREE, 0, 0
        self._write_entry(fd, e)
        return True

    def sweep(self):
        """Redeliver what is due now (cheap when nothing is) -> how many."""
        return self._lease_op(lambda fd, state, ls: self._redeliver_locked(fd, state, ls, False))

    def redeliver_due(self):
        return self._lease_op(lambda fd, state, ls: self._redeliver_locked(fd, state, ls, True))

    def _redeliver_locked(self, fd, state, ls, force):
        now = now_ns()
        sweep = ls[_HWM] and now - ls[_LAST_SWEEP] >= SWEEP_NS
        if not force and not sweep and (ls[_NEXT_DUE] == 0 or now < ls[_NEXT_DUE]):
            return 0
        n, nxt, any_leased = 0, 0, False
        for e in self._entries(fd, ls):
            if e.state == TAKING and self._holder_gone(e):
                e.state, e.pid, e.start, e.handle = DEAD, 0, 0, 0   # park it again
                self._write_entry(fd, e)
                continue
            if e.state != LEASED:
                continue
            if e.deadline_ns > now and not self._holder_gone(e):
                any_leased = True
                nxt = e.deadline_ns if nxt == 0 else min(nxt, e.deadline_ns)
                continue
            if self._requeue(fd, state, ls, e):
                n += 1
            else:
                any_leased, nxt = True, 1
        ls[_NEXT_DUE] = (nxt or now + SWEEP_NS) if any_leased else 0
        ls[_LAST_SWEEP] = now
        self._write_lstate(fd, ls)
        return n

    def release_handle_leases(self):
        """On close: this handle's leases go back now (a departed holder),
        dead letters it took are parked again."""
        if not self._ever_leased or self._ring.closed:
            return

        def run(fd, state, ls):
            pid, _, handle = self._me()
            for e in self._entries(fd, ls):
                if e.pid != pid or e.handle != handle:
                    continue
                if e.state == LEASED:
                    self._requeue(fd, state, ls, e)
                elif e.state == TAKING:
                    e.state, e.pid, e.start, e.handle = DEAD, 0, 0, 0
                    self._write_entry(fd, e)
        self._lease_op(run)

    # ---------------------------------------------------- introspection

    def pending(self):
        def run(fd, state, ls):
            now = now_ns()
            return [{"id": e.index, "token": e.token, "pid": e.pid,
                     "idle": (now - e.leased_ns) / 1e9, "delivery_count": e.deliveries,
                     "expires_in": (e.deadline_ns - now) / 1e9}
                    for e in self._entries(fd, ls) if e.state == LEASED]
        return self._lease_op(run)

    def in_flight_count(self, fd):
        ls = self._read_lstate(fd)
        return sum(1 for e in self._entries(fd, ls) if e.state != FREE)

    # ----------------------------------------------------- dead letters

    def take_dead_letters(self, max_messages):
        if not self.dead_letter:
            return []
        self._ever_leased = True

        def run(fd, state, ls):
            pid, start, handle = self._me()
            out = []
            for e in self._entries(fd, ls):
                if len(out) >= max_messages:
                    break
                if e.state != DEAD:
                    continue
                e.state, e.pid, e.start, e.handle = TAKING, pid, start, handle
                self._write_entry(fd, e)
                out.append((e.index, e.token, self._payload(fd, ls, e)))
            return out
        return self._lease_op(run)

    def ack_dead(self, slot, token):
        def run(fd, state, ls):
            e = self._mine(fd, ls, slot, token, TAKING, check_deadline=False)
            e.state, e.pid, e.handle = FREE, 0, 0
            self._write_entry(fd, e)
            state[7] += 1
            self._ring.write_state(fd, state)
        self._lease_op(run)
