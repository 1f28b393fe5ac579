# Part of fastmq._core (Ring: one handle on a queue segment (put/get, waits, lifetime, inspection)).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.ref cimport Py_INCREF


cdef extern from "Python.h":
    # kwnames: a tuple of keyword names, or NULL for none
    object PyObject_Vectorcall(object callable, PyObject **args, size_t nargsf, PyObject *kwnames)
    bint PyCFunction_CheckExact(object op)
    int PyCFunction_GET_FLAGS(object func)
    PyObject *PyCFunction_GET_SELF(object func)
    void *PyCFunction_GET_FUNCTION(object func)
    enum:
        METH_VARARGS
        METH_KEYWORDS
        METH_NOARGS
        METH_O
        METH_FASTCALL
        METH_METHOD

# A builtin function's C entry point (METH_FASTCALL | METH_KEYWORDS):
# (its self, the arguments then the keywords' values, positional count,
# kwnames). NULL with an exception set on failure.
ctypedef object (*_fastcall_kw)(PyObject *self, PyObject **args, Py_ssize_t nargs,
                                PyObject *kwnames)

cdef extern from "fmq_internal.h" nogil:
    uint32_t fmq_crc32c(uint32_t seed, const void *data, size_t n)
    int fmq_crc_force_portable(int portable)


def _crc32c(data, bint portable=False):
    """Tests: the CRC-32C of ``data`` (bytes) that durable records carry, by
    the CPU's instruction where it has one, or by the tables (``portable``).
    A file written on one machine is read on another: both must agree."""
    cdef const unsigned char[::1] view = data
    cdef bint was = fmq_crc_force_portable(portable) != 0
    try:
        return fmq_crc32c(0, &view[0] if view.shape[0] else NULL, <size_t>view.shape[0])
    finally:
        fmq_crc_force_portable(was)


def _selftest_ticket_lap(uint64_t n_all, uint64_t n_random, uint64_t seed):
    """Tests: the ring's lap arithmetic (a multiply by a reciprocal) against
    division, over slot counts 1..n_all and n_random more -> (ok, report)."""
    cdef char report[256]
    cdef int rc
    with nogil:
        rc = fmq_selftest_ticket_lap(n_all, n_random, seed, report, sizeof(report))
    return rc == FMQ_OK, report.decode("utf-8", "replace")


def _crc_path():
    """``"sse4.2"`` if record checksums use the CPU's crc32 instruction,
    else ``"tables"``."""
    cdef bint was = fmq_crc_force_portable(False) != 0
    fmq_crc_force_portable(was)
    return "tables" if was else "sse4.2"

# ======================================================================== #
# Ring                                                                     #
# ======================================================================== #

# ---- the Queue's hot methods, compiled ----------------------------------- #
#
# ``Ring.put_bytes``/``get_bytes``/``put_many_bytes``/``get_many_bytes`` and
# ``put_object``/``get_object``/``put_many_objects``/``get_many_objects`` take
# the arguments of the ``fastmq.Queue`` methods of the same name (``put`` and
# so on for the objects) and behave exactly as they do for a handle without an
# authkey and, for objects, without a custom serializer: ``queue.py`` binds
# them onto such a handle, so that ``q.put_bytes(b)`` is one C call with no
# Python frame in between. They check their arguments as the layer does
# (``_call_timeout`` is ``queue._timeout``; ``_call_max_messages`` is its
# ``_check_int`` of ``max_messages``), and objects go through the layer's
# codec (``fastmq._serialize``): the plain pickle of an object without
# out-of-band buffers is made and read here, and everything else (frames of
# numpy arrays, zero-copy reads, malformed messages) is handed to
# ``_serialize``'s own functions, so the framing lives in one place.
# These and the ring's own put/get methods are ``binding(False)``: a plain
# C method (a builtin bound to the ring) is called without the extra layer of
# a bound Python-level function object, about 80 instructions a call.

cdef object _call_timeout(object block, object timeout):
    """queue._timeout: None (forever), 0 (one non-blocking try) or seconds > 0;
    a bool or a non-number is a TypeError and NaN a ValueError, with the
    layer's messages. (The result goes to ``_deadline``.)"""
    if not block:
        return 0
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("'timeout' must be a number or None, not %s" % type(timeout).__name__)
    if timeout > 0:
        return None if timeout >= 1e10 else timeout       # queue.FOREVER_SECONDS
    if timeout != timeout:
        raise ValueError("'timeout' must be a number of seconds or None, not NaN")
    return 0


cdef inline uint64_t _call_deadline(object block, object timeout,
                                    bint *nonblock) except? 1:
    """_deadline(_call_timeout(block, timeout)), the defaults without a call."""
    if timeout is None and block is True:
        nonblock[0] = False
        return 0
    return _deadline(_call_timeout(block, timeout), nonblock)


