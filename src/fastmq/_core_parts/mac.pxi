# Part of fastmq._core (Mac: keyed BLAKE2b for authkey=).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

# ======================================================================== #
# Mac: keyed BLAKE2b for authkey= (see fastmq/_auth.py, csrc/fmq_mac.c)      #
# ======================================================================== #

cdef extern from "fmq_mac.h" nogil:
    ctypedef struct fmq_mac_state:
        size_t buflen
    int fmq_mac_init(fmq_mac_state *s, const unsigned char *key, size_t keylen,
                     size_t outlen)
    void fmq_mac_absorb_key(fmq_mac_state *s)
    void fmq_mac_update(fmq_mac_state *s, const unsigned char *data, size_t len)
    void fmq_mac_final(fmq_mac_state *s, unsigned char *out)
    int fmq_mac_path()
    int fmq_mac_select(int path)
    void fmq_mac_oneshot(const fmq_mac_state *keyed, const unsigned char *data, size_t len,
                         unsigned char *out)

from cpython.bytes cimport PyBytes_GET_SIZE
from libc.string cimport memcmp

from fastmq.errors import AuthenticationError

cdef enum:
    _MAC_MAGIC_LEN = 4
    _MAC_TAG = 16
    _MAC_OVERHEAD = _MAC_MAGIC_LEN + _MAC_TAG
    _MAC_NOGIL = 65536


_MAC_PATHS = ("portable", "avx2", "avx512")


def _mac_select(path=None):
    """Tests and benchmarks: compress with ``path`` ("portable", "avx2" or
    "avx512") from now on, or with the CPU's best again (None). Returns
    the name of the one in use before; ValueError if this CPU (or build)
    cannot run ``path``."""
    if path is not None and path not in _MAC_PATHS:
        raise ValueError("no %r compression: choose one of %s, or None"
                         % (path, ", ".join(_MAC_PATHS)))
    cdef int want = -1 if path is None else _MAC_PATHS.index(path)
    cdef int was = fmq_mac_select(want)
    if was < 0:
        raise ValueError("this CPU (or build) cannot run the %s compression" % path)
    return _MAC_PATHS[was]


def _mac_time(Py_ssize_t size, Py_ssize_t n):
    """Benchmarks: seconds for ``n`` tags of one ``size``-byte message (>= 1)
    with the compression in use, in C without the GIL -- the MAC alone,
    none of the per-message Python or queue work around it."""
    cdef fmq_mac_state keyed
    cdef unsigned char out[_MAC_TAG]
    cdef bytes key = b"k" * 32
    cdef bytes data
    cdef const unsigned char *p
    cdef Py_ssize_t i
    if size < 1 or n < 1:
        raise ValueError("size and n must be >= 1")
    data = bytes(size)
    p = <const unsigned char *>PyBytes_AS_STRING(data)
    fmq_mac_init(&keyed, <const unsigned char *>PyBytes_AS_STRING(key), 32, _MAC_TAG)
    fmq_mac_absorb_key(&keyed)
    import time
    t0 = time.perf_counter()
    with nogil:
        for i in range(n):          # (a call into another file: not optimized away)
            fmq_mac_oneshot(&keyed, p, <size_t>size, out)
    return time.perf_counter() - t0


def _mac_path():
    """The name of the compression in use ("portable", "avx2" or "avx512")."""
    return _MAC_PATHS[fmq_mac_path()]


