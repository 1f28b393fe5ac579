"""Turning Python objects into queue messages and back (pickle protocol 5).

Framing -- chosen so that small objects cost nothing extra:

* No out-of-band buffers (the common case): the message is exactly the bytes
  of ``pickle.dumps(obj, protocol=5)``. Those start with ``b"\\x80\\x05"``.
* Out-of-band buffers (numpy arrays, PickleBuffer-aware objects): a frame::

      0   MAGIC  b"\\x00FQ5"    (0x00 can never start a pickle; see below)
      4   u32    number of buffers (n)
      8   u64    pickle length
      16  n * (u64 offset, u64 length)    -- offsets from the frame start
      ..  the pickle (in-band part)
      ..  each buffer's raw bytes, at 64-byte aligned offsets

  It is written with ``ring.reserve(total)``, so each buffer is copied exactly
  once, straight from the array into the message; 64-byte alignment lets the
  zero-copy reader hand numpy properly aligned views.

A pickle's first byte is an opcode; 0x00 is not one, so ``MAGIC`` is
unambiguous. Buffers that are not contiguous cannot be copied raw; the
buffer callback returns True for them, which tells pickle to keep them
in-band (a copy inside the pickle stream) rather than fail.

Decoding rejects anything malformed with ``BadMessage`` (a ``fastmq.Error``
and a ``pickle.UnpicklingError``), never an IndexError or a crash.
"""
from __future__ import annotations

import pickle
import struct
import sys

from . import _auth
from .errors import AuthenticationError, Error, MessageTooLarge

MAGIC = b"\x00FQ5"
PROTOCOL = 5
ALIGN = 64
_FIXED = struct.Struct("<4sIQ")
_ENTRY = struct.Struct("<QQ")


class BadMessage(Error, pickle.UnpicklingError):
    """A message is neither a pickle nor a valid fastmq frame.

    ``payload`` holds the message's raw bytes, so nothing is lost.
    """

    payload = None


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


# ------------------------------------------------------------------- encode

def pickle_with_buffers(obj):
    """(pickle bytes, [flat raw memoryviews of out-of-band buffers])."""
    raws = []

    def keep_out_of_band(pb):
        try:
            raw = pb.raw()          # a flat 'B' view; fails if not contiguous
        except BufferError:
            return True             # True = serialize this one in-band
        raws.append(raw)
        return False

    data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep_out_of_band)
    return data, raws


def frame_layout(pickle_len: int, buffer_lens):
    """(header bytes without entries' payloads placed, total size, buffer offsets)."""
    n = len(buffer_lens)
    pos = _FIXED.size + n * _ENTRY.size + pickle_len
    offsets = []
    for length in buffer_lens:
        pos = _align(pos)
        offsets.append(pos)
        pos += length
    header = _FIXED.pack(MAGIC, n, pickle_len) + b"".join(
        _ENTRY.pack(off, length) for off, length in zip(offsets, buffer_lens))
    return header, pos, offsets


def write_frame(dest: memoryview, header: bytes, data: bytes, raws, offsets):
    """Fill ``dest`` (exactly the frame's size) with the frame."""
    dest[:len(header)] = header
    start = len(header)
    dest[start:start + len(data)] = data
    gap_from = start + len(data)
    for raw, off in zip(raws, offsets):
        dest[gap_from:off] = bytes(off - gap_from)    # deterministic padding
        dest[off:off + raw.nbytes] = raw
        gap_from = off + raw.nbytes


def encode(obj):
    """The whole message as one bytes-like object (used by batches)."""
    data = _plain_pickle(obj)
    if data is not None:
        return data
    data, raws = pickle_with_buffers(obj)
    if not raws:
        return data
    header, total, offsets = frame_layout(len(data), [r.nbytes for r in raws])
    out = bytearray(total)
    write_frame(memoryview(out), header, data, raws, offsets)
    return out


# (shape, type(dtype), dtype.str) -> what ``array_frame`` returns (None: numpy
# pickles such arrays in-band), for the plain dtypes those name exactly: a
# stream of arrays of one shape pickles an empty template and lays out its
# frame once, not once per array (``reserve_array``, and ``put`` of a
# C-ordered ndarray).
_ARRAY_FRAMES: dict = {}
_ARRAY_FRAMES_MAX = 256


def _frame_key(shape, dtype):
    """The cache key of arrays of ``shape`` and ``dtype``, or None if they are
    not cached (a shape numpy would have to interpret, a structured dtype)."""
    if dtype.fields is not None or dtype.subdtype is not None or dtype.metadata is not None:
        return None
    if type(shape) is int:
        return (shape,), type(dtype), dtype.str
    if type(shape) is tuple and all(type(d) is int for d in shape):
        return shape, type(dtype), dtype.str
    return None


