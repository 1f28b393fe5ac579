# Part of fastmq._core (Ring: one handle on a queue segment (put/get, waits, lifetime, inspection)).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

# ======================================================================== #
# Ring                                                                     #
# ======================================================================== #

cdef class Ring:
    """One process-local handle on a queue segment (see _ring_protocol.Ring)."""
    cdef fmq_region *r
    cdef int busy          # calls in progress (GIL held while counting)
    cdef int pins          # live exporters (Reservation, ReceivedView, _PinnedPayload):
                           # their views may point into the map
    cdef bint _closed
    cdef bint _leases_returned   # close() handed this handle's leases back
    cdef readonly str name
    cdef readonly bint anonymous
    cdef readonly object maxsize, max_message_size, capacity_bytes
    cdef Py_ssize_t _max_msg
    cdef uint32_t _inline_max
    cdef object __weakref__

    def __cinit__(self):
        self.r = NULL

    cdef _bind(self, fmq_region *r):
        self.r = r
        self.name = fmq_region_name(r).decode()
        self.anonymous = fmq_region_is_anonymous(r) != 0
        self.maxsize = fmq_region_maxsize(r)
        self.max_message_size = fmq_region_max_message_size(r)
        self.capacity_bytes = fmq_region_capacity_bytes(r)
        self._max_msg = <Py_ssize_t>fmq_region_max_message_size(r)
        self._inline_max = fmq_region_inline_max(r)

    @classmethod
    def create(cls, str name, *, maxsize, max_message_size, capacity_bytes, mode=0o600,
               exist_ok=False, anonymous=False, max_deliveries=20, dead_letter="",
               slot_size=0):
        cdef fmq_params p
        cdef fmq_region *r = NULL
        cdef bytes bname = _segment_bytes(name)
        cdef bytes bdead = (dead_letter or "").encode()
        for label, v in (("maxsize", maxsize), ("max_message_size", max_message_size),
                         ("capacity_bytes", capacity_bytes), ("max_deliveries", max_deliveries),
                         ("slot_size", slot_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError("%s must be an int, not %s" % (label, type(v).__name__))
            if v < 0 or v >= 2 ** 63:
                raise ValueError("%s out of range: %r" % (label, v))
        if max_deliveries >= 2 ** 32 or slot_size >= 2 ** 32:
            raise ValueError("max_deliveries/slot_size out of range")
        if max_message_size > _MAX_FORMAT_LEN:
            # As the pure backend: a message's length is recorded in 32 bits.
            raise ValueError("max_message_size must be between 1 and %d bytes, got %d"
                             % (_MAX_FORMAT_LEN, max_message_size))
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise TypeError("mode must be an int, not %s" % type(mode).__name__)
        if not 0 <= mode <= 0o777:
            raise ValueError("mode must be permission bits only (0 to 0o777), got %s"
                             % (oct(mode) if mode >= 0 else mode))
        cdef unsigned umode = mode
        cdef int anon = 1 if anonymous else 0
        cdef int eok = 1 if exist_ok else 0
        cdef const char *cname = bname
        p.maxsize = maxsize
        p.max_message_size = max_message_size
        p.capacity_bytes = capacity_bytes
        p.slot_size = slot_size
        p.max_deliveries = max_deliveries
        p.dead_letter = bdead
        cdef int rc
        # Without the GIL: sizing and initialising a large segment takes a
        # while, and an exist_ok open may wait for a lock.
        with nogil:
            rc = fmq_region_create(cname, &p, umode, anon, eok, &r)
        if rc != FMQ_OK:
            _raise(rc)
        cdef Ring self = Ring.__new__(Ring)
        self._bind(r)
        return self

    @classmethod
    def open(cls, str name):
        cdef fmq_region *r = NULL
        cdef bytes bname = _segment_bytes(name)
        cdef const char *cname = bname
        cdef int rc
        # Without the GIL: open waits (bounded) for another process's lock.
        with nogil:
            rc = fmq_region_open(cname, &r)
        if rc != FMQ_OK:
            _raise(rc)
        cdef Ring self = Ring.__new__(Ring)
        self._bind(r)
        return self

    @staticmethod
    def unlink(str name):
        cdef bytes bname = _segment_bytes(name)
        cdef int rc = fmq_region_unlink(bname)
        if rc != FMQ_OK:
            _raise(rc)

    # ---- lifetime ------------------------------------------------------- #

    cdef inline int _enter(self) except -1:
        if self._closed:
            _raise_closed()
        cdef int rc = fmq_region_check_fork(self.r)
        if rc != FMQ_OK:
            _raise(rc)
        self.busy += 1
        return 0

    cdef inline void _leave(self):
        self.busy -= 1
        if self._closed and self.busy == 0:
            self._return_leases()
            if self.pins == 0:
                self._unmap()

    cdef void _return_leases(self):
        """Once, when the handle is closed and no call is in progress: its
        un-acked leases go back to the queue for immediate redelivery and the
        dead letters it took are parked again (a departed holder). Pinned
        payloads keep their blocks (the hand-over in fmq_lease.c)."""
        if self._leases_returned or self.r == NULL:
            return
        self._leases_returned = True
        fmq_lease_release_owned(self.r)

    cdef void _unmap(self):
        if self.r != NULL:
            fmq_region_close(self.r)
            self.r = NULL

    cdef void _unpin(self):
        self.pins -= 1
        if self._closed and self.busy == 0 and self.pins == 0:
            self._unmap()

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Idempotent. Views into this mapping stay valid until released.
        Un-acked leases of this handle go back to the queue at once (when a
        call of another thread is still in progress: as soon as it ends)."""
        self._closed = True
        if self.busy == 0:
            self._return_leases()
            if self.pins == 0:
                self._unmap()

    def __dealloc__(self):
        # busy/pins hold references to us, so nothing can be using the map now.
        if self.r != NULL:
            self._return_leases()
            fmq_region_close(self.r)
            self.r = NULL

    # ---- waiting -------------------------------------------------------- #

    cdef str _full_msg(self, uint64_t need):
        """Full's message: which limit a put of ``need`` bytes ran into."""
        return fmq_region_full_reason(self.r, need).decode("utf-8", "replace")

    def full(self):
        """True when a put of a small message would block right now."""
        self._enter()
        try:
            return bool(fmq_region_full(self.r))
        finally:
            self._leave()

    def _pool_census(self):
        """(carved, free, held) block counts; tests use it with nobody else
        moving blocks: carved == free + held means no block is lost."""
        cdef uint64_t carved, free_blocks, held
        self._enter()
        try:
            fmq_pool_census(self.r, &carved, &free_blocks, &held)
        finally:
            self._leave()
        return carved, free_blocks, held

    def memory(self):
        """Bytes this segment has reserved in /dev/shm, by part."""
        cdef fmq_memory mem
        self._enter()
        try:
            fmq_region_memory(self.r, &mem)
        finally:
            self._leave()
        return {"reserved": mem.reserved, "fixed": mem.fixed, "ring": mem.ring,
                "block_metadata": mem.meta, "blocks_in_use": mem.blocks_in_use,
                "blocks_kept": mem.blocks_kept, "virtual_size": mem.virtual_size,
                "slots_reserved": mem.slots_reserved}

    cdef int _wait(self, bint for_space, uint64_t deadline, uint64_t need) except -1:
        """Sleep until worth retrying; raise Full/Empty at the deadline."""
        cdef int rc
        with nogil:
            if for_space:
                rc = fmq_ring_wait_space(self.r, deadline, need)
            else:
                rc = fmq_ring_wait_data(self.r, deadline)
        if rc == FMQ_TIMEDOUT:
            if for_space:
                _raise(FMQ_FULL, self._full_msg(need))
            _raise(FMQ_EMPTY)
        if rc == FMQ_AGAIN or rc == FMQ_EINTR:
            _check_wait(self._closed)     # KeyboardInterrupt etc. raise here
        return 0

    def wait(self, bint for_space, double timeout, Py_ssize_t need=0):
        """Sleep until a message looks ready to take (for_space False), or a
        slot and ``need`` bytes look free, for at most ``timeout`` seconds and
        one wait slice: True if so, else False. Takes nothing; never raises
        Empty or Full (the asyncio waiter threads' wait)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout if timeout > 0 else 1e-9, &nonblock)
        cdef int rc
        cdef uint64_t n = <uint64_t>need if need > 0 else 0
        self._enter()
        try:
            with nogil:
                if for_space:
                    rc = fmq_ring_wait_space(self.r, deadline, 0)
                    if rc == FMQ_OK and n > self._inline_max:
                        rc = fmq_ring_wait_space(self.r, deadline, n)
                else:
                    rc = fmq_ring_wait_data(self.r, deadline)
        finally:
            self._leave()
        if rc == FMQ_OK:
            return True
        if rc == FMQ_TIMEDOUT or rc == FMQ_AGAIN or rc == FMQ_EINTR:
            return False
        _raise(rc)

    # ---- writing -------------------------------------------------------- #

    cdef int _alloc_block(self, Py_ssize_t n, bint nonblock, uint64_t deadline,
                          uint32_t *block) except -1:
        cdef int rc
        while True:
            rc = fmq_pool_alloc(self.r, <uint64_t>n, block)
            if rc == FMQ_OK:
                return 0
            if rc != FMQ_NOSPACE:
                _raise(rc)
            if nonblock:
                _raise(FMQ_FULL, self._full_msg(<uint64_t>n))
            self._wait(True, deadline, <uint64_t>n)

    cdef int _claim(self, fmq_msg *m, bint for_write, bint nonblock,
                    uint64_t deadline) except -1:
        """Claim a slot to write (FULL -> wait for space) or a message to read
        (EMPTY -> wait for data), until the deadline."""
        cdef int rc
        while True:
            rc = fmq_ring_reserve(self.r, m) if for_write else fmq_ring_claim(self.r, m)
            if rc == FMQ_OK:
                return 0
            if rc != (FMQ_FULL if for_write else FMQ_EMPTY):
                _raise(rc)
            if nonblock:
                if for_write:
                    _raise(FMQ_FULL, self._full_msg(0))
                _raise(FMQ_EMPTY)
            self._wait(for_write, deadline, 0)

    cdef inline int _claim_slot(self, fmq_msg *m, bint nonblock, uint64_t deadline) except -1:
        return self._claim(m, True, nonblock, deadline)

    cdef int _put_raw(self, const unsigned char *src, Py_ssize_t n, bint nonblock,
                      uint64_t deadline, int wake) except -1:
        cdef uint32_t block = FMQ_NO_BLOCK
        cdef unsigned char *dst
        cdef fmq_msg m
        cdef int rc
        if n > <Py_ssize_t>self._inline_max:
            self._alloc_block(n, nonblock, deadline, &block)
            dst = fmq_pool_ptr(self.r, block)
            if n >= _NOGIL_COPY:
                with nogil:
                    memcpy(dst, src, n)
            else:
                memcpy(dst, src, n)
            try:
                self._claim_slot(&m, nonblock, deadline)
            except BaseException:
                fmq_pool_release_writer(self.r, block)     # nothing was published
                raise
        else:
            self._claim_slot(&m, nonblock, deadline)
            memcpy(fmq_ring_inline_ptr(self.r, &m), src, n)
        rc = fmq_ring_commit(self.r, &m, <uint32_t>n, block, wake, 0)
        if rc != FMQ_OK:
            if block != FMQ_NO_BLOCK:
                fmq_pool_release_writer(self.r, block)
            _raise(rc)
        return 0

    cdef inline int _check_size(self, Py_ssize_t n) except -1:
        if n > <Py_ssize_t>_MAX_FORMAT_LEN:
            # A slot and an in-flight entry record a length in 32 bits.
            raise MessageTooLarge(
                "message of %d bytes exceeds the largest message fastmq can carry "
                "(%d bytes)" % (n, _MAX_FORMAT_LEN))
        if n > self._max_msg:
            raise MessageTooLarge(
                "message of %d bytes exceeds this queue's max_message_size of %d bytes "
                "(create the queue with a larger max_message_size)" % (n, self._max_msg))
        return 0

    def put(self, data, timeout=None):
        """Enqueue one bytes-like object (copied once into shared memory)."""
        cdef Py_buffer view
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        self._enter()
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                self._check_size(view.len)
                self._put_raw(<const unsigned char *>view.buf, view.len, nonblock, deadline, 1)
            finally:
                PyBuffer_Release(&view)
        finally:
            self._leave()

    def put_many(self, items, timeout=None):
        """Enqueue in order; returns how many went in (see the ring contract)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef Py_buffer view
        cdef Py_ssize_t i, n, done = 0
        if not isinstance(items, (list, tuple)):
            items = list(items)
        n = len(items)
        self._enter()
        try:
            # Every size is checked before anything is written: a batch with
            # one oversize item is rejected whole, not half-sent.
            for i in range(n):
                PyObject_GetBuffer(items[i], &view, PyBUF_SIMPLE)
                try:
                    self._check_size(view.len)
                finally:
                    PyBuffer_Release(&view)
            for i in range(n):
                PyObject_GetBuffer(items[i], &view, PyBUF_SIMPLE)
                try:
                    try:
                        # First try without blocking; before any wait, wake the
                        # consumers of what is already in, or they may sleep
                        # while we wait for them to make room.
                        self._put_raw(<const unsigned char *>view.buf, view.len, True, 0, 0)
                    except Full:
                        fmq_ring_wake_consumers(self.r, 1)
                        if nonblock:
                            break
                        try:
                            self._put_raw(<const unsigned char *>view.buf, view.len, False,
                                          deadline, 0)
                        except Full:
                            break
                finally:
                    PyBuffer_Release(&view)
                done += 1
        finally:
            if self.r != NULL and done:
                fmq_ring_wake_consumers(self.r, 1)
            self._leave()
        return done

    def reserve(self, Py_ssize_t nbytes, timeout=None):
        """Space for one message of nbytes, written in place (a block)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef uint32_t block = FMQ_NO_BLOCK
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._check_size(nbytes)
        self._enter()
        try:
            self._alloc_block(nbytes if nbytes > 0 else 1, nonblock, deadline, &block)
            res = Reservation._new(self, block, nbytes, timeout)
        finally:
            self._leave()
        return res

    # ---- reading -------------------------------------------------------- #

    cdef inline int _claim_msg(self, fmq_msg *m, bint nonblock, uint64_t deadline) except -1:
        return self._claim(m, False, nonblock, deadline)

    cdef bytes _take_bytes(self, fmq_msg *m, int wake):
        """Copy a claimed message out and release it; unclaim on failure."""
        cdef bytes out
        cdef int rc
        cdef char *dst
        try:
            out = PyBytes_FromStringAndSize(NULL, m.len)
        except BaseException:
            fmq_ring_unclaim(self.r, m)           # the message stays queued
            raise
        dst = PyBytes_AS_STRING(out)
        # The slot stays claimed during the copy: the hand-over is the release
        # below, so a process killed mid-copy gives the message back (crash
        # recovery puts the slot back to READY).
        if m.len >= _NOGIL_COPY:
            with nogil:
                memcpy(dst, m.data, m.len)
        else:
            memcpy(dst, m.data, m.len)
        rc = fmq_ring_release(self.r, m, wake)
        if rc != FMQ_OK:
            _raise(rc)
        return out

    def get(self, timeout=None):
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef fmq_msg m
        self._enter()
        try:
            self._claim_msg(&m, nonblock, deadline)
            return self._take_bytes(&m, 1)
        finally:
            self._leave()

    def get_many(self, Py_ssize_t max_messages, timeout=None, decode=None):
        """At least one message (waiting up to timeout), at most max_messages.

        The batch is handed over only as far as it is returned: every message
        is claimed first, then copied (and passed through ``decode`` if given),
        and only then are the slots of the returned ones released. If
        ``decode`` raises for a message, the ones decoded before it are
        returned and it and everything after it go back to the queue in place;
        if it is the first, it is consumed (it is the bad one) and its error
        propagates. Any other failure (MemoryError, KeyboardInterrupt) gives
        the whole batch back. A process killed meanwhile gives it back too
        (crash recovery), so nothing is lost that the caller did not receive.
        """
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef fmq_msg *msgs
        cdef fmq_msg *grown
        cdef Py_ssize_t k = 0, i, j, bad = -1, keep
        cdef list out = []
        cdef bytes raw
        cdef int rc
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        # The claim array grows with what is actually claimed: sizing it by
        # max_messages up front would allocate gigabytes for a call that
        # finds three messages (max_messages may be up to 2**30).
        cdef Py_ssize_t cap = max_messages if max_messages < 64 else 64
        self._enter()
        msgs = <fmq_msg *>PyMem_Malloc(cap * sizeof(fmq_msg))
        if msgs == NULL:
            self._leave()
            raise MemoryError()
        try:
            self._claim_msg(&msgs[0], nonblock, deadline)
            k = 1
            while k < max_messages:
                if k == cap:
                    j = cap * 2 if cap * 2 < max_messages else max_messages
                    grown = <fmq_msg *>PyMem_Realloc(msgs, j * sizeof(fmq_msg))
                    if grown == NULL:
                        break               # "at most max_messages": return these
                    msgs, cap = grown, j
                rc = fmq_ring_claim_from(self.r, &msgs[k], msgs[k - 1].ticket + 1)
                if rc == FMQ_EMPTY:
                    break
                if rc != FMQ_OK:
                    # E.g. a damaged message (consumed by the core and
                    # counted): the claims so far go back in place, in
                    # order, and the caller hears about it.
                    for j in range(k):
                        fmq_ring_unclaim(self.r, &msgs[j])
                    k = 0
                    _raise(rc)
                k += 1
            try:
                for i in range(k):
                    raw = PyBytes_FromStringAndSize(<char *>msgs[i].data, msgs[i].len)
                    if decode is None:
                        out.append(raw)
                    else:
                        bad = i
                        out.append(decode(raw))
                        bad = -1
            except BaseException as exc:
                if bad >= 0 and not isinstance(exc, Exception):
                    bad = -1                    # Ctrl-C while decoding: not a bad message
                if bad > 0:
                    keep = bad                  # return what decoded; the rest back
                elif bad == 0:
                    fmq_ring_release(self.r, &msgs[0], 0)   # the undecodable one
                    keep = 1
                else:
                    keep = 0                    # not a decode error: all back
                for j in range(keep, k):
                    fmq_ring_unclaim(self.r, &msgs[j])
                if bad <= 0:
                    k = keep
                    raise
                k = keep
            damaged = None
            for i in range(1 if bad == 0 else 0, k):
                rc = fmq_ring_release(self.r, &msgs[i], 0)
                if rc != FMQ_OK:
                    # Damaged (consumed and counted by the core): every other
                    # message is released -- handed over -- and returned.
                    if damaged is None:
                        damaged = []
                    damaged.append(i)
            if damaged is not None:
                out = [x for i, x in enumerate(out[:k]) if i not in damaged]
                k = len(out)
                if not out:
                    _raise(FMQ_ECORRUPT)
        finally:
            PyMem_Free(msgs)
            if self.r != NULL and k:
                fmq_ring_wake_producers(self.r)
            self._leave()
        return out[:k] if decode is not None else out

    def recv(self, timeout=None):
        """Receive one message without copying it out (large ones) -> ReceivedView."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef fmq_msg m
        self._enter()
        try:
            self._claim_msg(&m, nonblock, deadline)
            if m.block == FMQ_NO_BLOCK:
                # Small: a private copy is cheaper than pinning, and frees the
                # slot at once.
                return ReceivedView._new_copy(self, self._take_bytes(&m, 1))
            return ReceivedView._new_block(self, &m)
        finally:
            self._leave()

    # ---- at-least-once ------------------------------------------------- #
    #
    # Leasing and settling belong to this handle's Consumer (consumer.pxi);
    # what stays here is queue-wide: housekeeping of the in-flight table and
    # its inspection.

    def consumer(self, owner, type message_class):
        """A new Consumer on this handle: it leases ``message_class`` objects
        (a LeasedMessage subclass) that lead back to ``owner``."""
        return Consumer._new(self, owner, message_class)

    def redeliver_due(self):
        self._enter()
        try:
            rc = fmq_lease_redeliver_due(self.r, 1)
        finally:
            self._leave()
        if rc < 0:
            _raise(rc)
        return rc

    def pending(self):
        cdef fmq_pending *buf
        cdef int n, i
        cdef uint64_t now
        self._enter()
        try:
            buf = <fmq_pending *>PyMem_Malloc(fmq_lease_count(self.r) * sizeof(fmq_pending))
            if buf == NULL:
                raise MemoryError()
            try:
                n = fmq_lease_pending(self.r, buf, fmq_lease_count(self.r))
                now = fmq_now_ns()
                return [{"id": buf[i].slot, "token": buf[i].token, "pid": buf[i].pid,
                         "idle": (now - buf[i].leased_ns) / 1e9,
                         "delivery_count": buf[i].deliveries,
                         "expires_in": (<double>buf[i].deadline_ns - <double>now) / 1e9}
                        for i in range(n)]
            finally:
                PyMem_Free(buf)
        finally:
            self._leave()

    # ---- state ---------------------------------------------------------- #

    def qsize(self):
        self._enter()
        try:
            return fmq_ring_depth(self.r)
        finally:
            self._leave()

    def stats(self):
        cdef fmq_stats st
        self._enter()
        try:
            fmq_region_stats(self.r, &st)
        finally:
            self._leave()
        return {
            "depth": st.depth, "capacity": st.capacity, "enqueued": st.enqueued,
            "dequeued": st.dequeued, "bytes_in_use": st.bytes_in_use,
            "producers": st.producers, "consumers": st.consumers,
            "participants": st.participants, "redelivered": st.redelivered,
            "abandoned": st.abandoned, "dead_lettered": st.dead_lettered,
            "blocks_total": st.blocks_total, "reclaimed_blocks": st.reclaimed,
            "recoveries": st.recoveries,
            "stalled": None if st.stall_ticket == 0 else {
                "pid": st.stall_pid, "since_seconds": (fmq_now_ns() - st.stall_since_ns) / 1e9,
                "phase": "writing" if st.stall_phase == 1 else "reading",
                "ticket": st.stall_ticket - 1},
            "max_message_size": self.max_message_size,
            "capacity_bytes": self.capacity_bytes,
            "memory": self.memory(),
        }

    def recover(self):
        """Reap every provably dead participant now; returns how many."""
        cdef int rc
        self._enter()
        try:
            with nogil:
                rc = fmq_recover(self.r)
        finally:
            self._leave()
        if rc < 0:
            _raise(rc)
        return rc

    @property
    def max_deliveries(self):
        return fmq_region_max_deliveries(self.r) if self.r != NULL else None

    @property
    def dead_letter(self):
        return fmq_region_dead_letter(self.r).decode() if self.r != NULL else None

    @property
    def inline_max(self):
        return self._inline_max

    def _selftest_stress(self, int nprod, int ncons, uint64_t n_per_producer,
                         uint32_t max_len):
        """Run the C multi-threaded ring stress on this segment -> (ok, report)."""
        cdef char report[512]
        cdef int rc
        self._enter()
        try:
            with nogil:
                rc = fmq_selftest_stress(self.r, nprod, ncons, n_per_producer, max_len,
                                         report, sizeof(report))
        finally:
            self._leave()
        return rc == FMQ_OK, report.decode("utf-8", "replace")