cdef class Mac:
    """One key's MAC, as ``_auth`` uses it: ``MAGIC + tag + payload``.
    Private bytes only (the caller copies shared memory first, or hashes a
    view it has decided to trust the bytes of).

    Given the handle's ``ring``, ``put_sealed`` and ``get_checked`` move
    sealed messages through it. For a native ``Ring`` each is one C call:
    the tag and the payload go straight into the slot or block, and a
    message comes out as its payload alone, checked on the private copy --
    no intermediate bytes object and no Python frame per message, which
    cost as much as the MAC itself for small messages. Any other ring (the
    pure backend's) is used through its ``put``/``get``.

    On a native ring it also offers a keyed handle's ``Queue`` hot methods
    compiled (``put_bytes``, ``get_object`` and so on, below), which
    ``queue.py`` binds onto the handle as it binds the ring's onto a
    keyless one.

    ``fastmq._auth`` subclasses this (adding the Python-level helpers), so
    the per-message calls are plain method calls on one object."""
    cdef fmq_mac_state base       # key block pending: for an empty payload
    cdef fmq_mac_state keyed      # key block absorbed: copied per message
    cdef bytes magic
    cdef Ring native              # the ring if it is a native one, else None
    cdef readonly object ring     # the ring put_sealed/get_checked use (or None)
    cdef readonly bint direct     # ring is a native Ring: put/get straight through it

    def __cinit__(self, bytes key, bytes magic, ring=None):
        self.ring = ring
        self.native = ring if isinstance(ring, Ring) else None
        self.direct = self.native is not None
        if len(magic) != _MAC_MAGIC_LEN:
            raise ValueError("magic must be 4 bytes")
        if fmq_mac_init(&self.base, <const unsigned char *>PyBytes_AS_STRING(key),
                        <size_t>len(key), _MAC_TAG) != 0:
            raise ValueError("a BLAKE2b key is 1 to 64 bytes")
        self.keyed = self.base
        fmq_mac_absorb_key(&self.keyed)
        self.magic = magic

    cdef void _tag(self, const unsigned char *p, Py_ssize_t n, unsigned char *out) noexcept:
        cdef fmq_mac_state s
        if n == 0:
            s = self.base
            fmq_mac_final(&s, out)
        elif n >= _MAC_NOGIL:
            with nogil:
                fmq_mac_oneshot(&self.keyed, p, <size_t>n, out)
        else:
            fmq_mac_oneshot(&self.keyed, p, <size_t>n, out)

    def tag(self, *parts):
        """The tag of the concatenation of ``parts`` (bytes-like)."""
        cdef fmq_mac_state s = self.base
        cdef Py_buffer view
        cdef unsigned char out[_MAC_TAG]
        for part in parts:
            PyObject_GetBuffer(part, &view, PyBUF_SIMPLE)
            try:
                with nogil:
                    fmq_mac_update(&s, <const unsigned char *>view.buf, <size_t>view.len)
            finally:
                PyBuffer_Release(&view)
        fmq_mac_final(&s, out)
        return PyBytes_FromStringAndSize(<char *>out, _MAC_TAG)

    def seal(self, data):
        """``MAGIC + tag + data`` as one new bytes object."""
        return self._seal(data)

    def check(self, bytes message):
        """The payload of ``message`` if its magic and tag are right, else
        None. The comparison takes the same time wherever it differs."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(message)
        cdef const unsigned char *m = <const unsigned char *>PyBytes_AS_STRING(self.magic)
        cdef unsigned char want[_MAC_TAG]
        cdef unsigned char diff = 0
        cdef int i
        if n < _MAC_OVERHEAD:
            return None
        for i in range(_MAC_MAGIC_LEN):
            diff |= p[i] ^ m[i]
        if diff:
            return None
        self._tag(p + _MAC_OVERHEAD, n - _MAC_OVERHEAD, want)
        for i in range(_MAC_TAG):
            diff |= p[_MAC_MAGIC_LEN + i] ^ want[i]
        if diff:
            return None
        return PyBytes_FromStringAndSize(<const char *>p + _MAC_OVERHEAD, n - _MAC_OVERHEAD)

    # ---- straight through a ring ---------------------------------------- #

    cdef int _seal_into(self, unsigned char *dst, const unsigned char *tag,
                        const unsigned char *src, Py_ssize_t n) except -1:
        memcpy(dst, PyBytes_AS_STRING(self.magic), _MAC_MAGIC_LEN)
        memcpy(dst + _MAC_MAGIC_LEN, tag, _MAC_TAG)
        if n >= _NOGIL_COPY:
            with nogil:
                memcpy(dst + _MAC_OVERHEAD, src, <size_t>n)
        else:
            memcpy(dst + _MAC_OVERHEAD, src, <size_t>n)
        return 0


    cdef bytes _seal(self, data):
        """``MAGIC + tag + data`` as one new bytes object."""
        cdef Py_buffer view
        cdef bytes out
        cdef unsigned char *dst
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            out = PyBytes_FromStringAndSize(NULL, view.len + _MAC_OVERHEAD)
            dst = <unsigned char *>PyBytes_AS_STRING(out)
            memcpy(dst, PyBytes_AS_STRING(self.magic), _MAC_MAGIC_LEN)
            self._tag(<const unsigned char *>view.buf, view.len, dst + _MAC_MAGIC_LEN)
            memcpy(dst + _MAC_OVERHEAD, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return out

    cdef Ring _direct_ring(self):
        """The native ring, for the methods that exist only on one."""
        if self.native is None:
            raise TypeError("this Mac's ring is not a native Ring: use put_sealed/get_checked")
        return self.native

    def put_sealed(self, data, timeout=None):
        """Enqueue ``MAGIC + tag + data`` (``data`` bytes-like), written in
        place: the same slot/block protocol as ``Ring.put``, with the tag
        computed from the caller's bytes before anything is claimed (so the
        slot is held no longer than for an unkeyed put)."""
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef Py_ssize_t n
        if self.native is None:                     # another backend's ring
            n = memoryview(data).nbytes
            if n + _MAC_OVERHEAD > self.ring.max_message_size:
                raise MessageTooLarge(
                    "message of %d bytes (+%d bytes of authentication tag) exceeds this "
                    "queue's max_message_size of %d bytes" % (n, _MAC_OVERHEAD,
                                                              self.ring.max_message_size))
            self.ring.put(self.seal(data), timeout)
            return
        self._put_sealed(data, nonblock, deadline)

    cdef int _put_sealed(self, data, bint nonblock, uint64_t deadline) except -1:
        """put_sealed on the native ring (see there)."""
        cdef Ring ring = self._direct_ring()
        cdef Py_buffer view
        cdef bint viewed = False
        cdef unsigned char tag[_MAC_TAG]
        cdef const unsigned char *src
        cdef Py_ssize_t n, total
        cdef uint32_t block = FMQ_NO_BLOCK
        cdef fmq_msg m
        cdef int rc
        ring._enter()
        try:
            if type(data) is bytes:
                # Immutable, and referenced by the caller for the whole call:
                # its bytes can be read without the buffer protocol.
                src = <const unsigned char *>PyBytes_AS_STRING(data)
                n = PyBytes_GET_SIZE(data)
            else:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                viewed = True
                src = <const unsigned char *>view.buf
                n = view.len
            try:
                total = n + _MAC_OVERHEAD
                if total > ring._max_msg:
                    raise MessageTooLarge(
                        "message of %d bytes (+%d bytes of authentication tag) exceeds this "
                        "queue's max_message_size of %d bytes" % (n, _MAC_OVERHEAD,
                                                                  ring._max_msg))
                ring._check_size(total)
                self._tag(src, n, tag)
                if total > <Py_ssize_t>ring._inline_max:
                    ring._alloc_block(total, nonblock, deadline, &block)
                    self._seal_into(fmq_pool_ptr(ring.r, block), tag, src, n)
                    try:
                        ring._claim_slot(&m, nonblock, deadline)
                    except BaseException:
                        fmq_pool_release_writer(ring.r, block)     # nothing was published
                        raise
                else:
                    ring._claim_slot(&m, nonblock, deadline)
                    self._seal_into(fmq_ring_inline_ptr(ring.r, &m), tag, src, n)
                rc = fmq_ring_commit(ring.r, &m, <uint32_t>total, block, 1, 0)
                if rc != FMQ_OK:
                    if block != FMQ_NO_BLOCK:
                        fmq_pool_release_writer(ring.r, block)
                    _raise(rc)
            finally:
                if viewed:
                    PyBuffer_Release(&view)
            ring._sync()               # as Ring.put: the sync mode is met first
        finally:
            ring._leave()
        return 0

    def get_checked(self, timeout=None):
        """Dequeue one message and return its payload (bytes) if its magic
        and tag are right; else the message is consumed all the same and
        this returns None (no tag: too short to hold one, or it does not
        start with the magic) or False (a tag that does not match).

        The tag and the payload are copied out of shared memory first and
        the check runs on those private copies, so the bytes checked are
        the bytes the caller deserializes: a co-process cannot change them
        in between."""
        cdef bint nonblock
        cdef uint64_t deadline
        if self.native is None:
            return self._check_failed(self.ring.get(timeout))   # a private copy
        deadline = _deadline(timeout, &nonblock)
        return self._get_checked(nonblock, deadline)

    cdef object _check_failed(self, bytes message):
        """get_checked's answer for a whole message in a private copy."""
        cdef object payload = self.check(message)
        if payload is not None:
            return payload
        if PyBytes_GET_SIZE(message) < _MAC_OVERHEAD or \
                memcmp(PyBytes_AS_STRING(message), PyBytes_AS_STRING(self.magic),
                       _MAC_MAGIC_LEN) != 0:
            return None
        return False

    cdef object _get_checked(self, bint nonblock, uint64_t deadline):
        """get_checked on the native ring (see there)."""
        cdef Ring ring = self._direct_ring()
        cdef fmq_msg m
        cdef unsigned char head[_MAC_OVERHEAD]
        cdef unsigned char want[_MAC_TAG]
        cdef const unsigned char *mg = <const unsigned char *>PyBytes_AS_STRING(self.magic)
        cdef bytes out = None
        cdef unsigned char *dst
        cdef Py_ssize_t n = 0
        cdef unsigned char diff = 0
        cdef int rc, i
        ring._enter()
        try:
            ring._claim_msg(&m, nonblock, deadline)
            if m.flags:
                # A message of an atomic batch: its own private copy first
                # (the record frames many), then the same check.
                out = ring._take_batch_one(&m)
            else:
                if m.len >= _MAC_OVERHEAD:
                    n = <Py_ssize_t>m.len - _MAC_OVERHEAD
                    try:
                        out = PyBytes_FromStringAndSize(NULL, n)
                    except BaseException:
                        fmq_ring_unclaim(ring.r, &m)           # the message stays queued
                        raise
                    dst = <unsigned char *>PyBytes_AS_STRING(out)
                    # As Ring.get: the slot stays claimed during the copy, so a
                    # process killed mid-copy gives the message back.
                    memcpy(head, m.data, _MAC_OVERHEAD)
                    if n >= _NOGIL_COPY:
                        with nogil:
                            memcpy(dst, m.data + _MAC_OVERHEAD, <size_t>n)
                    else:
                        memcpy(dst, m.data + _MAC_OVERHEAD, <size_t>n)
                rc = fmq_ring_release(ring.r, &m, 1)
                if rc != FMQ_OK:
                    _raise(rc)
        finally:
            ring._leave()
        if m.flags:
            return self._check_failed(out)
        if out is None:
            return None                             # too short to carry a tag
        for i in range(_MAC_MAGIC_LEN):
            diff |= head[i] ^ mg[i]
        if diff:
            return None
        self._tag(<const unsigned char *>PyBytes_AS_STRING(out), n, want)
        for i in range(_MAC_TAG):
            diff |= head[_MAC_MAGIC_LEN + i] ^ want[i]
        if diff:
            return False
        return out

    # ---- the keyed Queue's hot methods, compiled ------------------------- #
    #
    # As the native Ring's ``put_bytes``/``get_object``/... (ring.pxi, "the
    # Queue's hot methods") are the keyless handle's ``Queue`` methods
    # compiled, these are a keyed handle's: same arguments, same checks and
    # messages, same behaviour as ``Queue.put_bytes`` and so on with an
    # authkey (and, for objects, the default codec). ``queue.py`` binds them
    # onto a keyed handle whose ring is a native Ring (``direct``). A
    # message that fails its check is consumed, counted in the queue's
    # shared rejected count and raises ``AuthenticationError``, as there
    # (``_reject``); the framed, zero-copy and out-of-band-buffer cases go
    # to ``_serialize``'s functions, with this object as their ``auth``.

    cdef int _reject(self, failed) except -1:
        """Count a consumed message that failed (get_checked's None/False) and raise."""
        if _auth_mod is None:
            _load_auth()
        _auth_mod.count_rejected(self.ring)
        raise _auth_mod.rejected_error(failed)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_bytes(self, data, block=True, timeout=None):
        """``Queue.put_bytes`` of a keyed handle, compiled."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        self._put_sealed(data, nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_bytes(self, block=True, timeout=None):
        """``Queue.get_bytes`` of a keyed handle, compiled."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        out = self._get_checked(nonblock, deadline)
        if type(out) is not bytes:
            self._reject(out)
        return out

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_object(self, obj, block=True, timeout=None):
        """``Queue.put`` of a keyed handle with the default codec, compiled:
        the plain pickle of a buffer-less object is sealed here; one with
        out-of-band buffers goes to ``_serialize.put_with_buffers``."""
        cdef bint nonblock
        cdef uint64_t deadline
        if timeout is not None or block is not True:
            timeout = _call_timeout(block, timeout)
        if _ser is None:
            _load_codec()
        data = _plain_pickle(obj)
        if data is None:
            _ser.put_with_buffers(self._direct_ring(), obj, timeout, self)
            return
        deadline = _deadline(timeout, &nonblock)      # after pickling, as the layer
        self._put_sealed(data, nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_object(self, block=True, timeout=None, *, zero_copy=False):
        """``Queue.get`` of a keyed handle with the default codec, compiled.
        A checked plain pickle is loaded here; other payloads go through
        ``_serialize.decode``, and ``zero_copy=True`` reads through
        ``_serialize.decode_authenticated_view`` (checked in place)."""
        cdef bint nonblock
        cdef uint64_t deadline = _call_deadline(block, timeout, &nonblock)
        if _ser is None:
            _load_codec()
        if not zero_copy:
            out = self._get_checked(nonblock, deadline)
            if type(out) is not bytes:
                self._reject(out)
            return _decode_copy(out)
        if _auth_mod is None:
            _load_auth()
        lease = self._direct_ring()._recv(nonblock, deadline)
        try:
            value = _ser.decode_authenticated_view(self, lease.view)
        finally:
            lease.close()            # deferred while the arrays view it
        if type(value) is _auth_mod.Rejected:
            _auth_mod.count_rejected(self.ring)
            raise value.error
        return value

    cdef int _check_batch(self, list payloads) except -1:
        """queue._check_sizes: every sealed size before anything is sent."""
        cdef Ring ring = self._direct_ring()
        cdef Py_ssize_t n
        for data in payloads:
            n = PyBytes_GET_SIZE(data)
            if n > ring._max_msg:
                raise MessageTooLarge(
                    "message of %d bytes exceeds this queue's max_message_size of %d bytes; "
                    "nothing was sent" % (n, ring._max_msg))
        return 0

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_many_objects(self, iterable, block=True, timeout=None, *, atomic=False):
        """``Queue.put_many`` of a keyed handle with the default codec,
        compiled: every object is encoded and sealed, then every size is
        checked (nothing is sent if one is too big), then the batch goes in."""
        cdef bint nonblock
        cdef uint64_t deadline
        cdef list payloads = []
        timeout = _call_timeout(block, timeout)
        if _ser is None:
            _load_codec()
        for obj in iterable:
            data = _plain_pickle(obj)
            payloads.append(self._seal(_ser.encode(obj) if data is None else data))
        self._check_batch(payloads)
        deadline = _deadline(timeout, &nonblock)
        if atomic:
            return self._direct_ring()._put_batch(tuple(payloads), nonblock, deadline)
        return self._direct_ring()._put_many(tuple(payloads), nonblock, deadline)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def put_many_bytes(self, items, block=True, timeout=None, *, atomic=False):
        """``Queue.put_many_bytes`` of a keyed handle, compiled."""
        cdef bint nonblock
        cdef uint64_t deadline
        cdef list payloads
        timeout = _call_timeout(block, timeout)
        payloads = [self._seal(item) for item in items]
        deadline = _deadline(timeout, &nonblock)
        if atomic:
            self._check_batch(payloads)
            return self._direct_ring()._put_batch(tuple(payloads), nonblock, deadline)
        return self._direct_ring()._put_many(tuple(payloads), nonblock, deadline)

    @cython.binding(False)
    def _open_payload(self, bytes message):
        """``Auth.open`` of a private copy: its payload (bytes), or raises
        ``AuthenticationError`` (not counted: the caller counts)."""
        payload = self.check(message)
        if payload is None:
            if _auth_mod is None:
                _load_auth()
            raise _auth_mod.rejection(message)
        return payload

    @cython.binding(False)
    def _open_object(self, bytes message):
        """``Queue._decode_sealed`` with the default codec."""
        return _decode_copy(self._open_payload(message))

    cdef list _get_many_checked(self, max_messages, block, timeout, bint codec):
        cdef bint nonblock
        cdef uint64_t deadline
        _call_max_messages(max_messages)
        deadline = _call_deadline(block, timeout, &nonblock)
        if _ser is None:
            _load_codec()
        # A message that fails its check stops the batch like an undecodable
        # one (Ring._get_many): those before it are returned, and the call
        # that meets it first consumes it and raises, counted here.
        try:
            return self._direct_ring()._get_many(
                max_messages, nonblock, deadline,
                self._open_object if codec else self._open_payload, False)
        except AuthenticationError:
            if _auth_mod is None:
                _load_auth()
            _auth_mod.count_rejected(self.ring)
            raise

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_many_bytes(self, max_messages=1024, block=True, timeout=None):
        """``Queue.get_many_bytes`` of a keyed handle, compiled; the default
        is queue.DEFAULT_GET_MANY."""
        return self._get_many_checked(max_messages, block, timeout, False)

    @cython.binding(False)
    @cython.embedsignature.format("clinic")
    def get_many_objects(self, max_messages=1024, block=True, timeout=None):
        """``Queue.get_many`` of a keyed handle with the default codec,
        compiled; the default is queue.DEFAULT_GET_MANY."""
        return self._get_many_checked(max_messages, block, timeout, True)


cdef object _auth_mod = None         # fastmq._auth, looked up on first use (it imports us)


cdef int _load_auth() except -1:
    global _auth_mod
    from fastmq import _auth
    _auth_mod = _auth
    return 0