def array_frame(np, shape, dtype):
    """The frame of an array of ``shape`` and ``dtype`` (an ``np.dtype``), up
    to its data: ``(prefix, total, offset, shape, count)`` -- the bytes before
    the data (frame header, pickle, zero padding up to the 64-byte aligned
    data offset: what ``write_frame`` writes there), the frame's size, the
    data's offset, the shape as numpy normalised it and its element count.
    TypeError if numpy does not pickle such an array out-of-band."""
    key = _frame_key(shape, dtype)
    if key is not None:
        frame = _ARRAY_FRAMES.get(key, False)
        if frame is not False:
            if frame is None:
                raise TypeError(f"numpy did not pickle a {dtype} array out-of-band")
            return frame
    template = np.empty(shape, dtype)     # untouched pages: costs no copy
    data, raws = pickle_with_buffers(template)
    frame = None
    if len(raws) == 1:
        header, total, offsets = frame_layout(len(data), [raws[0].nbytes])
        pad = offsets[0] - len(header) - len(data)
        frame = (header + data + bytes(pad), total, offsets[0], template.shape, template.size)
    if key is not None:
        if len(_ARRAY_FRAMES) >= _ARRAY_FRAMES_MAX:
            _ARRAY_FRAMES.clear()
        _ARRAY_FRAMES[key] = frame
    if frame is None:
        raise TypeError(f"numpy did not pickle a {dtype} array out-of-band")
    return frame


def _learn_frame(obj, data, nbytes):
    """Remember the frame of the C-ordered plain ndarray ``obj``, just pickled
    into ``data`` with one buffer of ``nbytes`` (the pickle of such an array
    names its dtype and shape, not its data: any array of its kind pickles
    to the same bytes)."""
    key = _frame_key(obj.shape, obj.dtype)
    if key is None or key in _ARRAY_FRAMES:
        return
    header, total, offsets = frame_layout(len(data), [nbytes])
    pad = offsets[0] - len(header) - len(data)
    if len(_ARRAY_FRAMES) >= _ARRAY_FRAMES_MAX:
        _ARRAY_FRAMES.clear()
    _ARRAY_FRAMES[key] = (header + data + bytes(pad), total, offsets[0], obj.shape, obj.size)


def _put_array(ring, obj, timeout, auth):
    """``put_with_buffers`` of a C-ordered plain ndarray whose kind of frame
    is known (True), else False: the same bytes, without pickling it again."""
    key = _frame_key(obj.shape, obj.dtype)
    frame = _ARRAY_FRAMES.get(key, False) if key is not None else None
    if not frame:
        return False
    prefix, total, offset, _, _ = frame
    extra = 0 if auth is None else _auth.OVERHEAD
    if total + extra > ring.max_message_size:
        raise MessageTooLarge(f"message of {total + extra} bytes exceeds this queue's "
                              f"max_message_size of {ring.max_message_size} bytes")
    raw = pickle.PickleBuffer(obj).raw()
    reservation = ring.reserve(total + extra, timeout)
    try:
        view = reservation.view
        view[extra:extra + offset] = prefix
        view[extra + offset:extra + total] = raw
        if auth is not None:
            auth.sign_in_place(view)
    except BaseException:
        reservation.abort()
        raise
    reservation.commit()
    return True


def put_object(ring, obj, timeout, auth=None):
    """Serialize ``obj`` into ``ring``, copying array data exactly once.
    With ``auth`` (``_auth.Auth``) the message carries its tag."""
    data = _plain_pickle(obj)
    if data is None:
        put_with_buffers(ring, obj, timeout, auth)
    elif auth is None:
        ring.put(data, timeout)
    else:
        auth.put(ring, data, timeout)


def put_with_buffers(ring, obj, timeout, auth=None):
    """``put_object`` of an object whose plain pickle met an out-of-band
    buffer (``_plain_pickle`` returned None): pickled again with its buffers
    kept apart, and written as a frame (or as a plain pickle after all, if
    every buffer turned out not to be contiguous)."""
    np = sys.modules.get("numpy")
    plain = np is not None and type(obj) is np.ndarray and obj.flags.c_contiguous
    if plain and _put_array(ring, obj, timeout, auth):
        return
    data, raws = pickle_with_buffers(obj)
    if raws:
        if plain and len(raws) == 1:
            _learn_frame(obj, data, raws[0].nbytes)
        _put_frame(ring, data, raws, timeout, auth)
    elif auth is None:
        ring.put(data, timeout)
    else:
        auth.put(ring, data, timeout)


