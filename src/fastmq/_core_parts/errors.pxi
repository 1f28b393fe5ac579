# Part of fastmq._core (the error funnel: C return codes to exceptions, signal checks).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

# ======================================================================== #
# error funnel                                                             #
# ======================================================================== #

cdef int _raise(int rc, str what="") except -1:
    """Map a C return code to its exception (always raises for rc != 0)."""
    cdef int err = errno
    msg = fmq_last_error().decode("utf-8", "replace")
    if rc == FMQ_EMPTY or rc == FMQ_TIMEDOUT and what == "get":
        raise Empty("queue is empty")
    if rc == FMQ_FULL or rc == FMQ_NOSPACE or rc == FMQ_TIMEDOUT:
        raise Full("queue is full")
    if rc == FMQ_TOOBIG:
        raise MessageTooLarge(what or "message exceeds the queue's max_message_size")
    if rc == FMQ_ECORRUPT or rc == FMQ_EVERSION or rc == FMQ_EDEADINIT:
        raise CorruptQueue(msg)
    if rc == FMQ_ENOTFOUND:
        raise QueueNotFound(msg)
    if rc == FMQ_EEXIST:
        raise QueueExists(msg)
    if rc == FMQ_EINVAL or rc == FMQ_ESTATE:
        raise ValueError(msg)
    if rc == FMQ_ELOST:
        # The C core says ELOST for two different things: a lease (in-flight
        # entry or dead letter) that is no longer this consumer's -- the
        # user's LeaseLost -- and a ring slot or pool block that a plain
        # put/get/commit/recv held and found changed under it. No lease is
        # involved in the second; only crash recovery judging this process
        # dead, or a write into the segment from outside fastmq, can do that.
        if "lease" in msg or "dead letter" in msg:
            raise LeaseLost(msg)
        raise CorruptQueue(msg + ": the shared state this call held was changed by another "
                           "process (crash recovery judged its holder dead, or the segment "
                           "was written by something other than fastmq)")
    if rc == FMQ_ETABLEFULL:
        raise Error(msg)
    if rc == FMQ_EOS:
        raise OSError(err, msg)
    raise Error("fastmq internal error %d: %s" % (rc, msg))


_SYNC_MODES = {"none": FMQ_SYNC_NONE, "interval": FMQ_SYNC_INTERVAL, "commit": FMQ_SYNC_COMMIT}
_SYNC_NAMES = {v: k for k, v in _SYNC_MODES.items()}


cdef bytes _path_bytes(object path):
    """The C string of a durable queue's file path."""
    cdef bytes b = _os.fsencode(path)
    if b"\0" in b:
        raise ValueError("invalid path %r: it contains a NUL" % (path,))
    if len(b) > 4000:
        raise ValueError("path too long (%d bytes; at most 4000)" % len(b))
    return b


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
