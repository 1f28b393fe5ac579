# Part of fastmq._core (buffer exporters: Reservation, ReceivedView; list_segments).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

# ======================================================================== #
# buffer exporters                                                         #
# ======================================================================== #

@cython.no_gc_clear
cdef class _Exporter:
    """Exports one contiguous byte range and counts the exports.

    The memoryview handed to users is made from this object, so CPython's
    managed buffer holds exactly one export of ours for as long as that
    memoryview, any slice of it, or anything built on it (numpy arrays) lives.
    When the count drops to zero after close(), the memory is given back.

    no_gc_clear: the cached view refers back to us, so a dropped exporter is
    freed by the cycle collector; it must not clear ``ring`` first, or
    __dealloc__ could not give the memory back (a leaked block).

    Fork: what this export holds in shared memory is held by the process that
    made it. A copy inherited through fork() (``gen`` is an older fork
    generation) may still read the bytes -- the mapping is inherited and the
    parent keeps its share -- but dropping it, closing it or exiting gives
    nothing back: that would release the parent's share under the parent's
    identity while the parent's views still show those bytes.
    """
    cdef Ring ring
    cdef unsigned char *ptr
    cdef Py_ssize_t size
    cdef bint readonly_
    cdef int exports
    cdef bint closing
    cdef bint freed
    cdef object _view
    cdef unsigned gen      # fmq_fork_gen() when made: another value = inherited
    cdef Py_ssize_t shape[1]

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.freed:
            raise BufferError("this message's memory was already released")
        if self.readonly_ and (flags & PyBUF_WRITABLE):
            raise BufferError("message data is read-only")
        self.shape[0] = self.size
        buffer.buf = <void *>self.ptr
        buffer.obj = self
        buffer.len = self.size
        buffer.readonly = 1 if self.readonly_ else 0
        buffer.itemsize = 1
        buffer.format = "B"
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1
        if self.exports == 0 and self.closing:
            self._free()

    cdef void _attach(self, Ring ring, unsigned char *ptr, Py_ssize_t size, bint readonly):
        """Export ptr[0:size] of ring's mapping, which stays mapped (a pin on
        the Ring) until _free."""
        self.ring = ring
        self.ptr = ptr
        self.size = size
        self.readonly_ = readonly
        self.gen = fmq_fork_gen()
        ring.pins += 1

    cdef inline bint _inherited(self):
        return self.gen != fmq_fork_gen()

    cdef void _free(self):
        """Once: give the memory back (_give_back; not in a forked child) and
        unpin the mapping (the pin count is this process's own)."""
        if self.freed:
            return
        self.freed = True
        if self.ring.r != NULL and not self._inherited():
            self._give_back()
        self.ring._unpin()

    cdef void _give_back(self):
        """What this kind of export holds in shared memory (the mapping is
        still there when this runs). C fields only: it may run from
        __dealloc__, after a subclass's object fields were cleared."""
        pass

    def __dealloc__(self):
        # Nothing else refers to us: no view and no user, so free now. The
        # subclass's C fields (block, slot...) are still intact here.
        if not self.freed and self.ring is not None:
            self._free()

    @property
    def view(self):
        if self._view is None:
            if self.freed or self.closing:
                raise ValueError("the view was released")
            self._view = memoryview(self)
        return self._view

    @property
    def nbytes(self):
        return self.size

    def close(self):
        """Give the memory back now, or when the last view is released."""
        if self.freed:
            return
        self.closing = True
        self._view = None          # our own reference; users' views keep theirs
        if self.exports == 0:
            self._free()

    def release(self):
        """Give the memory back now; BufferError while derived views are alive."""
        if self.freed:
            return
        if self._derived_views_alive():
            raise BufferError("cannot release: views derived from the message data are "
                              "still alive; release them first (or leave the with-block "
                              "and the memory is freed when the last one goes)")
        if self._view is not None:
            self._view.release()     # ours alone: drops our single export
            self._view = None
        self.closing = True
        if self.exports == 0:
            self._free()

    cdef bint _derived_views_alive(self):
        """Is anything but our own cached memoryview using our memory?

        Slices and casts of a memoryview share its managed buffer (they do not
        export from us again), so the managed buffer's own count of registered
        memoryviews is what tells whether users still hold one."""
        cdef PyMemoryViewObject *mv
        if self._view is None:
            return self.exports > 0
        mv = <PyMemoryViewObject *>self._view
        if mv.mbuf == NULL:
            # The collector cleared our cached view (memory_clear drops its
            # managed buffer): only our own export count is left to tell.
            return self.exports > 1
        return self.exports > 1 or mv.exports > 0 or mv.mbuf.exports > 1


