# Part of fastmq._core (the error funnel: C return codes, Full/Empty and wait-slice
# signal checks, to exceptions).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

# ======================================================================== #
# error funnel                                                             #
# ======================================================================== #

# What a call was doing when the C core returned an error. The same return
# code means different things to different callers -- FMQ_ELOST from a lease
# operation is the user's LeaseLost, from a ring slot or pool block it is a
# damaged segment -- so the caller says which, and the funnel never has to
# guess from the C core's message text.
cdef enum:
    KIND_RING = 0       # put/get/commit/recv/wait: a slot or block it held
    KIND_GET = 1        # a read: a timed-out wait is Empty, not Full
    KIND_LEASE = 2      # ack/nack/touch/ack_dead/payload of an in-flight entry


cdef int _raise(int rc, str detail=None, int kind=KIND_RING) except -1:
    """Map a C return code to its exception (always raises for rc != 0).

    The one place where the native backend turns a condition into a Python
    exception: Empty and Full (``detail`` is then the message), every C
    return code, and what a wait slice ends with (``_check_wait``)."""
    cdef int err = errno
    if rc == FMQ_EMPTY or rc == FMQ_TIMEDOUT and kind == KIND_GET:
        raise Empty(detail or "queue is empty")
    if rc == FMQ_FULL or rc == FMQ_NOSPACE or rc == FMQ_TIMEDOUT:
        raise Full(detail or "queue is full")
    if rc == FMQ_TOOBIG:
        raise MessageTooLarge(detail or "message exceeds the queue's max_message_size")
    msg = fmq_last_error().decode("utf-8", "replace")
    if rc == FMQ_ECORRUPT or rc == FMQ_EVERSION or rc == FMQ_EDEADINIT:
        raise CorruptQueue(msg)
    if rc == FMQ_ENOTFOUND:
        raise QueueNotFound(msg)
    if rc == FMQ_EEXIST:
        raise QueueExists(msg)
    if rc == FMQ_EINVAL or rc == FMQ_ESTATE:
        raise ValueError(msg)
    if rc == FMQ_ELOST:
        if kind == KIND_LEASE:
            # The in-flight entry (or dead letter) is no longer this
            # consumer's: expired and redelivered, nacked, or reclaimed.
            raise LeaseLost(msg)
        # A ring slot or pool block that a plain put/get/commit/recv held
        # changed under it. No lease is involved; only crash recovery judging
        # this process dead, or a write into the segment from outside fastmq,
        # can do that.
        raise CorruptQueue(msg + ": the shared state this call held was changed by another "
                           "process (crash recovery judged its holder dead, or the segment "
                           "was written by something other than fastmq)")
    if rc == FMQ_ETABLEFULL:
        raise Error(msg)
    if rc == FMQ_EOS:
        raise OSError(err, msg)
    raise Error("fastmq internal error %d: %s" % (rc, msg))


cdef int _check_wait(bint closed) except -1:
    """After a wait slice ended without the awaited event (FMQ_AGAIN /
    FMQ_EINTR): run pending signal handlers (Ctrl-C raises KeyboardInterrupt
    here) and notice a close() from another thread."""
    PyErr_CheckSignals()
    if closed:
        raise QueueClosed("queue handle was closed while waiting")
    return 0


cdef int _raise_closed() except -1:
    raise QueueClosed("queue handle is closed")


cdef bytes _segment_bytes(str name):
    """The C string of a segment name; the C core checks the characters, a NUL
    would cut the name short before it could."""
    if "\0" in name:
        raise ValueError("invalid segment name %r: it contains a NUL" % name)
    return name.encode()


cdef inline uint64_t _deadline(object timeout, bint *nonblock) except? 1:
    """None -> 0 (wait forever); <= 0 -> non-blocking; > 0 -> absolute
    monotonic ns. inf and timeouts of 1e10 s or more (past what a u64 of ns
    can hold once added to the clock; converting them is undefined) wait
    forever; NaN is a ValueError."""
    if timeout is None:
        nonblock[0] = False
        return 0
    cdef double t = timeout
    if t != t:
        raise ValueError("'timeout' must be a number of seconds or None, not NaN")
    nonblock[0] = t <= 0
    if t <= 0 or t >= 1e10:
        return 0
    return fmq_now_ns() + <uint64_t>(t * 1e9) + 1
