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

from cpython.bytes cimport PyBytes_GET_SIZE

cdef enum:
    _MAC_MAGIC_LEN = 4
    _MAC_TAG = 16
    _MAC_OVERHEAD = _MAC_MAGIC_LEN + _MAC_TAG
    _MAC_NOGIL = 65536


cdef class Mac:
    """One key's MAC, as ``_auth`` uses it: ``MAGIC + tag + payload``.
    Private bytes only (the caller copies shared memory first, or hashes a
    view it has decided to trust the bytes of)."""
    cdef fmq_mac_state base       # key block pending: for an empty payload
    cdef fmq_mac_state keyed      # key block absorbed: copied per message
    cdef bytes magic

    def __cinit__(self, bytes key, bytes magic):
        if len(magic) != _MAC_MAGIC_LEN:
            raise ValueError("magic must be 4 bytes")
        if fmq_mac_init(&self.base, <const unsigned char *>PyBytes_AS_STRING(key),
                        <size_t>len(key), _MAC_TAG) != 0:
            raise ValueError("a BLAKE2b key is 1 to 64 bytes")
        self.keyed = self.base
        fmq_mac_absorb_key(&self.keyed)
        self.magic = magic

    cdef void _tag(self, const unsigned char *p, Py_ssize_t n, unsigned char *out) noexcept:
        cdef fmq_mac_state s = self.keyed if n > 0 else self.base
        if n >= _MAC_NOGIL:
            with nogil:
                fmq_mac_update(&s, p, <size_t>n)
                fmq_mac_final(&s, out)
        else:
            fmq_mac_update(&s, p, <size_t>n)
            fmq_mac_final(&s, out)

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

    def open(self, bytes message):
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
