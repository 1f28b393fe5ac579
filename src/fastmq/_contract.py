"""Constants every layer of fastmq agrees on, defined once.

A neutral module: it imports nothing from fastmq, so both backends
(``fastmq._core``, ``fastmq._pure``), the policy layer (``fastmq.acks``) and
the API layer (``fastmq.queue``) can import it without an import cycle. The
native core has the same numbers compiled in (``_core_parts/consumer.pxi``);
``tests/test_backend_conformance.py`` checks that they agree.
"""
from __future__ import annotations

# ---- limits ----------------------------------------------------------------

#: Largest payload a queue can carry: a slot, a pool block's length field and
#: an in-flight entry record a message's length in 32 bits (both backends).
MAX_MESSAGE_SIZE = (1 << 32) - 1

#: Longest lease (and ``touch``) in seconds: lease deadlines are u64
#: nanoseconds of CLOCK_MONOTONIC, and 1e9 s keeps ``now + lease`` far from
#: overflowing them.
MAX_LEASE = 1e9

# ---- settlement states of a leased message --------------------------------
#
# A leased message starts HELD; its backend's Consumer moves it to exactly
# one of the others, once (ack -> ACKED, nack -> NACKED, a lease found lost
# by ack/nack/touch/ack_many -> LOST). Nothing else writes a message's state.

HELD, ACKED, NACKED, LOST = range(4)
STATE_NAMES = ("held", "acked", "nacked", "lost")

#: The fields of a leased message, as the backends' ``LeasedMessage`` types
#: define them (``fastmq.Message`` subclasses whichever is in use):
#: ``_consumer`` (the Consumer that leased it, which settles it), ``_slot``
#: and ``_token`` (its in-flight entry and that entry's use count, so a stale
#: ack can never hit another message), ``delivery_count`` (1 on the first
#: delivery), ``_payload`` (bytes, or the native backend's pinned block) and
#: ``_state`` (one of the settlement states above).
MESSAGE_FIELDS = ("_consumer", "_slot", "_token", "delivery_count", "_payload", "_state")
