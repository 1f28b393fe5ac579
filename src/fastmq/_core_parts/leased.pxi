# Part of fastmq._core (LeasedMessage: an at-least-once message held by this handle).
# Included by src/fastmq/_core.pyx; it shares that module's namespace.

# ======================================================================== #
# leased messages                                                          #
# ======================================================================== #

# Settlement states of a leased message (the same numbers in both backends).
cdef enum:
    HELD = 0
    ACKED = 1
    NACKED = 2
    LOST = 3


@cython.auto_pickle(False)
cdef class LeasedMessage:
    """What a leased message is made of; ``fastmq.Message`` (acks.py) adds
    the behaviour. A C type so that ``Ring.lease`` builds one with a few
    stores and ``Ring.ack_many`` settles one without Python attribute lookups:
    those were most of the cost of at-least-once batches."""
    cdef readonly object _ctx            # the consumer (acks._Lessee) it belongs to
    cdef readonly uint32_t _slot         # in-flight entry
    cdef readonly uint32_t _token        # that entry's use count: stale acks fail
    cdef readonly uint32_t delivery_count
    cdef readonly object _payload        # bytes
    cdef public int _state               # HELD/ACKED/NACKED/LOST

    def __init__(self, ctx, uint32_t slot, uint32_t token, payload, uint32_t delivery_count):
        # Used by the pure backend; Ring.lease fills the fields directly.
        self._ctx = ctx
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
