# Part of fastmq._core (Consumer: one handle's at-least-once delivery; LeasedMessage,
# _PinnedPayload). Included by src/fastmq/_core.pyx; it shares that module's namespace.
#
# The one owner of at-least-once state on the native backend: every change of
# a leased message's settlement state and of the handle's in-flight count
# happens in Consumer below, next to the fmq_lease_* call that makes it true in
# shared memory. The Python layer (fastmq/acks.py) only asks: it applies the
# in-flight bound, forwards dead letters and decodes payloads.

# ======================================================================== #
# leased messages                                                          #
# ======================================================================== #

# Settlement states of a leased message: fastmq/_contract.py's numbers
# (tests/test_backend_conformance.py checks they agree).
cdef enum:
    HELD = 0
    ACKED = 1
    NACKED = 2
    LOST = 3

cdef tuple _SETTLED_REASON = ("is held", "was acked", "was nacked",
                              "lease was already reported lost")


@cython.auto_pickle(False)
cdef class LeasedMessage:
    """What a leased message is made of (fields: ``_contract.MESSAGE_FIELDS``);
    ``fastmq.Message`` (acks.py) adds the behaviour. A C type so that
    ``Consumer.lease`` builds one with a few stores and ``Consumer.ack_many``
    settles one without Python attribute lookups: those were most of the cost
    of at-least-once batches. ``_state`` is written by a Consumer only."""
    cdef readonly object _consumer       # the Consumer that leased it
    cdef readonly uint32_t _slot         # in-flight entry
    cdef readonly uint32_t _token        # that entry's use count: stale acks fail
    cdef readonly uint32_t delivery_count
    cdef readonly object _payload        # bytes, or a _PinnedPayload
    cdef public int _state               # HELD/ACKED/NACKED/LOST

    def __init__(self, consumer, uint32_t slot, uint32_t token, payload,
                 uint32_t delivery_count):
        # Used by the pure backend's Consumer; Consumer.lease fills the
        # fields directly.
        self._consumer = consumer
        self._slot = slot
        self._token = token
        self._payload = payload
        self.delivery_count = delivery_count

    @property
    def data(self):
        """Read-only memoryview of the payload: of shared memory for a
        payload in a block (pinned while this message or any view of it
        lives), else of a private copy."""
        return PyMemoryView_FromObject(self._payload)

    @property
    def redelivered(self):
        return self.delivery_count > 1

    @property
    def id(self):
        """The in-flight entry, as in ``Queue.pending()[i]["id"]``."""
        return self._slot

    @property
    def token(self):
        return self._token


@cython.no_gc_clear
cdef class _PinnedPayload(_Exporter):
    """A leased message's payload left in its block (Message.data), pinned
    (fmq_lease_pin) until this object -- held by the Message and by every
    view of it -- is gone: an ack or a redelivery meanwhile never frees memory
    that Python can still see, and data stays readable after ack()."""
    cdef uint32_t slot, token, block

    @staticmethod
    cdef _PinnedPayload _new(Ring ring, uint32_t slot, uint32_t token, uint32_t block,
                             const unsigned char *data, uint32_t n):
        cdef _PinnedPayload self = _PinnedPayload.__new__(_PinnedPayload)
        self.slot, self.token, self.block = slot, token, block
        self._attach(ring, <unsigned char *>data, n, True)
        return self

    cdef void _give_back(self):
        fmq_lease_unpin(self.ring.r, self.slot, self.token, self.block)

    def __len__(self):
        return self.size


# ======================================================================== #
# Consumer                                                                 #
# ======================================================================== #

# The in-flight entry operations of Consumer._op.
cdef enum:
    OP_ACK = 0
    OP_NACK = 1
    OP_TOUCH = 2
    OP_ACK_DEAD = 3