@cython.no_gc_clear
cdef class Reservation(_Exporter):
    """Writable space in one block; commit() publishes it (see the contract)."""
    cdef uint32_t block
    cdef int state        # 0 open, 1 committed, 2 aborted
    cdef object timeout   # reserve()'s timeout also bounds commit()'s wait for a slot

    @staticmethod
    cdef Reservation _new(Ring ring, uint32_t block, Py_ssize_t nbytes, object timeout):
        cdef Reservation self = Reservation.__new__(Reservation)
        self.timeout = timeout
        self.block = block
        self._attach(ring, fmq_pool_ptr(ring.r, block), nbytes, False)
        return self

    cdef void _give_back(self):
        fmq_pool_release_writer(self.ring.r, self.block)   # our share; the ring has its own

    def commit(self, length=None):
        """Publish the first ``length`` bytes. Waits for a free slot at most the
        timeout given to reserve(); on Full the reservation stays open (commit
        again, or abort)."""
        cdef Py_ssize_t n = self.size if length is None else length
        cdef fmq_msg m
        cdef int rc
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(self.timeout, &nonblock)
        self._check_open()
        if n < 0 or n > self.size:
            raise ValueError("length must be between 0 and %d" % self.size)
        self.ring._enter()
        try:
            self.ring._claim_slot(&m, nonblock, deadline)
            # keep_writer: our views may still be alive; our share of the
            # block is dropped when the last one goes (_free).
            rc = fmq_ring_commit(self.ring.r, &m, <uint32_t>n, self.block, 1, 1)
            if rc != FMQ_OK:
                _raise(rc)
            self.state = 1
            self.ring._sync()
        finally:
            self.ring._leave()
        self.close()

    def abort(self):
        self._check_open()
        self.state = 2
        self.close()

    cdef int _check_open(self) except -1:
        if self._inherited():
            raise ValueError("this reservation was inherited through fork(): only the "
                             "process that reserved it can commit or abort it (reserve "
                             "in this process instead)")
        if self.state != 0:
            raise ValueError("reservation already %s" %
                             ("committed" if self.state == 1 else "aborted"))
        return 0



@cython.no_gc_clear
cdef class ReceivedView(_Exporter):
    """What ``Ring.recv`` returns: a received message (already consumed)
    whose bytes stay in place (see the ring contract). Not a lease: nothing
    is acked; the object only keeps the bytes alive."""
    cdef uint32_t block
    cdef bytes _copy
    cdef readonly uint32_t deliveries

    @staticmethod
    cdef ReceivedView _new_copy(Ring ring, bytes data):
        cdef ReceivedView self = ReceivedView.__new__(ReceivedView)
        self.block = FMQ_NO_BLOCK
        self._copy = data
        self._attach(ring, <unsigned char *>PyBytes_AS_STRING(data), len(data), True)
        return self

    @staticmethod
    cdef ReceivedView _new_block(Ring ring, fmq_msg *m):
        cdef int rc = fmq_ring_detach(ring.r, m, 1)   # slot free now; block is ours
        if rc != FMQ_OK:
            _raise(rc)
        cdef ReceivedView self = ReceivedView.__new__(ReceivedView)
        self.block = m.block
        self.deliveries = m.deliveries
        self._attach(ring, m.data, m.len, True)
        return self

    cdef void _give_back(self):
        # C fields only: this may run from _Exporter.__dealloc__, after our
        # object fields (_copy) were cleared.
        if self.block != FMQ_NO_BLOCK:
            fmq_pool_release_reader(self.ring.r, self.block)




def list_segments():
    """Names of native fastmq segments under /dev/shm."""
    out = []
    try:
        names = _os.listdir("/dev/shm")
    except OSError:
        return out
    for n in sorted(names):
        if not n.startswith("fastmq-"):
            continue
        try:
            with open("/dev/shm/" + n, "rb") as f:
                if f.read(8) == b"FASTMQ\x01N":
                    out.append(n)
        except OSError:
            pass
    return out