cdef int _call_max_messages(object value) except -1:
    """queue._check_int("max_messages", value, 1, 1 << 30), same messages."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("max_messages must be an int, not %s" % type(value).__name__)
    if not 1 <= value <= (1 << 30):
        raise ValueError("max_messages must be an int in [1, %d], got %s" % (1 << 30, value))
    return 0


# The layer's codec, looked up on first use: fastmq._serialize imports
# fastmq._auth, which imports this module, so it cannot be imported here at
# import time.
cdef object _ser = None              # the fastmq._serialize module
cdef object _ser_dumps = None        # pickle.dumps
cdef object _ser_loads = None        # pickle.loads
cdef object _ser_protocol = None     # 5
cdef object _ser_no_buffers = None   # types whose objects hold no out-of-band buffers
cdef object _ser_refuse = None       # the buffer_callback that aborts a plain pickle ...
cdef object _ser_has_buffers = None  # ... by raising this
cdef object _ser_unpickle_errors = None
cdef object _ser_kwnames = ("buffer_callback",)
# _serialize._NO_BUFFERS as a table of type pointers: one compare each.
cdef PyTypeObject *_ser_plain_types[16]
cdef Py_ssize_t _ser_n_plain = -1          # -1: use the set itself (more than 16)
# pickle.dumps/loads called at their C entry points (_direct_entry): what the
# interpreter's own call of a builtin does, without the generic call path
# (PyObject_Vectorcall, the function type's trampoline and its result check:
# ~140 instructions a call). NULL: call the object (not C's _pickle, or not
# a fast-call builtin).
cdef _fastcall_kw _ser_dumps_c = NULL
cdef PyObject *_ser_dumps_self = NULL      # borrowed: _ser_dumps keeps it alive
cdef _fastcall_kw _ser_loads_c = NULL
cdef PyObject *_ser_loads_self = NULL      # borrowed: _ser_loads keeps it alive


cdef _fastcall_kw _direct_entry(object func, PyObject **self_out):
    """The C function behind ``func`` if it is a builtin taking
    (self, args, nargs, kwnames) -- METH_FASTCALL | METH_KEYWORDS and no
    other calling convention -- else NULL."""
    cdef int conv = METH_VARARGS | METH_KEYWORDS | METH_NOARGS | METH_O | METH_FASTCALL | METH_METHOD
    if not PyCFunction_CheckExact(func):
        return NULL
    if (PyCFunction_GET_FLAGS(func) & conv) != (METH_FASTCALL | METH_KEYWORDS):
        return NULL
    self_out[0] = PyCFunction_GET_SELF(func)
    return <_fastcall_kw><void *>PyCFunction_GET_FUNCTION(func)


cdef int _load_codec() except -1:
    global _ser, _ser_dumps, _ser_loads, _ser_protocol, _ser_no_buffers, _ser_refuse
    global _ser_has_buffers, _ser_unpickle_errors, _ser_n_plain
    global _ser_dumps_c, _ser_dumps_self, _ser_loads_c, _ser_loads_self
    from fastmq import _serialize
    _ser_dumps = _serialize._pickle_dumps
    _ser_loads = _serialize._pickle_loads
    _ser_dumps_c = _direct_entry(_ser_dumps, &_ser_dumps_self)
    _ser_loads_c = _direct_entry(_ser_loads, &_ser_loads_self)
    _ser_protocol = _serialize.PROTOCOL
    _ser_no_buffers = _serialize._NO_BUFFERS
    _ser_refuse = _serialize._refuse_buffers
    _ser_has_buffers = _serialize._HasBuffers
    _ser_unpickle_errors = _serialize._UNPICKLE_ERRORS
    _ser_n_plain = -1
    if len(_ser_no_buffers) <= 16:
        for i, t in enumerate(_ser_no_buffers):
            _ser_plain_types[i] = <PyTypeObject *>t  # types live as long as the set
        _ser_n_plain = len(_ser_no_buffers)
    _ser = _serialize
    return 0


cdef inline bint _no_buffers(object obj) except -1:
    """type(obj) in _serialize._NO_BUFFERS"""
    cdef Py_ssize_t i
    cdef PyTypeObject *t = Py_TYPE(obj)
    if _ser_n_plain < 0:
        return type(obj) in _ser_no_buffers
    for i in range(_ser_n_plain):
        if _ser_plain_types[i] == t:
            return True
    return False


# Exact types whose plain pickling last met an out-of-band buffer (numpy
# arrays, typically): _plain_pickle answers None for them at once, so such an
# object is pickled once (by the framing path, which handles any object) and
# not first into an aborted plain pickle (for a small array, about 40% of a
# put). Each entry is trusted for _BUF_TYPE_SKIPS puts and then probed again,
# so a type whose objects seldom carry buffers does not stay on the slower
# framing path. Builtin containers are never listed (a dict holds an array
# now and then; most dicts hold none). The list keeps the types alive, so a
# pointer in the table never names a freed (and reused) type.
cdef enum:
    _BUF_TYPES = 8
    _BUF_TYPE_SKIPS = 64
cdef PyTypeObject *_buf_types[_BUF_TYPES]
cdef int _buf_skips[_BUF_TYPES]
cdef list _buf_type_refs = [None] * _BUF_TYPES
cdef int _buf_used = 0                     # entries ever filled (0: skip the lookup)
cdef int _buf_next = 0                     # the entry the next type replaces


cdef inline bint _known_buffer_type(PyTypeObject *t) noexcept:
    """t is listed and trusted: spend one of its skips. A listed type whose
    skips are spent is dropped, and this put probes it again."""
    cdef int i
    for i in range(_buf_used):
        if _buf_types[i] == t:
            if _buf_skips[i] > 0:
                _buf_skips[i] -= 1
                return True
            _buf_types[i] = NULL
            return False
    return False


cdef void _remember_buffer_type(object obj):
    global _buf_next, _buf_used
    cdef PyTypeObject *t = Py_TYPE(obj)
    cdef int i
    if type(obj) in (dict, list, tuple, set, frozenset):
        return
    for i in range(_buf_used):
        if _buf_types[i] == t:             # listed, skips spent: trusted again
            _buf_skips[i] = _BUF_TYPE_SKIPS
            return
    i = _buf_next
    _buf_type_refs[i] = type(obj)
    _buf_types[i] = t
    _buf_skips[i] = _BUF_TYPE_SKIPS
    _buf_next = (i + 1) % _BUF_TYPES
    if _buf_used < _BUF_TYPES:
        _buf_used += 1


cdef object _plain_pickle(object obj):
    """_serialize._plain_pickle: the pickle of obj, or None if it has
    out-of-band buffers (or its type is listed as having them: see
    _buf_types; None sends any object down the framing path, which writes a
    plain pickle after all when it meets no buffer)."""
    cdef PyObject *args[3]
    args[0] = <PyObject *>obj
    args[1] = <PyObject *>_ser_protocol
    if _no_buffers(obj):
        if _ser_dumps_c != NULL:
            return _ser_dumps_c(_ser_dumps_self, args, 2, NULL)
        return _ser_dumps(obj, _ser_protocol)
    if _buf_used and _known_buffer_type(Py_TYPE(obj)):
        return None
    # dumps(obj, protocol, buffer_callback=refuse), without a keyword dict.
    args[2] = <PyObject *>_ser_refuse
    try:
        if _ser_dumps_c != NULL:
            return _ser_dumps_c(_ser_dumps_self, args, 2, <PyObject *>_ser_kwnames)
        return PyObject_Vectorcall(_ser_dumps, args, 2, <PyObject *>_ser_kwnames)
    except _ser_has_buffers:
        _remember_buffer_type(obj)
        return None


cdef object _decode_copy(bytes raw):
    """_serialize.decode(raw) of a private copy: a plain pickle is loaded
    here; anything else -- or a pickle that fails to load -- takes
    _serialize.decode, which raises BadMessage carrying the bytes."""
    cdef PyObject *args[1]
    if PyBytes_GET_SIZE(raw) > 0 and (<unsigned char *>PyBytes_AS_STRING(raw))[0] == 0x80:
        args[0] = <PyObject *>raw
        try:
            if _ser_loads_c != NULL:
                return _ser_loads_c(_ser_loads_self, args, 1, NULL)  # loads(raw)
            return PyObject_Vectorcall(_ser_loads, args, 1, NULL)
        except _ser_unpickle_errors:
            pass
    return _ser.decode(raw)


# final: nothing derives from a Ring, so its cdef methods are called directly
# (and the small ones inlined) instead of through a method table
@cython.final
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
    cdef bint _durable            # a file:// queue: puts end in _sync
    cdef readonly object path     # its file, or None (shared memory)
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
        cdef fmq_durable_info info
        self._durable = fmq_durable_info_get(r, &info) == FMQ_OK

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
    def open(cls, str name, *, path=None):
        cdef fmq_region *r = NULL
        cdef bytes bname = _segment_bytes(name)
        cdef const char *cname = bname
        cdef bytes bpath = _path_bytes(path) if path is not None else b""
        cdef const char *cpath = bpath
        cdef bint durable = path is not None
        cdef int rc
        # Without the GIL: open waits (bounded) for another process's lock,
        # and a durable queue's first opener rebuilds it (fmq_durable.c).
        with nogil:
            if durable:
                rc = fmq_durable_open(cpath, cname, &r)
            else:
                rc = fmq_region_open(cname, &r)
        if rc != FMQ_OK:
            _raise(rc)
        cdef Ring self = Ring.__new__(Ring)
        self._bind(r)
        self.path = path
        return self

    @classmethod
    def create_durable(cls, str name, str path, *, maxsize, max_message_size,
                       capacity_bytes, mode=0o600, exist_ok=False, max_deliveries=20,
                       dead_letter="", slot_size=0, sync="commit", sync_interval=1.0):
        """A durable queue kept in the file ``path`` (see fmq_durable.c)."""
        cdef fmq_params p
        cdef fmq_region *r = NULL
        cdef bytes bname = _segment_bytes(name)
        cdef bytes bpath = _path_bytes(path)
        cdef bytes bdead = (dead_letter or "").encode()
        cdef uint32_t smode
        cdef uint64_t interval_ns
        if sync not in _SYNC_MODES:
            raise ValueError("sync must be one of %s, not %r"
                             % (", ".join(repr(k) for k in _SYNC_MODES), sync))
        smode = _SYNC_MODES[sync]
        if isinstance(sync_interval, bool) or not isinstance(sync_interval, (int, float)):
            raise TypeError("sync_interval must be a number of seconds, not %s"
                            % type(sync_interval).__name__)
        if not 0 < sync_interval < 1e6:
            raise ValueError("sync_interval must be > 0 and < 1e6 seconds, got %r"
                             % (sync_interval,))
        interval_ns = <uint64_t>(sync_interval * 1e9)
        for label, v in (("maxsize", maxsize), ("max_message_size", max_message_size),
                         ("capacity_bytes", capacity_bytes), ("max_deliveries", max_deliveries),
                         ("slot_size", slot_size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError("%s must be an int, not %s" % (label, type(v).__name__))
            if v < 0 or v >= 2 ** 32 and label in ("max_deliveries", "slot_size") or v >= 2 ** 63:
                raise ValueError("%s out of range: %r" % (label, v))
        if max_message_size > _MAX_FORMAT_LEN:
            raise ValueError("max_message_size must be between 1 and %d bytes, got %d"
                             % (_MAX_FORMAT_LEN, max_message_size))
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ValueError("mode must be permission bits only (0 to 0o777), got %r" % (mode,))
        cdef unsigned umode = mode
        cdef int eok = 1 if exist_ok else 0
        cdef const char *cname = bname
        cdef const char *cpath = bpath
        p.maxsize = maxsize
        p.max_message_size = max_message_size
        p.capacity_bytes = capacity_bytes
        p.slot_size = slot_size
        p.max_deliveries = max_deliveries
        p.dead_letter = bdead
        cdef int rc
        with nogil:
            rc = fmq_durable_create(cpath, cname, &p, umode, eok, smode, interval_ns, &r)
        if rc != FMQ_OK:
            _raise(rc)
        cdef Ring self = Ring.__new__(Ring)
        self._bind(r)
        self.path = path
        return self

    # ---- durability (file:// queues) -------------------------------------- #

    cdef inline int _sync(self) except -1:
        """After a put (or a batch) committed: what a durable queue's sync
        mode asks. Every put path ends here, and only here; the GIL is
        released only when a flush is due (never for sync="none", nor for
        an "interval" put within the interval)."""
        if self._durable and fmq_durable_sync_due(self.r):
            self._sync_wait()
        return 0

    cdef int _sync_wait(self) except -1:
        cdef int rc
        with nogil:
            rc = fmq_durable_flush(self.r)     # _sync asked fmq_durable_sync_due
        if rc != FMQ_OK:
            _raise(rc)
        return 0

    def flush(self):
        """Everything committed so far onto stable storage (durable queues)."""
        cdef int rc
        self._enter()
        try:
            with nogil:
                rc = fmq_durable_flush(self.r)
            if rc != FMQ_OK:
                _raise(rc)
        finally:
            self._leave()

    def durable_info(self):
        """None for shared memory; else the sync mode and the last recovery's figures."""
        cdef fmq_durable_info info
        self._enter()
        try:
            if fmq_durable_info_get(self.r, &info) != FMQ_OK:
                return None
        finally:
            self._leave()
        return {"sync": _SYNC_NAMES[info.sync_mode], "sync_interval": info.sync_interval_ns / 1e9,
                "generation": info.generation, "rebuilds": info.recoveries,
                "flushes": info.flushes, "recovered_kept": info.kept,
                "recovered_dropped": info.dropped,
                "recovered_dropped_total": info.dropped_total}

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

    cdef inline int _claim(self, fmq_msg *m, bint for_write, bint nonblock,
                           uint64_t deadline) except -1:
        """Claim a slot to write (FULL -> wait for space) or a message to read
        (EMPTY -> wait for data), until the deadline. The first try is inline:
        it is the one that succeeds when the ring is neither full nor empty."""
        cdef int rc = fmq_ring_reserve(self.r, m) if for_write else fmq_ring_claim(self.r, m)
        if rc == FMQ_OK:
            return 0
        return self._claim_again(m, for_write, nonblock, deadline, rc)

    cdef int _claim_again(self, fmq_msg *m, bint for_write, bint nonblock,
                          uint64_t deadline, int rc) except -1:
        """_claim after a first try that returned rc."""
        while True:
            if rc == FMQ_OK:
                return 0
            if rc != (FMQ_FULL if for_write else FMQ_EMPTY):
                _raise(rc)
            if nonblock:
                if for_write:
                    _raise(FMQ_FULL, self._full_msg(0))
                _raise(FMQ_EMPTY)
            self._wait(for_write, deadline, 0)
            rc = fmq_ring_reserve(self.r, m) if for_write else fmq_ring_claim(self.r, m)

    cdef inline int _claim_slot(self, fmq_msg *m, bint nonblock, uint64_t deadline) except -1:
        return self._claim(m, True, nonblock, deadline)

    cdef inline int _claim_run(self, fmq_msg *m, uint64_t *run, bint nonblock,
                               uint64_t deadline) except -1:
        """_claim_slot for one put of a run (``run``: NULL, or where the run's
        next reserve starts, 0 for its first: see fmq_ring_reserve_from)."""
        cdef int rc
        if run == NULL or run[0] == 0:
            return self._claim(m, True, nonblock, deadline)
        rc = fmq_ring_reserve_from(self.r, m, run[0])
        if rc == FMQ_OK:
            return 0
        fmq_ring_advance_tail(self.r, run[0])     # before any wait: the hint catches up
        return self._claim_again(m, True, nonblock, deadline, rc)

    cdef int _put_raw(self, const unsigned char *src, Py_ssize_t n, bint nonblock,
                      uint64_t deadline, int wake, uint64_t *run) except -1:
        """One message in. ``run`` (put_many): reserve past ``run[0]`` and
        commit without waking or counting; ``run[0]`` becomes the ticket past
        this one. The run then counts itself and moves the tail hint once."""
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
                self._claim_run(&m, run, nonblock, deadline)
            except BaseException:
                fmq_pool_release_writer(self.r, block)     # nothing was published
                raise
        else:
            self._claim_run(&m, run, nonblock, deadline)
            memcpy(fmq_ring_inline_ptr(self.r, &m), src, n)
        if run == NULL:
            rc = fmq_ring_commit(self.r, &m, <uint32_t>n, block, wake, 0)
        else:
            rc = fmq_ring_commit_quiet(self.r, &m, <uint32_t>n, block)
        if rc != FMQ_OK:
            if block != FMQ_NO_BLOCK:
                fmq_pool_release_writer(self.r, block)
            _raise(rc)
        if run != NULL:
            run[0] = m.ticket + 1
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

    cdef int _put_one(self, object data, bint nonblock, uint64_t deadline) except -1:
        cdef Py_buffer view
        self._enter()
        try:
            if type(data) is bytes:
                # Immutable, and referenced by the caller for the whole call:
                # its bytes can be read without the buffer protocol.
                self._check_size(PyBytes_GET_SIZE(data))
                self._put_raw(<const unsigned char *>PyBytes_AS_STRING(data),
                              PyBytes_GET_SIZE(data), nonblock, deadline, 1, NULL)
            else:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                try:
                    self._check_size(view.len)
                    self._put_raw(<const unsigned char *>view.buf, view.len, nonblock,
                                  deadline, 1, NULL)
                finally:
                    PyBuffer_Release(&view)
            # A durable queue's put returns once its sync mode is met, on
            # every path (fmq_durable.c).
            self._sync()
        finally:
            self._leave()
        return 0

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put(self, data, timeout=None):
        """Enqueue one bytes-like object (copied once into shared memory)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        self._put_one(data, nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_bytes(self, data, block=True, timeout=None):
        """``Queue.put_bytes``, compiled (see "the Queue's hot methods")."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        self._put_one(data, nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_object(self, obj, block=True, timeout=None):
        """``Queue.put`` with the default codec, compiled (see "the Queue's
        hot methods"): the plain pickle of a buffer-less object is made here;
        one with out-of-band buffers goes to ``_serialize.put_with_buffers``."""
        cdef bint nonblock
        cdef uint64_t deadline
        if timeout is not None or block is not True:
            timeout = _call_timeout(block, timeout)
        if _ser is None:
            _load_codec()
        data = _plain_pickle(obj)
        if data is None:
            _ser.put_with_buffers(self, obj, timeout)
            return
        deadline = _deadline(timeout, &nonblock)      # after pickling, as the layer
        self._put_one(data, nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_many(self, items, timeout=None, atomic=False):
        """Enqueue in order; returns how many went in (see the ring contract).
        ``atomic``: all of them as one batch record, or none (``_put_batch``)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        if atomic:
            return self._put_batch(items if type(items) is tuple else tuple(items),
                                   nonblock, deadline)
        return self._put_many(items if type(items) is tuple else tuple(items),
                              nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_many_bytes(self, items, block=True, timeout=None, *, atomic=False):
        """``Queue.put_many_bytes``, compiled (see "the Queue's hot methods")."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        if atomic:
            return self._put_batch(items if type(items) is tuple else tuple(items),
                                   nonblock, deadline)
        return self._put_many(items if type(items) is tuple else tuple(items),
                              nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_many_objects(self, iterable, block=True, timeout=None, *, atomic=False):
        """``Queue.put_many`` with the default codec, compiled (see "the
        Queue's hot methods"): every object is encoded, then every size is
        checked (nothing is sent if one is too big), then the batch goes in."""
        cdef bint nonblock
        cdef uint64_t deadline
        cdef list payloads = []
        cdef Py_buffer view
        timeout = _call_timeout(block, timeout)
        if _ser is None:
            _load_codec()
        for obj in iterable:
            data = _plain_pickle(obj)
            payloads.append(_ser.encode(obj) if data is None else data)
        for data in payloads:
            if type(data) is bytes:
                n = PyBytes_GET_SIZE(data)
            else:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                n = view.len
                PyBuffer_Release(&view)
            if n > self._max_msg:
                raise MessageTooLarge(
                    "message of %d bytes exceeds this queue's max_message_size of %d bytes; "
                    "nothing was sent" % (n, self._max_msg))
        deadline = _deadline(timeout, &nonblock)
        if atomic:
            return self._put_batch(tuple(payloads), nonblock, deadline)
        return self._put_many(tuple(payloads), nonblock, deadline)

    cdef Py_ssize_t _put_many(self, tuple items, bint nonblock, uint64_t deadline) except -1:
        """put_many of bytes-like items. A tuple: the batch is what the caller
        passed when it called, whatever another thread does to its list while
        this call waits for room (the GIL is released then)."""
        cdef Py_buffer view
        cdef Py_ssize_t i, n, size, done = 0
        cdef const unsigned char *src
        cdef bint viewed
        cdef uint64_t run = 0, nbytes = 0
        cdef fmq_msg m
        cdef int rc
        n = len(items)
        self._enter()
        try:
            # Every size is checked before anything is written: a batch with
            # one oversize item is rejected whole, not half-sent.
            for i in range(n):
                item = items[i]
                if type(item) is bytes:
                    if PyBytes_GET_SIZE(item) > self._max_msg:   # (never above _MAX_FORMAT_LEN)
                        self._check_size(PyBytes_GET_SIZE(item))
                    continue
                PyObject_GetBuffer(item, &view, PyBUF_SIMPLE)
                try:
                    self._check_size(view.len)
                finally:
                    PyBuffer_Release(&view)
            for i in range(n):
                item = items[i]
                viewed = type(item) is not bytes
                if not viewed and run != 0 and PyBytes_GET_SIZE(item) <= <Py_ssize_t>self._inline_max:
                    # The common case, in line: a small bytes message into a
                    # run already started takes the run's next slot (what
                    # _put_raw does for it, without its call and handlers).
                    # A slot that is not free goes the general way below,
                    # which waits for room.
                    size = PyBytes_GET_SIZE(item)
                    if fmq_ring_reserve_from(self.r, &m, run) == FMQ_OK:
                        memcpy(fmq_ring_inline_ptr(self.r, &m), PyBytes_AS_STRING(item), size)
                        rc = fmq_ring_commit_quiet(self.r, &m, <uint32_t>size, FMQ_NO_BLOCK)
                        if rc != FMQ_OK:
                            _raise(rc)
                        run = m.ticket + 1
                        done += 1
                        nbytes += <uint64_t>size
                        continue
                if viewed:
                    PyObject_GetBuffer(item, &view, PyBUF_SIMPLE)
                    src, size = <const unsigned char *>view.buf, view.len
                else:
                    # Immutable, and held by the tuple: no buffer protocol needed.
                    src = <const unsigned char *>PyBytes_AS_STRING(item)
                    size = PyBytes_GET_SIZE(item)
                try:
                    try:
                        # First try without blocking; before any wait, wake the
                        # consumers of what is already in, or they may sleep
                        # while we wait for them to make room.
                        self._put_raw(src, size, True, 0, 0, &run)
                    except Full:
                        fmq_ring_wake_consumers(self.r, 1)
                        if nonblock:
                            break
                        try:
                            self._put_raw(src, size, False, deadline, 0, &run)
                        except Full:
                            break
                finally:
                    if viewed:
                        PyBuffer_Release(&view)
                done += 1
                nbytes += <uint64_t>size
        finally:
            if self.r != NULL and done:
                # the run's statistics and tail hint, once (fmq_ring_reserve_from)
                fmq_ring_count_put(self.r, <uint64_t>done, nbytes)
                fmq_ring_advance_tail(self.r, run)
                fmq_ring_wake_consumers(self.r, 1)
                try:
                    self._sync()        # one flush for the whole batch
                finally:
                    self._leave()
            else:
                self._leave()
        return done

    cdef Py_ssize_t _put_batch(self, items, bint nonblock, uint64_t deadline) except -1:
        """All of ``items`` as ONE ring record (fmq_layout.h: a count, then a
        length and the bytes of each message), published by one commit CAS:
        consumers see the whole batch or nothing of it, whatever process is
        killed where. Refused before anything is written when it can never
        fit: more messages than maxsize (ValueError), or a framed size over
        max_message_size (MessageTooLarge: the record is one message's room).
        Admitted when the ring has room for all its messages (a batch counts
        its size toward maxsize, as it goes in), then takes one slot."""
        cdef Py_buffer view
        cdef Py_ssize_t i, n = len(items), total = 8
        cdef uint32_t block = FMQ_NO_BLOCK
        cdef unsigned char *base
        cdef fmq_msg m
        cdef int rc
        cdef uint64_t count
        if n == 0:
            return 0
        # Immutable copies of anything that is not bytes already: the sizes
        # checked are the sizes framed, even if another thread resizes a
        # bytearray while we wait for room with the GIL released.
        items = [x if type(x) is bytes else bytes(memoryview(x)) for x in items]
        self._enter()
        try:
            for i in range(n):
                PyObject_GetBuffer(items[i], &view, PyBUF_SIMPLE)
                try:
                    self._check_size(view.len)
                    total += 4 + view.len
                finally:
                    PyBuffer_Release(&view)
            if <uint64_t>n > self.maxsize:
                raise ValueError(
                    "an atomic batch of %d messages can never fit in this queue (maxsize %d); "
                    "split it or create the queue with a larger maxsize" % (n, self.maxsize))
            if n > 0xFFFFFF:
                raise ValueError("an atomic batch holds at most %d messages, got %d"
                                 % (0xFFFFFF, n))
            if total > self._max_msg or total > <Py_ssize_t>_MAX_FORMAT_LEN:
                raise MessageTooLarge(
                    "an atomic batch is stored as one record: its %d messages take %d bytes "
                    "framed (4 bytes per message plus 8), more than this queue's "
                    "max_message_size of %d bytes (create the queue with a larger "
                    "max_message_size, or send a smaller batch)" % (n, total, self._max_msg))
            count = <uint64_t>n
            # Admission: room for all of its messages, as if each took a slot.
            while fmq_ring_queued(self.r) + count > self.maxsize:
                fmq_ring_wake_consumers(self.r, 1)
                if nonblock:
                    _raise(FMQ_FULL, "queue is full: no room for an atomic batch of %d "
                                     "messages (maxsize %d)" % (n, self.maxsize))
                with nogil:
                    rc = fmq_ring_wait_room(self.r, deadline, count)
                if rc == FMQ_TIMEDOUT:
                    _raise(FMQ_FULL, "queue is full: no room for an atomic batch of %d "
                                     "messages in time (maxsize %d)" % (n, self.maxsize))
                if rc == FMQ_AGAIN or rc == FMQ_EINTR:
                    _check_wait(self._closed)
            if total > <Py_ssize_t>self._inline_max:
                self._alloc_block(total, nonblock, deadline, &block)
                base = fmq_pool_ptr(self.r, block)
                try:
                    self._frame_batch(items, base)
                    self._claim_slot(&m, nonblock, deadline)
                except BaseException:
                    fmq_pool_release_writer(self.r, block)     # nothing was published
                    raise
            else:
                self._claim_slot(&m, nonblock, deadline)
                # Copying into the slot cannot fail (every item was a buffer
                # of the size checked above, and we hold the slot): a process
                # killed meanwhile leaves a WRITING slot, which recovery skips.
                self._frame_batch(items, fmq_ring_inline_ptr(self.r, &m))
            rc = fmq_ring_commit_batch(self.r, &m, <uint32_t>total, block, <uint32_t>n)
            if rc != FMQ_OK:
                if block != FMQ_NO_BLOCK:
                    fmq_pool_release_writer(self.r, block)
                _raise(rc)
            self._sync()            # the whole batch on disk in one flush
        finally:
            self._leave()
        return n

    cdef int _frame_batch(self, items, unsigned char *dst) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t i, n = len(items)
        cdef uint32_t ln = <uint32_t>n, zero = 0
        memcpy(dst, &ln, 4)
        memcpy(dst + 4, &zero, 4)
        dst += 8
        for i in range(n):
            PyObject_GetBuffer(items[i], &view, PyBUF_SIMPLE)
            try:
                ln = <uint32_t>view.len
                memcpy(dst, &ln, 4)
                memcpy(dst + 4, view.buf, view.len)
                dst += 4 + view.len
            finally:
                PyBuffer_Release(&view)
        return 0

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
        if m.flags:
            return self._take_batch_one(m)
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

    cdef bytes _take_batch_one(self, fmq_msg *m):
        """The message at the cursor of a claimed atomic batch: copied out,
        then handed over by moving the cursor past it (the rest of the batch
        stays queued, in order, for whoever claims it next) or, if it is the
        last one, by freeing the record as for any message."""
        cdef const unsigned char *data
        cdef uint32_t n, count
        cdef uint64_t nxt
        cdef bytes out
        cdef int rc = fmq_ring_batch_frame(self.r, m, m.cursor, &data, &n, &count, &nxt)
        if rc != FMQ_OK:
            _raise(fmq_ring_discard_claimed(self.r, m))
        try:
            out = PyBytes_FromStringAndSize(<const char *>data, n)
        except BaseException:
            fmq_ring_unclaim(self.r, m)           # the message stays queued
            raise
        if fmq_ring_batch_index(nxt) == count:
            rc = fmq_ring_batch_release(self.r, m, 1)
        else:
            rc = fmq_ring_batch_advance(self.r, m, nxt, 1)
        if rc != FMQ_OK:
            _raise(rc)
        return out

    cdef list _get_batch(self, fmq_msg *m, Py_ssize_t max_messages, decode, bint codec):
        """get_many's take of a claimed atomic batch: its messages from the
        cursor, up to max_messages (all of it when it fits: taken whole),
        handed over together by one cursor move (or the release of the
        record). A decode failure hands over only the ones before it, as for
        plain messages: the bad one is consumed if it comes first."""
        cdef const unsigned char *data
        cdef uint32_t n, count = 0
        cdef uint64_t pos = m.cursor, nxt
        cdef Py_ssize_t taken = 0, bad = -1
        cdef list out = [], ends = []
        cdef int rc
        try:
            while taken < max_messages:
                rc = fmq_ring_batch_frame(self.r, m, pos, &data, &n, &count, &nxt)
                if rc != FMQ_OK:
                    if taken:
                        break                  # the next call meets it and discards it
                    _raise(fmq_ring_discard_claimed(self.r, m))
                raw = PyBytes_FromStringAndSize(<const char *>data, n)
                if decode is None and not codec:
                    out.append(raw)
                else:
                    bad = taken
                    out.append(_decode_copy(raw) if codec else decode(raw))
                    bad = -1
                pos = nxt
                ends.append(nxt)
                taken += 1
                if fmq_ring_batch_index(nxt) == count:
                    break
        except BaseException as exc:
            if bad >= 0 and not isinstance(exc, Exception):
                bad = -1                       # Ctrl-C while decoding: not a bad message
            if bad > 0:
                out = out[:bad]                # return what decoded; the rest stays
                taken = bad
                pos = ends[bad - 1]
            elif bad == 0:
                # the undecodable one is consumed and its error propagates
                rc = fmq_ring_batch_frame(self.r, m, m.cursor, &data, &n, &count, &nxt)
                if rc == FMQ_OK and fmq_ring_batch_index(nxt) == count:
                    fmq_ring_batch_release(self.r, m, 1)
                elif rc == FMQ_OK:
                    fmq_ring_batch_advance(self.r, m, nxt, 1)
                else:
                    fmq_ring_discard_claimed(self.r, m)
                raise
            else:
                if not m.detached:
                    fmq_ring_unclaim(self.r, m)     # not a decode error: all back
                raise
        if fmq_ring_batch_index(pos) == count:
            rc = fmq_ring_batch_release(self.r, m, <uint32_t>taken)
        else:
            rc = fmq_ring_batch_advance(self.r, m, pos, <uint32_t>taken)
        if rc != FMQ_OK:
            _raise(rc)
        return out

    cdef bytes _get_one(self, bint nonblock, uint64_t deadline):
        cdef fmq_msg m
        self._enter()
        try:
            self._claim_msg(&m, nonblock, deadline)
            return self._take_bytes(&m, 1)
        finally:
            self._leave()

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get(self, timeout=None):
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        return self._get_one(nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_bytes(self, block=True, timeout=None):
        """``Queue.get_bytes``, compiled (see "the Queue's hot methods")."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        return self._get_one(nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_object(self, block=True, timeout=None, *, zero_copy=False):
        """``Queue.get`` with the default codec, compiled (see "the Queue's
        hot methods"). A plain pickle is loaded here; other messages, and
        ``zero_copy=True`` reads, go through ``_serialize.decode``."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        if _ser is None:
            _load_codec()
        if not zero_copy:
            return _decode_copy(self._get_one(nonblock, deadline))
        lease = self._recv(nonblock, deadline)
        try:
            return _ser.decode(lease.view, zero_copy=True)
        finally:
            lease.close()            # deferred while the arrays view it

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_many(self, Py_ssize_t max_messages, timeout=None, decode=None):
        """At least one message (waiting up to timeout), at most max_messages
        (see ``_get_many``)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        return self._get_many(max_messages, nonblock, deadline, decode, False)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_many_bytes(self, max_messages=1024, block=True, timeout=None):
        """``Queue.get_many_bytes``, compiled (see "the Queue's hot methods");
        the default is queue.DEFAULT_GET_MANY."""
        cdef bint nonblock
        cdef uint64_t deadline
        _call_max_messages(max_messages)
        deadline = _call_deadline(block, timeout, &nonblock)
        return self._get_many(max_messages, nonblock, deadline, None, False)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_many_objects(self, max_messages=1024, block=True, timeout=None):
        """``Queue.get_many`` with the default codec, compiled (see "the
        Queue's hot methods"); the default is queue.DEFAULT_GET_MANY."""
        cdef bint nonblock
        cdef uint64_t deadline
        _call_max_messages(max_messages)
        deadline = _call_deadline(block, timeout, &nonblock)
        if _ser is None:
            _load_codec()
        return self._get_many(max_messages, nonblock, deadline, None, True)

    cdef list _get_many(self, Py_ssize_t max_messages, bint nonblock, uint64_t deadline,
                        object decode, bint codec):
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

        ``codec``: decode with the layer's default codec (``_decode_copy``)
        instead of ``decode``.
        """
        cdef fmq_msg *msgs
        cdef fmq_msg *grown
        cdef Py_ssize_t k = 0, i, j, bad = -1, keep
        cdef uint64_t released = 0, released_bytes = 0
        cdef list out = []
        cdef bytes raw
        cdef int rc
        cdef bint decoding = codec or decode is not None
        # The claim array grows with what is actually claimed: sizing it by
        # max_messages up front would allocate gigabytes for a call that
        # finds three messages (max_messages may be up to 2**30). It starts
        # at what the ring holds now (a hint, at most 4096 entries), so that a
        # batch that finds its messages waiting is claimed without regrowing.
        cdef Py_ssize_t cap
        self._enter()
        cap = <Py_ssize_t>min(fmq_ring_queued(self.r), <uint64_t>4096)
        cap = min(max(cap, 64), max_messages)
        msgs = <fmq_msg *>PyMem_Malloc(cap * sizeof(fmq_msg))
        if msgs == NULL:
            self._leave()
            raise MemoryError()
        try:
            self._claim_msg(&msgs[0], nonblock, deadline)
            if msgs[0].flags:
                # An atomic batch: taken on its own, whole if it fits.
                out = self._get_batch(&msgs[0], max_messages, decode, codec)
                k = len(out)
                return out
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
                if rc == FMQ_OK and msgs[k].flags:
                    # An atomic batch is left for the next call, which takes
                    # it whole (it stays in place: the head never passed it).
                    fmq_ring_unclaim(self.r, &msgs[k])
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
                if not decoding:
                    # k is known: the list is made at its size (no regrowing);
                    # a copy that fails leaves the rest NULL, which a list allows
                    out = PyList_New(k)
                    for i in range(k):
                        raw = PyBytes_FromStringAndSize(<char *>msgs[i].data, msgs[i].len)
                        Py_INCREF(raw)                  # the list takes this reference
                        PyList_SET_ITEM(out, i, raw)
                else:
                    for i in range(k):
                        raw = PyBytes_FromStringAndSize(<char *>msgs[i].data, msgs[i].len)
                        bad = i
                        out.append(_decode_copy(raw) if codec else decode(raw))
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
                rc = fmq_ring_release_quiet(self.r, &msgs[i])
                if rc == FMQ_OK:
                    released += 1
                    released_bytes += msgs[i].len
                else:
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
            if self.r != NULL and released:
                # the run's statistics and head hint, once (fmq_ring_release_quiet)
                fmq_ring_finish_get(self.r, released, released_bytes)
            if self.r != NULL and k:
                fmq_ring_wake_producers(self.r)
            self._leave()
        return out[:k] if decoding and len(out) != k else out

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def recv(self, timeout=None):
        """Receive one message without copying it out (large ones) -> ReceivedView."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        return self._recv(nonblock, deadline)

    cdef object _recv(self, bint nonblock, uint64_t deadline):
        cdef fmq_msg m
        self._enter()
        try:
            self._claim_msg(&m, nonblock, deadline)
            if m.block == FMQ_NO_BLOCK or m.flags:
                # (A message of an atomic batch is copied out too: the batch's
                # block stays the ring's until its last message is taken.)
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
                         "dead_letter": buf[i].dead_letter != 0,
                         "expires_in": None if buf[i].dead_letter else
                         (<double>buf[i].deadline_ns - <double>now) / 1e9}
                        for i in range(n)]
            finally:
                PyMem_Free(buf)
        finally:
            self._leave()

    # ---- state ---------------------------------------------------------- #

    def qsize(self):
        self._enter()
        try:
            return fmq_ring_queued(self.r)
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