@cython.final
@cython.auto_pickle(False)
cdef class Consumer:
    """One handle's at-least-once consumer (see the ring contract's
    ``Consumer``): leases messages of ``message_class`` (a LeasedMessage
    subclass), settles them, and counts the ones it holds. ``owner`` is
    whatever the caller wants the messages to lead back to (fastmq.acks
    keeps its per-handle policy object there); the binding never looks
    inside it."""
    cdef Ring ring
    cdef type message_class
    cdef readonly object owner
    cdef readonly Py_ssize_t in_flight   # HELD messages this consumer leased

    @staticmethod
    cdef Consumer _new(Ring ring, object owner, type message_class):
        if not issubclass(message_class, LeasedMessage):
            raise TypeError("message_class must subclass fastmq._core.LeasedMessage, not %r"
                            % (message_class,))
        cdef Consumer self = Consumer.__new__(Consumer)
        self.ring = ring
        self.owner = owner
        self.message_class = message_class
        return self

    @property
    def ring(self):
        return self.ring

    # ---- leasing -------------------------------------------------------- #

    cdef object _leased(self, uint32_t slot, uint32_t token, uint32_t deliveries):
        """A new message for a lease we just took; None if the lease was lost
        already (it is redelivered: skip it)."""
        cdef Ring ring = self.ring
        cdef const unsigned char *data
        cdef uint32_t n, block
        cdef int rc = fmq_lease_pin(ring.r, slot, token, &data, &n, &block)
        if rc == FMQ_OK:          # a block: views of it, pinned (see fmq_lease_pin)
            payload = _PinnedPayload._new(ring, slot, token, block, data, n)
        elif rc == FMQ_AGAIN:     # inline: a private copy is cheaper than a pin
            rc = fmq_lease_payload(ring.r, slot, token, &data, &n)
            if rc == FMQ_ELOST:
                return None
            if rc != FMQ_OK:
                _raise(rc, None, KIND_LEASE)
            payload = PyBytes_FromStringAndSize(<const char *>data, n)
        elif rc == FMQ_ELOST:
            return None
        else:
            _raise(rc, None, KIND_LEASE)
        # __new__ without __init__: a few C stores, no argument parsing.
        cdef LeasedMessage msg = LeasedMessage.__new__(self.message_class)
        msg._consumer = self
        msg._slot = slot
        msg._token = token
        msg.delivery_count = deliveries
        msg._payload = payload
        return msg

    def lease(self, Py_ssize_t max_messages, timeout, double lease_seconds):
        """Lease up to max_messages (at least one, waiting up to timeout; Empty
        otherwise) -> list of HELD ``message_class`` objects; in_flight grows
        by as many."""
        cdef Ring ring = self.ring
        cdef bint nonblock
        cdef uint64_t deadline = _deadline(timeout, &nonblock)
        cdef uint64_t lease_ns
        cdef fmq_msg m
        cdef uint32_t slot, token, deliveries
        cdef list out = []
        cdef int rc
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        if not lease_seconds > 0 or lease_seconds > 1e9:
            raise ValueError("lease must be a positive number of seconds")
        lease_ns = <uint64_t>(lease_seconds * 1e9)
        ring._enter()
        try:
            fmq_lease_redeliver_due(ring.r, 0)
            while len(out) < max_messages:
                if out:
                    rc = fmq_ring_claim(ring.r, &m)
                    if rc != FMQ_OK:
                        # Empty, or a damaged message (the core consumed and
                        # counted it): return what is leased already -- the
                        # next call reports a persisting error.
                        break
                else:
                    ring._claim_msg(&m, nonblock, deadline)
                rc = fmq_lease_take(ring.r, &m, lease_ns, &slot, &token, &deliveries)
                if rc == FMQ_FULL:
                    # The in-flight table is full: put the message back and wait
                    # for acks (or return what we have).
                    fmq_ring_unclaim(ring.r, &m)
                    if out:
                        break
                    # If the ring is full too and a lease is due, neither can
                    # make room for the other: take that message directly.
                    if fmq_lease_adopt(ring.r, lease_ns, &slot, &token, &deliveries) == FMQ_OK:
                        msg = self._leased(slot, token, deliveries)
                        if msg is not None:
                            out.append(msg)
                        continue
                    if nonblock:
                        _raise(FMQ_EMPTY)
                    # Without the GIL (the thread that would ack may be ours),
                    # one slice at a time: signals and close() are noticed.
                    with nogil:
                        rc = fmq_lease_wait_free(ring.r, deadline)
                    if rc == FMQ_TIMEDOUT:
                        _raise(FMQ_EMPTY)
                    _check_wait(ring._closed)
                    continue
                if rc != FMQ_OK:
                    if out:
                        break      # what is leased already is returned
                    # The message held a ring slot: a lost one is a damaged
                    # segment, not a lost lease.
                    _raise(rc)
                msg = self._leased(slot, token, deliveries)
                if msg is not None:
                    out.append(msg)
        finally:
            self.in_flight += len(out)
            ring._leave()
        return out

    # ---- settling ------------------------------------------------------- #

    cdef int _op(self, int op, uint32_t slot, uint32_t token, uint64_t arg) except? -9999:
        """One call on an in-flight entry -> the C return code (QueueClosed
        if the handle is closed)."""
        cdef Ring ring = self.ring
        cdef int rc
        ring._enter()
        try:
            if op == OP_ACK:
                rc = fmq_lease_ack(ring.r, slot, token)
            elif op == OP_NACK:
                rc = fmq_lease_nack(ring.r, slot, token, <int>arg)
            elif op == OP_TOUCH:
                rc = fmq_lease_touch(ring.r, slot, token, arg)
            else:
                rc = fmq_lease_ack_dead(ring.r, slot, token)
        finally:
            ring._leave()
        return rc

    cdef int _check_held(self, LeasedMessage msg, str what) except -1:
        if msg._consumer is not self:
            raise ValueError("%r was not leased through this queue handle in this process"
                             % (msg,))
        if msg._state != HELD:
            _raise(FMQ_ELOST, "cannot %s message %d: it %s"
                   % (what, msg._slot, _SETTLED_REASON[msg._state]), KIND_LEASE)
        return 0

    cdef int _settle(self, LeasedMessage msg, int state, int rc) except -1:
        """After an operation that ends the lease: ``state`` if it succeeded,
        LOST if the lease was lost (then LeaseLost); any other failure leaves
        the message HELD and raises."""
        if rc == FMQ_OK:
            msg._state = state
            self.in_flight -= 1
            return 0
        if rc == FMQ_ELOST:
            msg._state = LOST
            self.in_flight -= 1
        _raise(rc, None, KIND_LEASE)
        return -1

    def ack(self, LeasedMessage msg not None):
        """Done with it (ACKED). Acking an ACKED message again is a no-op;
        otherwise LeaseLost if the lease is gone (the message is then LOST)."""
        if msg._state == ACKED and msg._consumer is self:
            return
        self._check_held(msg, "ack")
        self._settle(msg, ACKED, self._op(OP_ACK, msg._slot, msg._token, 0))

    def nack(self, LeasedMessage msg not None, bint requeue=True):
        """Give it back now (NACKED): requeued with delivery count + 1, or
        dead-lettered (requeue False, or past max_deliveries)."""
        self._check_held(msg, "nack")
        self._settle(msg, NACKED, self._op(OP_NACK, msg._slot, msg._token, 1 if requeue else 0))

    def touch(self, LeasedMessage msg not None, double seconds):
        """Extend the lease to now + seconds (the message stays HELD)."""
        if not seconds > 0 or seconds > 1e9:
            raise ValueError("seconds must be a positive number")
        self._check_held(msg, "touch")
        cdef int rc = self._op(OP_TOUCH, msg._slot, msg._token, <uint64_t>(seconds * 1e9))
        if rc != FMQ_OK:
            if rc == FMQ_ELOST:
                msg._state = LOST
                self.in_flight -= 1
            _raise(rc, None, KIND_LEASE)

    def ack_many(self, messages):
        """Ack every HELD message of the batch (ACKED, or LOST when its lease
        was lost: never LeaseLost); others are skipped. Every item is checked
        first (TypeError / ValueError): a bad item acks none. Returns how many
        were acked."""
        cdef LeasedMessage msg
        cdef Ring ring = self.ring
        cdef Py_ssize_t acked = 0, settled = 0
        cdef type cls = self.message_class
        if not isinstance(messages, (list, tuple)):
            messages = list(messages)
        for m in messages:       # validate all first: a bad item acks none
            if not isinstance(m, cls):
                raise TypeError("ack_many takes fastmq.%s objects, not %s"
                                % (cls.__name__, type(m).__name__))
            if (<LeasedMessage>m)._state == HELD and (<LeasedMessage>m)._consumer is not self:
                raise ValueError("%r was not leased through this queue handle in this "
                                 "process" % (m,))
        ring._enter()
        try:
            for m in messages:
                msg = <LeasedMessage>m
                if msg._state != HELD:
                    continue
                settled += 1
                if fmq_lease_ack(ring.r, msg._slot, msg._token) == FMQ_OK:
                    msg._state = ACKED
                    acked += 1
                else:
                    msg._state = LOST
        finally:
            self.in_flight -= settled
            ring._leave()
        return acked

    def recount(self):
        """Correct in_flight for messages dropped without ack/nack (no
        ``__del__`` hook: it would cost every message). They hold their lease
        until it expires, so they count until then: the in-flight entries
        this process holds bound the true number. Returns the count."""
        pid = _os.getpid()
        cdef Py_ssize_t held = 0
        for entry in self.ring.pending():
            if entry["pid"] == pid and entry["expires_in"] > 0:
                held += 1
        if held < self.in_flight:
            self.in_flight = held
        return self.in_flight

    # ---- dead letters --------------------------------------------------- #

    def take_dead_letters(self, Py_ssize_t max_messages):
        """Parked dead letters, now held by this consumer: (slot, token,
        payload) each; ``ack_dead`` once forwarded (see the contract)."""
        cdef Ring ring = self.ring
        cdef uint32_t slot, token, n
        cdef const unsigned char *data
        cdef list out = []
        cdef int rc
        ring._enter()
        try:
            while len(out) < max_messages:
                if fmq_lease_take_dead(ring.r, &slot, &token) != FMQ_OK:
                    break
                rc = fmq_lease_payload(ring.r, slot, token, &data, &n)
                if rc != FMQ_OK:
                    _raise(rc, None, KIND_LEASE)
                out.append((slot, token, PyBytes_FromStringAndSize(<const char *>data, n)))
        finally:
            ring._leave()
        return out

    def ack_dead(self, uint32_t slot, uint32_t token):
        """A dead letter taken here was forwarded: it leaves for good."""
        cdef int rc = self._op(OP_ACK_DEAD, slot, token, 0)
        if rc != FMQ_OK:
            _raise(rc, None, KIND_LEASE)