def _put_frame(ring, data, raws, timeout, auth):
    header, total, offsets = frame_layout(len(data), [r.nbytes for r in raws])
    extra = 0 if auth is None else _auth.OVERHEAD
    if total + extra > ring.max_message_size:
        raise MessageTooLarge(f"message of {total + extra} bytes exceeds this queue's "
                              f"max_message_size of {ring.max_message_size} bytes")
    reservation = ring.reserve(total + extra, timeout)
    try:
        if auth is None:
            write_frame(reservation.view, header, data, raws, offsets)
        else:
            with memoryview(reservation.view) as view:
                write_frame(view[extra:], header, data, raws, offsets)
                auth.sign_in_place(view)
    except BaseException:
        reservation.abort()
        raise
    reservation.commit()


def encode_sealed(obj, auth):
    """``encode`` plus the tag: the whole authenticated message as bytes."""
    return auth.seal(encode(obj))


# ------------------------------------------------------------------- decode

def parse_frame(payload: memoryview):
    """(pickle view, [(offset, length)]) of a frame, validated against its size."""
    size = payload.nbytes
    if size < _FIXED.size:
        raise BadMessage(f"truncated fastmq frame ({size} bytes)")
    _, n, pickle_len = _FIXED.unpack_from(payload, 0)
    table_end = _FIXED.size + n * _ENTRY.size
    if table_end + pickle_len > size:
        raise BadMessage(f"corrupt fastmq frame: {n} buffers and a pickle of "
                         f"{pickle_len} bytes do not fit in {size} bytes")
    entries = [_ENTRY.unpack_from(payload, _FIXED.size + i * _ENTRY.size) for i in range(n)]
    floor = table_end + pickle_len
    for off, length in entries:
        if off < floor or off + length > size:
            raise BadMessage(f"corrupt fastmq frame: buffer at {off} (+{length}) "
                             f"outside the message of {size} bytes")
        floor = off + length
    return payload[table_end:table_end + pickle_len], entries


def decode(payload, zero_copy: bool = False):
    """The object in ``payload`` (bytes or a memoryview of a message).

    ``zero_copy=False`` copies out-of-band buffers into bytearrays, so the
    result is independent of ``payload`` (and numpy arrays are writable).
    ``zero_copy=True`` passes slices of ``payload`` itself, so arrays view the
    message memory (read-only) and keep it alive.
    A malformed message raises ``BadMessage`` carrying its raw bytes.
    """
    if type(payload) is bytes and payload[:1] == b"\x80":
        # The common case, a plain pickle, without the frames below; any
        # unpickling failure takes the full path for its BadMessage.
        try:
            return _pickle_loads(payload)
        except _UNPICKLE_ERRORS:
            pass
    try:
        return _decode(payload, zero_copy)
    except BadMessage as exc:
        if exc.payload is None:
            exc.payload = bytes(payload)
        raise


def _decode(payload, zero_copy):
    if type(payload) is bytes and payload[:1] == b"\x80":
        return _loads(payload, None)          # the common case: a plain pickle
    view = memoryview(payload)
    if view.nbytes >= 4 and view[:4] == MAGIC:
        stream, entries = parse_frame(view)
        if zero_copy:
            buffers = [view[off:off + length] for off, length in entries]
            if len(entries) == 1:
                return _one_buffer_view(bytes(stream), buffers[0], entries[0][1])
        else:
            buffers = [bytearray(view[off:off + length]) for off, length in entries]
        return _loads(stream, buffers)
    if view.nbytes >= 4 and view[:4] == _auth.MAGIC:
        raise AuthenticationError(
            "this message carries an authentication tag (it was written with an "
            "authkey): open the queue with the same authkey to read it")
    if view.nbytes == 0 or view[0] != 0x80:
        raise BadMessage("message is neither a pickle nor a fastmq frame "
                         "(was it sent with put_bytes()? read it with get_bytes())")
    return _loads(view, None)


# The pickle of a numpy array names its dtype and shape, not its data: a
# stream of arrays of one kind repeats the same few hundred bytes. Such a
# stream, once unpickled into a plain C-ordered ndarray over exactly its one
# buffer, maps to (shape, dtype, buffer length, frombuffer), and the next view
# of it is made directly -- the same array pickle.loads would make, without the
# unpickler's imports and dtype reconstruction. Keyed by a private copy of the
# stream, so what shared memory says later cannot change what was learnt.
_ARRAY_STREAMS: dict = {}
_ARRAY_STREAMS_MAX = 256


