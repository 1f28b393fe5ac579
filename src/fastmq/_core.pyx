# cython: language_level=3, boundscheck=False, wraparound=False
"""fastmq._core -- the thin Cython binding of the C core (backend "native").

Implements the ring contract written down in ``fastmq/_ring_protocol.py``.
What lives here and nowhere else:

* the error funnel (``_raise``, ``_check_wait``): one place that turns a C
  return code, a full or empty queue and the end of a wait slice into the
  exceptions of ``fastmq.errors``, and runs pending signal handlers;
* the wait loops: the GIL is released while waiting (and while copying large
  payloads); every wait is sliced (<= 100 ms in C) so Ctrl-C and ``close()``
  from another thread are noticed promptly;
* buffer exporters (``Reservation``, ``ReceivedView``, ``_PinnedPayload``)
  that count their exports and keep their block -- and the mapping -- alive
  until the last view is gone;
* the at-least-once ``Consumer``: the only code that changes a leased
  message's state or a handle's in-flight count on this backend.

Threads: a ``Ring`` may be shared by threads. Its ``busy``/``pins`` counters
are only touched with the GIL held, so they need no atomics; ``close()`` while
another thread waits or a view is alive defers the unmap until they finish.
Fork: one mechanism, the C core's fork handler (``fmq_fork_gen`` moves on in
every child). Every entry point calls ``fmq_region_check_fork`` so a child
re-registers under its own identity before touching the ring, and every buffer
exporter records the generation it was made in: a copy inherited through
``fork()`` never gives back (or commits) what the parent holds.

The module is one extension split by concern into the parts under
``_core_parts/``, included at the end of this file in dependency order:
``errors`` (the funnel), ``ring`` (the handle), ``exporters`` (buffer
exporters and segment listing), ``consumer`` (at-least-once delivery: Consumer,
LeasedMessage, _PinnedPayload), ``mac`` (authkey MACs).
This file keeps the imports and module constants they all share.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_FromObject
cimport cython
from libc.errno cimport errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy


cdef extern from "Python.h":
    # CPython's memoryview internals (Include/cpython/memoryobject.h), read-only:
    # the only way to know whether slices of a memoryview are still alive.
    ctypedef struct _PyManagedBufferObject:
        Py_ssize_t exports
    ctypedef struct PyMemoryViewObject:
        _PyManagedBufferObject *mbuf
        Py_ssize_t exports

import os as _os

from fastmq.errors import (CorruptQueue, Empty, Error, Full, LeaseLost, MessageTooLarge,
                           QueueClosed, QueueExists, QueueNotFound)

backend_name = "native"

# Copies at least this large are done with the GIL released: below it the
# release/re-acquire costs more than it frees up for other threads.
cdef Py_ssize_t _NOGIL_COPY = 64 * 1024
# The slot and in-flight formats record a message's length in 32 bits
# (fastmq/_contract.py's MAX_MESSAGE_SIZE; the conformance test compares).
cdef uint64_t _MAX_FORMAT_LEN = 0xFFFFFFFFu
MAX_MESSAGE_SIZE = _MAX_FORMAT_LEN

fmq_global_init()


include "_core_parts/errors.pxi"
include "_core_parts/ring.pxi"
include "_core_parts/exporters.pxi"
include "_core_parts/consumer.pxi"
include "_core_parts/mac.pxi"
