"""Run one benchmark cell in real processes, honestly and with every wait bounded.

Throughput cell (``run_throughput``):

1. the parent creates the channel (a ``peers.Peer``) and forks P producers and
   C consumers; each builds its endpoint, then all of them and the parent meet at
   a barrier, so process start-up and connection set-up are not timed;
2. producers send ``count`` messages each (``Builder``), consumers verify every
   message (``Tally``, or inline against the expected messages: ``consume_compare``)
   and read ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for all
   processes on Linux) after every ``STAMP_EVERY``-th message and after the last
   one (a read of this clock costs about as much as receiving a small message
   from the fastest queues); a consumer that does not know which message is its
   last reads the clock when it next finds nothing to receive, which is never
   earlier than the truth;
3. when the producers are done the parent wakes blocked consumers with sentinels
   until their published counts add up (or a deadline passes), then stops them;
4. elapsed = last message verified by any consumer - first producer start.

Any child error, hang (deadline) or verification problem makes the cell fail with
a ``CellFailed`` that says what happened; every child is reaped (terminated, then
killed) in ``finally``.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import threading
import time
import traceback
from array import array
from multiprocessing.connection import wait as _wait_conns

import itertools
import operator

from .payloads import (FULL_CHECK_MAX, FINGERPRINT, KEEP, SAMPLE_EVERY, SMALL_POOL, Builder, Tally,
                       plan_for, pool_size, prebuilt, verify)
from .peers import BATCH, _Endpoint

PREBUILD_MAX_BYTES = 256 << 20   # per producer
STAMP_EVERY = 64                 # consumers read the clock after every 64th message
ARRAY_MODES = ("numpy", "reserve")

CTX = multiprocessing.get_context("fork")
SETUP_TIMEOUT = 20.0


class CellFailed(Exception):
    """A cell could not be measured: messages lost/corrupted, a peer hung or crashed."""

    def __init__(self, kind: str, problems: list):
        self.kind, self.problems = kind, list(problems)
        super().__init__(f"{kind}: " + "; ".join(self.problems[:5]))


# ---------------------------------------------------------------- children --

def _child(conn, barrier, body):
    """Run ``body(barrier)`` in a worker; send its result or the error to the parent."""
    try:
        result = body(barrier)
        after = result.pop("after", None)
        conn.send({"ok": True, **result})
        if after is not None:
            after()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        try:
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                       "trace": traceback.format_exc()})
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


def _builder(peer, index, mode, size):
    return Builder(index, size, mode,
                   pool_size(peer.depth, getattr(peer, "holds_references", True)))


def produce(send, send_many, build, count, batch, messages=None):
    """The timed loop of a producer: ``count`` messages, prebuilt (``messages``)
    or made by ``build(seq)`` as they go. Returns the monotonic ns at start and end."""
    t0 = time.monotonic_ns()
    if batch:
        for start in range(0, count, BATCH):
            send_many(messages[start:start + BATCH] if messages is not None else
                      [build(s) for s in range(start, min(count, start + BATCH))])
    elif messages is not None:
        for m in messages:
            send(m)
    else:
        for s in range(count):
            send(build(s))
    return t0, time.monotonic_ns()


def consume(recv, recv_many, plan, batch, shared, index, check=None, arrays=False, expect=0):
    """The timed loop of a consumer, until a wake-up (``None``, or an empty
    message unless ``arrays``: numpy arrays have no truth value) arrives after
    the parent set the stop flag (``shared[-1]``); it publishes its count in
    ``shared[index]`` at every wake-up. Testing ``not m`` in the loop lets the
    peers hand their own receive call over unwrapped.

    The clock is read after every ``STAMP_EVERY``-th message, after message
    number ``expect`` (the last one, when the caller knows it: 0 if not) and,
    if the last message received was not stamped, at the next wake-up: the
    time returned is never earlier than that of the last message.

    Returns ``(got, last_ns, kept)``: ``kept`` is what ``settle`` verifies after
    the window -- every message (KEEP), or (heads, tails, samples) (FINGERPRINT);
    INLINE messages go to ``check`` as they arrive.
    """
    now = time.monotonic_ns
    last = got = 0
    stamped = -1                       # got when the clock was last read at a wake-up
    stop = len(shared) - 1
    every = STAMP_EVERY - 1
    if plan == FINGERPRINT:
        heads, tails, samples = [], [], []
        head, tail, sample = heads.append, tails.append, samples.append
        mask = SAMPLE_EVERY - 1
        if batch:
            while True:
                msgs = recv_many()
                if not msgs:
                    shared[index] = got
                    if shared[stop]:
                        break
                    continue
                for m in msgs:
                    head(m[:16])
                    tail(m[-8:])
                    if not got & mask:
                        sample(m)
                    got += 1
                last = now()
        else:
            while True:
                m = recv()
                if not m:              # None or the empty wake-up message
                    if got & every and got != expect and got != stamped:
                        last = now()   # the last message was not stamped
                        stamped = got   # once: later wake-ups come later still
                    shared[index] = got
                    if shared[stop]:
                        break
                    continue
                head(m[:16])
                tail(m[-8:])
                if not got & mask:
                    sample(m)
                del m
                got += 1
                if not got & every or got == expect:
                    last = now()
        return got, last, (heads, tails, samples)
    kept = [] if plan == KEEP else None
    handle = kept.append if kept is not None else check
    if batch:
        extend = kept.extend if kept is not None else None
        while True:
            msgs = recv_many()
            if not msgs:
                shared[index] = got
                if shared[stop]:
                    break
                continue
            if extend is not None:
                extend(msgs)
            else:
                for m in msgs:
                    handle(m)
            got += len(msgs)
            last = now()
    elif arrays:
        while True:
            m = recv()
            if m is None:
                if got & every and got != expect and got != stamped:
                    last = now()       # the last message was not stamped
                    stamped = got   # once: later wake-ups come later still
                shared[index] = got
                if shared[stop]:
                    break
                continue
            handle(m)
            del m                      # a zero-copy view must not pin its slot
            got += 1
            if not got & every or got == expect:
                last = now()
    else:
        while True:
            m = recv()
            if not m:                  # None or the empty wake-up message
                if got & every and got != expect and got != stamped:
                    last = now()       # the last message was not stamped
                    stamped = got   # once: later wake-ups come later still
                shared[index] = got
                if shared[stop]:
                    break
                continue
            handle(m)
            del m
            got += 1
            if not got & every or got == expect:
                last = now()
    return got, last, kept


def compares_inline(producers, consumers, mode, size, count):
    """Whether the consumer checks each message as it arrives against the
    expected ones, built before the window (``consume_compare``): one consumer
    (it then sees every producer's messages in order), small raw messages, and
    the expected messages fit the same memory budget as a producer's prebuilt
    ones; batches only from one producer (a batch is compared as one list)."""
    return (consumers == 1 and plan_for(mode, size) == KEEP and mode in ("bytes", "batch")
            and (mode == "bytes" or producers == 1)
            and producers * count * max(size, 64) <= PREBUILD_MAX_BYTES)


def expected_messages(producers, count, size, mode):
    """What ``consume_compare`` compares with: each producer's messages, in
    order, then None (built before the window: a message after the last one
    then finds None, which it never equals)."""
    builders = [Builder(p, size, mode) for p in range(producers)]
    return [[b.build(s) for s in range(count)] + [None] for b in builders]


def consume_compare(recv, recv_many, batch, shared, index, expected, expect):
    """``consume`` for the one consumer of small raw messages: every message is
    compared byte for byte with the one expected next from its producer (the
    first byte of a message names it) and dropped, so nothing is kept (keeping
    every message would cost a page fault every few dozen messages, which is
    not the queue's cost); a batch from one producer is compared as one list.

    At the first message that is not the expected one it falls back to keeping
    everything from that message on, so that ``settle_compare`` can say what
    went wrong (lost, duplicated, reordered or corrupted). Returns ``(got,
    last_ns, kept)`` like ``consume``; ``kept`` is (messages matched per
    producer, messages kept)."""
    now = time.monotonic_ns
    last = got = 0
    stamped = -1                       # got when the clock was last read at a wake-up
    stop = len(shared) - 1
    every = STAMP_EVERY - 1
    nprod = len(expected)
    rest = []
    if batch:
        exp, pos = expected[0], 0
        while True:
            msgs = recv_many()
            if not msgs:
                shared[index] = got
                if shared[stop]:
                    break
                continue
            n = len(msgs)
            got += n
            last = now()
            if msgs != exp[pos:pos + n]:
                rest = list(msgs)
                break
            pos += n
        matched = [pos]
    elif nprod == 1:
        got, last, m = _compare_one(recv, shared, index, expected[0])
        matched = [got]
        if m is not None:
            got += 1
            rest.append(m)
    else:
        # the next message expected from each producer: exps[p][pos[p]]; a
        # first byte that names no producer finds only None (no match)
        exps = expected + [[None]] * (256 - nprod)
        pos = [0] * 256
        while True:
            m = recv()
            if not m:                  # None or the empty wake-up message
                if got & every and got != expect and got != stamped:
                    last = now()       # the last message was not stamped
                    stamped = got   # once: later wake-ups come later still
                shared[index] = got
                if shared[stop]:
                    break
                continue
            got += 1
            p = m[0]
            k = pos[p]
            if m != exps[p][k]:
                if not got & every or got == expect:
                    last = now()
                rest.append(m)
                break
            pos[p] = k + 1
            del m
            if not got & every or got == expect:
                last = now()
        matched = pos[:nprod]
    if rest:
        # Something is wrong: keep the rest for settle_compare to explain
        # (``consume`` publishes counts from 0: add ours to them).
        more, then, kept = consume(recv, recv_many, KEEP, batch, _Offset(shared, index, got),
                                   index, expect=expect - got if expect > got else 0)
        got += more
        rest += kept
        last = max(last, then)
    return got, last, (matched, rest)


class _Offset:
    """``shared`` as ``consume`` sees it after ``got`` messages were counted
    elsewhere: its own entry is published plus ``got``."""

    def __init__(self, shared, index, got):
        self.shared, self.index, self.got = shared, index, got

    def __len__(self):
        return len(self.shared)

    def __getitem__(self, i):
        return self.shared[i]

    def __setitem__(self, i, v):
        self.shared[i] = v + self.got if i == self.index else v


def _compare_one(recv, shared, index, exp):
    """``consume_compare``'s loop for one producer: returns (messages matched,
    the time of the last one, the first message that did not match or None).

    It walks the expected messages in blocks of ``STAMP_EVERY``, laid out so
    that the last block ends at the last message, and reads the clock at the
    end of each block: the per-message work is one receive and one compare."""
    now = time.monotonic_ns
    stop = len(shared) - 1
    count = len(exp) - 1               # exp ends with None (expected_messages)
    it = iter(exp)
    hint = operator.length_hint
    first = count % STAMP_EVERY or STAMP_EVERY
    block = first
    last = 0
    stamped = -1
    e = b""
    while e is not None:
        e = None                       # stays None if the block is empty
        for e in itertools.islice(it, block):
            m = recv()
            if m != e:
                while not m:           # None or the empty wake-up message
                    got = count - hint(it)           # matched so far, e not among them
                    # (it holds count + 1 items and e was taken from it)
                    if (count - got) % STAMP_EVERY and got and got != stamped:
                        last = now()   # the last message was not stamped
                        stamped = got  # once: later wake-ups come later still
                    shared[index] = got
                    if shared[stop]:
                        return got, last, None
                    m = recv()
                if m != e:
                    got = count - hint(it)
                    return got, max(last, now()), m
        if e is not None:
            last = now()
            block = STAMP_EVERY
    # A None "matched" the None after the last message: a receive that timed
    # out (None) after all of them. Wait for the stop; anything more is extra.
    while True:
        shared[index] = count
        if shared[stop]:
            return count, last, None
        m = recv()
        if m:
            return count, last, m


def settle_compare(tally, kept):
    """Verify after the window what ``consume_compare`` could not match inline:
    the matched messages of each producer are its first ones, in order; the
    rest go through the tally one by one, which names the problem."""
    matched, rest = kept
    for p, k in enumerate(matched):
        tally.seen[p][:k] = b"\x01" * k
        tally.last[p] = k - 1
    for m in rest:
        tally.check(m)


def settle(tally, plan, kept):
    """Verify what ``consume`` kept (outside the timed window)."""
    if plan == KEEP:
        for m in kept:
            tally.check(m)
    elif plan == FINGERPRINT:
        heads, tails, samples = kept
        fp = tally.check_fingerprint
        for h, t in zip(heads, tails):
            fp(h, t)
        for m in samples:
            tally.check_body(m)


def _producer(peer, index, count, mode, size, batch, release, barrier, conn):
    def body(barrier):
        ep = peer.sender(index)
        build = _builder(peer, index, mode, size).build
        # Small messages are built before the start: making a payload costs
        # about as much as sending it through the fastest transports, and the
        # producer's own work is not what is being compared. (Larger ones come
        # from a pool of buffers, rewritten in place, as they are sent.)
        messages = None
        if prebuilt(mode, size) and count * max(size, 64) <= PREBUILD_MAX_BYTES:
            messages = [build(s) for s in range(count)]
        barrier.wait(SETUP_TIMEOUT)
        t0, t1 = produce(ep.send, ep.send_many, build, count, batch, messages)
        ep.finish()

        def after():
            # Stay alive (channel open) until the consumers have everything: some
            # transports (zmq) drop what is in flight when the sending side exits.
            release.wait(SETUP_TIMEOUT + 60)
            ep.close()
        return {"t0": t0, "t1": t1, "after": after}
    _child(conn, barrier, body)


def _consumer(peer, index, producers, count, mode, size, batch, shared, barrier, conn):
    def body(barrier):
        ep = peer.receiver(index)
        tally = Tally(producers, count, size, mode)
        plan = plan_for(mode, size)
        consumers = len(shared) - 1
        # the one consumer knows which message is the last: it stamps it
        expect = producers * count if consumers == 1 else 0
        # (``batch``: this consumer receives lists, which only one producer's
        # messages are compared as)
        inline = compares_inline(producers, consumers, mode, size, count) and \
            (not batch or producers == 1)
        expected = expected_messages(producers, count, size, mode) if inline else None
        barrier.wait(SETUP_TIMEOUT)
        if inline:
            got, last, kept = consume_compare(ep.recv, ep.recv_many, batch, shared, index,
                                              expected, expect)
        else:
            got, last, kept = consume(ep.recv, ep.recv_many, plan, batch, shared, index,
                                      tally.check, arrays=mode in ARRAY_MODES, expect=expect)
        ep.close()
        if inline:
            settle_compare(tally, kept)
        else:
            settle(tally, plan, kept)
        return {"last": last, **tally.result()}
    _child(conn, barrier, body)


# ---------------------------------------------------------------- ceiling --

def harness_ceiling(producers, consumers, mode, size, seconds=0.05, cores=None) -> dict:
    """What the harness alone can move: the producer and consumer loops above,
    run in this process with a no-op channel (``send`` is a C builtin that does
    nothing with the message, ``recv`` hands out ready-made messages).

    Returns per-message costs of each side (ns) and the rate the harness caps a
    cell at: ``min(P / producer, C / consumer, cores / (producer + consumer))``.
    """
    import itertools
    cores = cores or len(os.sched_getaffinity(0))
    batch = mode == "batch"
    b = Builder(0, size, mode, SMALL_POOL) if mode != "pickle" else Builder(0, 0, mode)
    plan = plan_for(mode, size)
    pre = prebuilt(mode, size)

    def prod_cost(count):
        messages = [b.build(s) for s in range(count)] if pre else None
        t0, t1 = produce(id, len, b.build, count, batch, messages)
        return (t1 - t0) / count

    # copies: the producer's pooled buffers are rewritten by prod_cost
    ring = [m.copy() if hasattr(m, "copy") else m
            for m in (b.build(s) for s in range(64 if size <= FULL_CHECK_MAX else 4))]

    def cons_cost(count):
        tally = Tally(1, 64, size, mode)
        seen = tally.seen[0]

        def mark(p, seq):              # the ring repeats: count, never call it a duplicate
            seen[seq] = 1
        tally._mark = mark
        if batch:
            chunks = [ring] * max(1, count // len(ring))
            recv_many = itertools.chain(chunks, itertools.repeat([])).__next__
            recv = None
            count = len(ring) * len(chunks)
        else:
            recv_many = None
            recv = itertools.chain(itertools.islice(itertools.cycle(ring), count),
                                   itertools.repeat(None)).__next__
        shared = [0, 1]
        if compares_inline(producers, consumers, mode, size, count):
            # what a consumer compares with: equal messages, other objects
            copies = [bytes(bytearray(m)) for m in ring]
            expected = [[copies[i % len(copies)] for i in range(count)] + [None]]
            t0 = time.monotonic_ns()
            got, _, (matched, rest) = consume_compare(recv, recv_many, batch, shared, 0,
                                                         expected, count)
            assert got == matched[0] == count and not rest, "the ceiling's own check failed"
        else:
            t0 = time.monotonic_ns()
            consume(recv, recv_many, plan, batch, shared, 0, tally.check,
                    arrays=mode in ARRAY_MODES, expect=count if consumers == 1 else 0)
        return (time.monotonic_ns() - t0) / count

    def timed(fn):
        n = 256
        while True:
            t0 = time.perf_counter()
            cost = fn(n)
            if time.perf_counter() - t0 >= seconds or n >= 4_000_000:
                break
            n *= 4
        return min(cost, fn(n))        # best of two of the final length
    a, c = timed(prod_cost), timed(cons_cost)
    rate = min(producers / a, consumers / c, cores / (a + c)) * 1e9
    return {"producer_ns": a, "consumer_ns": c, "msgs_per_s": rate, "cores": cores}


# ------------------------------------------------------------------ parent --

class _Children:
    """Started worker processes with their result pipes; reaped in ``reap()``."""

    def __init__(self):
        self.procs, self.conns, self.roles = [], [], []

    def start(self, role, target, args):
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=target, args=(*args, w), daemon=True, name=f"bench-{role}")
        p.start()
        w.close()
        self.procs.append(p)
        self.conns.append(r)
        self.roles.append(role)

    def collect(self, indexes, deadline, on_idle=None):
        """Results of the given children, or CellFailed on error/timeout."""
        results, pending = {}, {self.conns[i]: i for i in indexes}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(self.roles[i] for i in sorted(pending.values()))
                raise CellFailed("timeout", [f"no result from {names} before the deadline "
                                             "(a peer hung; the processes were killed)"])
            for c in _wait_conns(list(pending), timeout=min(left, 0.05)):
                i = pending.pop(c)
                try:
                    res = c.recv()
                except EOFError:
                    code = self.procs[i].exitcode
                    raise CellFailed("crash", [f"{self.roles[i]} died without a result "
                                               f"(exit code {code})"]) from None
                if not res.get("ok"):
                    raise CellFailed("error", [f"{self.roles[i]}: {res.get('error')}"])
                results[i] = res
            if pending and on_idle is not None:
                on_idle()
        return [results[i] for i in indexes]

    def reap(self):
        for p in self.procs:
            p.join(timeout=0.5)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=1.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)
        for c in self.conns:
            c.close()


def _barrier_start(barrier, kids):
    try:
        barrier.wait(SETUP_TIMEOUT)
    except threading.BrokenBarrierError:
        # a child failed during set-up; its error is in its pipe
        try:
            kids.collect(range(len(kids.procs)), time.monotonic() + 2.0)
        except CellFailed:
            raise
        raise CellFailed("error", ["a worker failed during set-up"]) from None


def _make_peer(peer_cls, producers, consumers, mode, size, depth, warm=True):
    """Create (and warm) a channel; any failure is the peer's, reported as a cell error."""
    try:
        peer = peer_cls(producers, consumers, mode, size, depth)
    except Exception as exc:  # noqa: BLE001
        raise CellFailed("error", [f"creating the channel failed: {type(exc).__name__}: {exc}"]) from exc
    if warm:
        try:
            peer.warm()
        except Exception as exc:  # noqa: BLE001
            try:
                peer.close()
            except Exception:  # noqa: BLE001
                pass
            raise CellFailed("error", [f"warming the channel failed: {type(exc).__name__}: {exc}"]) from exc
    return peer


def run_throughput(peer_cls, producers, consumers, mode, size, count, depth,
                   timeout=30.0) -> dict:
    """Move ``count`` messages from each of ``producers`` to ``consumers`` processes.

    Returns ``{"messages", "seconds", "msgs_per_s", "bytes_per_s"}``; raises
    ``CellFailed`` if anything went wrong (including any lost/duplicated/corrupted
    message).
    """
    batch = mode == "batch"
    peer = _make_peer(peer_cls, producers, consumers, mode, size, depth)
    kids = _Children()
    shared = CTX.RawArray("q", consumers + 1)
    barrier = CTX.Barrier(producers + consumers + 1)
    release = CTX.Event()
    try:
        for j in range(consumers):
            kids.start(f"consumer {j}", _consumer,
                       (peer, j, producers, count, mode, size,
                        batch or peer.recv_in_batches, shared, barrier))
        for i in range(producers):
            kids.start(f"producer {i}", _producer,
                       (peer, i, count, mode, size, batch, release, barrier))
        _barrier_start(barrier, kids)
        deadline = time.monotonic() + timeout
        cons = list(range(consumers))
        prods = list(range(consumers, consumers + producers))
        pres = kids.collect(prods, deadline)
        total = producers * count
        while sum(shared[:consumers]) < total and time.monotonic() < deadline:
            peer.wake(consumers)
            time.sleep(0.005)
            if any(not kids.procs[j].is_alive() for j in cons):
                break
        shared[consumers] = 1
        cres = kids.collect(cons, min(deadline + 2.0, time.monotonic() + 5.0),
                            on_idle=lambda: peer.wake(consumers))
    finally:
        release.set()
        kids.reap()
        try:
            peer.close()
        except Exception:  # noqa: BLE001
            pass
    problems = verify(cres, producers, count)
    if problems:
        raise CellFailed("verification", problems)
    t0 = min(r["t0"] for r in pres)
    t1 = max(r["last"] for r in cres)
    seconds = max(t1 - t0, 1) / 1e9
    n = producers * count
    return {"messages": n, "seconds": seconds, "msgs_per_s": n / seconds,
            "bytes_per_s": n * size / seconds if mode != "pickle" else None}


# --------------------------------------------------------------- ping-pong --

def _pinger(ping, pong, size, seconds, warmup, stop, barrier, conn):
    def body(barrier):
        s, r = ping.sender(0), pong.receiver(0)
        build = Builder(0, size, "bytes").build
        msgs = [build(i) for i in range(64)]
        barrier.wait(SETUP_TIMEOUT)
        send, recv, clock = s.send, r.recv, time.perf_counter_ns
        rtts = array("q")
        bad = 0
        end = clock() + int(seconds * 1e9)
        i = 0
        while True:
            m = msgs[i & 63]
            t0 = clock()
            send(m)
            back = recv()
            while back is None:        # a receive timeout (zmq), not an answer
                back = recv()
            t1 = clock()
            if back is None or bytes(back) != m:
                bad += 1
            if i >= warmup:
                rtts.append(t1 - t0)
                if t1 > end and len(rtts) >= 200:
                    break
            i += 1
        stop.value = 1
        s.send(b"")                    # wakes the echo process, which sees ``stop``
        s.finish()
        r.close()
        return {"rtts": rtts.tobytes(), "bad": bad}
    _child(conn, barrier, body)


def _echoer(ping, pong, stop, barrier, conn):
    def body(barrier):
        r, s = ping.receiver(0), pong.sender(0)
        barrier.wait(SETUP_TIMEOUT)
        recv, send = r.recv, s.send
        n = 0
        while True:
            m = recv()
            if not m:                  # None or the empty wake-up message
                if stop.value:
                    break
                continue
            send(m)
            n += 1
        s.finish()
        r.close()
        return {"echoed": n}
    _child(conn, barrier, body)


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def run_pingpong(peer_cls, size=64, seconds=0.3, warmup=200, timeout=30.0) -> dict:
    """Round trips of one ``size``-byte message between two processes over two
    channels, blocking waits on both sides. Returns percentiles in microseconds."""
    ping = _make_peer(peer_cls, 1, 1, "bytes", size, 16, warm=False)
    pong = _make_peer(peer_cls, 1, 1, "bytes", size, 16, warm=False)
    kids = _Children()
    barrier = CTX.Barrier(3)
    stop = CTX.RawValue("i", 0)
    try:
        kids.start("echo", _echoer, (ping, pong, stop, barrier))
        kids.start("pinger", _pinger, (ping, pong, size, seconds, warmup, stop, barrier))
        _barrier_start(barrier, kids)
        deadline = time.monotonic() + timeout + seconds
        res = kids.collect([1], deadline)[0]
        stop.value = 1
        kids.collect([0], time.monotonic() + 5.0, on_idle=lambda: ping.wake(1))
    finally:
        kids.reap()
        for p in (ping, pong):
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass
    if res["bad"]:
        raise CellFailed("verification", [f"{res['bad']} round trip(s) came back corrupted"])
    rtts = array("q")
    rtts.frombytes(res["rtts"])
    vals = sorted(rtts)
    return {"round_trips": len(vals),
            "p50_us": percentile(vals, 50) / 1e3, "p99_us": percentile(vals, 99) / 1e3,
            "p999_us": percentile(vals, 99.9) / 1e3,
            "msgs_per_s": len(vals) / (sum(vals) / 1e9) if vals else 0.0}


# ------------------------------------------------------------------ memory --

def _footprint():
    """(resident bytes, bytes of shared /dev/shm mappings) of this process."""
    rss = shm = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
                break
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                shm += hi - lo
    return rss, shm


def _move_through(peer, n, size, deadline):
    """Send and receive ``n`` messages in this process, at most a bound's worth
    (or 256) in flight, so every lazily touched page of the channel is counted."""
    r = peer.receiver(0)              # first: iceoryx2's sender waits for a subscriber
    s = peer.sender(0)
    msg = Builder(0, size, "bytes").build(0)
    burst = max(1, min(getattr(peer, "depth_used", peer.depth), 256))
    done = 0
    while done < n:
        k = min(burst, n - done)
        for _ in range(k):
            s.send(msg)
        got = 0
        while got < k:
            if time.monotonic() > deadline:
                raise TimeoutError("messages did not come back")
            if r.recv() is not None:
                got += 1
        done += k
    return s, r


def _memory_child(peer_cls, size, depth, n, conn):
    def body(_barrier):
        deadline = time.monotonic() + SETUP_TIMEOUT
        # one throwaway channel first: imports and one-time allocations of the
        # library are not the queue's
        first = _make_peer(peer_cls, 1, 1, "bytes", size, depth)
        ends = _move_through(first, min(n, 64), size, deadline)
        before = _footprint()
        peer = _make_peer(peer_cls, 1, 1, "bytes", size, depth)
        created = _footprint()
        ends2 = _move_through(peer, n, size, deadline)
        after = _footprint()
        for e in (*ends, *ends2):
            try:
                e.close()
            except Exception:  # noqa: BLE001
                pass
        for p in (peer, first):
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass
        return {"rss_created": created[0] - before[0], "shm_created": created[1] - before[1],
                "rss_used": after[0] - before[0], "shm_used": after[1] - before[1]}

    class _NoBarrier:
        def abort(self):
            pass
    _child(conn, _NoBarrier(), body)


def run_memory(peer_cls, size=64, depth=1024, n=4096, timeout=30.0) -> dict:
    """Memory one queue costs its creating process: resident bytes (RSS) and
    /dev/shm mapped, right after creation and after ``n`` messages of ``size``
    bytes went through it. Measured in a fresh process; kernel memory (pipe
    and message-queue buffers) is not visible here and not counted."""
    kids = _Children()
    try:
        kids.start("memory", _memory_child, (peer_cls, size, depth, n))
        res = kids.collect([0], time.monotonic() + timeout)[0]
    finally:
        kids.reap()
    res.pop("ok", None)
    return res


# ------------------------------------------------------ ping-pong, no queue --

class SpinMailbox:
    """No queue at all, the ping-pong's reference: a one-message mailbox in
    anonymous shared memory (inherited by the forked children) that the
    receiving side busy-polls in Python. ``run_pingpong`` drives it with the
    same timed loops as every peer, so its round trips are what two Python
    processes on this machine take with nothing between them but a cache line;
    the slowest of them are the machine's (interrupts, the hypervisor taking
    the CPU), since nothing here ever sleeps or blocks.

    Layout: two u64 words, the sequence number and the length, then the
    payload. A ping-pong never has two messages in one mailbox (the sender
    waits for the answer before it sends again), so a sender writes length and
    payload, then a new sequence number; the receiver takes any sequence number
    it has not seen. The words go through a ``Q`` view, one 8-byte store or load
    each (``struct.pack_into`` would clear the field first and write it byte
    by byte, and a poller would see a sequence number of 0)."""

    label = "no queue, polled in Python"
    _AT = 16

    def __init__(self, producers, consumers, mode, size, depth):
        self.buf = mmap.mmap(-1, self._AT + max(size, 1))

    def _views(self):
        view = memoryview(self.buf)
        return view, view[:self._AT].cast("Q")

    def sender(self, index):
        view, words = self._views()
        at = self._AT

        def send(m):
            n = len(m)
            words[1] = n
            view[at:at + n] = m
            words[0] += 1
        return _Endpoint(send=send, close=_releaser(words, view))

    def receiver(self, index):
        view, words = self._views()
        at = self._AT
        seen = [words[0]]

        def recv():
            seq = words[0]
            if seq == seen[0]:
                return None
            seen[0] = seq
            return view[at:at + words[1]].tobytes()
        return _Endpoint(recv=recv, close=_releaser(words, view))

    def wake(self, n):
        if n:
            end = self.sender(0)
            end.send(b"")
            end.close()

    def close(self):
        try:
            self.buf.close()
        except BufferError:           # a view of it is still alive somewhere: it goes with it
            pass


def _releaser(*views):
    def release():
        for v in views:
            v.release()
    return release


# --------------------------------------------------------- ping-pong ceiling --

def pingpong_ceiling(size=64, n=20000) -> float:
    """The smallest round trip the ping-pong loop can report (µs, median): the
    timed part of ``_pinger`` with a no-op channel (send does nothing, receive
    hands the message straight back)."""
    build = Builder(0, size, "bytes").build
    msgs = [build(i) for i in range(64)]
    clock = time.perf_counter_ns
    send = id
    rtts = array("q")
    for i in range(n):
        m = msgs[i & 63]
        t0 = clock()
        send(m)
        back = m
        while back is None:
            back = m
        t1 = clock()
        rtts.append(t1 - t0)
    return percentile(sorted(rtts), 50) / 1e3