def _one_buffer_view(stream: bytes, buf, length):
    """``_loads(stream, [buf])`` for a zero-copy frame with one buffer."""
    known = _ARRAY_STREAMS.get(stream)
    if known is not None and known[2] == length:
        # frombuffer keeps ``buf`` itself (and so its export of the message)
        # as the array's base; np.ndarray(buffer=buf) would keep only buf.obj,
        # and the message could be freed under the array.
        return known[3](buf, known[1]).reshape(known[0])
    obj = _loads(stream, [buf])
    np = sys.modules.get("numpy")
    if np is not None and type(obj) is np.ndarray and length and obj.nbytes == length \
            and obj.flags.c_contiguous and not obj.dtype.hasobject:
        probe = np.frombuffer(buf, obj.dtype).reshape(obj.shape)
        if probe.strides == obj.strides and probe.ctypes.data == obj.ctypes.data \
                and probe.flags.writeable == obj.flags.writeable:
            if len(_ARRAY_STREAMS) >= _ARRAY_STREAMS_MAX:
                _ARRAY_STREAMS.clear()
            _ARRAY_STREAMS[stream] = (obj.shape, obj.dtype, length, np.frombuffer)
    return obj


_pickle_loads = pickle.loads
_pickle_dumps = pickle.dumps
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, IndexError, struct.error)
# Objects of these types cannot hold out-of-band buffers: pickle them directly.
_NO_BUFFERS = frozenset({int, float, complex, str, bytes, bool, type(None)})


class _HasBuffers(Exception):
    """Raised by _refuse_buffers to abandon a first, buffer-less pickling."""


def _refuse_buffers(pickle_buffer):
    raise _HasBuffers


def _plain_pickle(obj):
    """The pickle of ``obj`` if it has no out-of-band buffers, else None.

    Most messages are small and buffer-less; pickling them with a callback
    that refuses buffers produces the same bytes as a plain ``dumps`` (the
    keyword argument costs a few hundred CPU instructions, which the types in
    ``_NO_BUFFERS`` skip), and only objects that do carry buffers (numpy
    arrays) are pickled a second time by the framing path -- cheaply, since
    their data is not part of the pickle. (The compiled put also remembers
    such types for a while and frames them at once: ``ring.pxi``.)"""
    if type(obj) in _NO_BUFFERS:
        return _pickle_dumps(obj, PROTOCOL)
    try:
        return _pickle_dumps(obj, PROTOCOL, buffer_callback=_refuse_buffers)
    except _HasBuffers:
        return None


def _loads(stream, buffers):
    try:
        return pickle.loads(stream, buffers=buffers)
    except (pickle.UnpicklingError, EOFError, IndexError, struct.error) as exc:
        if isinstance(exc, BadMessage):
            raise
        raise BadMessage(f"cannot unpickle message: {exc}") from exc


def decode_authenticated_view(auth, view):
    """Zero-copy decode of an authenticated message that lives in shared
    memory (``recv``'s view): checked before anything is unpickled, and the
    frame header and the pickle stream are parsed and unpickled from a private
    copy made for the check, so a co-process cannot change them afterwards;
    only out-of-band buffers (raw data) are handed out as views.

    A message that fails the check is not raised but returned as
    ``_auth.Rejected`` (see ``_auth.Auth.verify_view``)."""
    body = view[_auth.OVERHEAD:]
    if body.nbytes >= _FIXED.size and body[:4] == MAGIC:
        _, n, pickle_len = _FIXED.unpack_from(body, 0)          # a hint, re-read below
        want = min(_FIXED.size + n * _ENTRY.size + pickle_len, body.nbytes)
    else:
        want = body.nbytes                                      # no buffers: copy it all
    checked = auth.verify_view(view, want)
    if checked.__class__ is not tuple:
        body.release()
        return checked                      # _auth.Rejected (see verify_view)
    prefix, rest = checked
    if prefix[:4] != MAGIC:
        if rest.nbytes:
            raise BadMessage("authenticated message changed while being read")
        return decode(prefix)
    _, n, pickle_len = _FIXED.unpack_from(prefix, 0)
    table_end = _FIXED.size + n * _ENTRY.size
    if table_end + pickle_len != len(prefix):
        raise BadMessage("authenticated message changed while being read")
    size = len(prefix) + rest.nbytes
    floor, buffers = len(prefix), []
    for i in range(n):
        off, length = _ENTRY.unpack_from(prefix, _FIXED.size + i * _ENTRY.size)
        if off < floor or off + length > size:
            raise BadMessage(f"corrupt fastmq frame: buffer at {off} (+{length}) "
                             f"outside the message of {size} bytes")
        buffers.append(rest[off - len(prefix):off - len(prefix) + length])
        floor = off + length
    return _loads(memoryview(prefix)[table_end:], buffers)
