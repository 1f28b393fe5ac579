"""Queue names and the shared-memory segment names they map to.

A user-visible queue name becomes a file name under /dev/shm, so it is checked
strictly *before* it reaches the file system: no slashes, no leading dot, no
empty name, nothing that could escape /dev/shm or collide with hidden files.

    named queue "orders"   ->  segment "fastmq-q-orders"
    anonymous queue        ->  segment "fastmq-anon-<pid>-<16 random hex digits>"

The pid in anonymous names is only a debugging aid (who made this segment?);
lifetime is decided by file locks (see ``_lifetime``), never by the pid.
"""
from __future__ import annotations

import os
import re
import secrets

NAMED_PREFIX = "fastmq-q-"
ANON_PREFIX = "fastmq-anon-"
TMP_PREFIX = "fastmq-tmp-"          # a segment being initialized (see _lifetime)
MAX_NAME_LENGTH = 200
MAX_SEGMENT_LENGTH = 250            # the C core's limit too

_VALID_NAME = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_NAME_LENGTH)
_VALID_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,%d}" % (MAX_SEGMENT_LENGTH - 1))


def validate_name(name) -> str:
    """Return ``name`` unchanged if it is a legal queue name, else raise.

    TypeError for a non-string, ValueError (with the rule spelled out) for
    anything else that is not 1-200 characters of ``[A-Za-z0-9._-]`` or that
    starts with a dot.
    """
    if not isinstance(name, str):
        raise TypeError(f"queue name must be a str, not {type(name).__name__}")
    if not _VALID_NAME.fullmatch(name):
        if not name:
            problem = "it is empty"
        elif len(name) > MAX_NAME_LENGTH:
            problem = f"it is {len(name)} characters long"
        else:
            bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
            problem = "it contains " + ", ".join(repr(c) for c in bad)
        raise ValueError(
            f"invalid queue name {name!r}: {problem}; a name is 1-{MAX_NAME_LENGTH} "
            "characters of letters, digits, '.', '_' and '-', not starting with '.'")
    if name.startswith("."):
        raise ValueError(
            f"invalid queue name {name!r}: it must not start with '.'")
    return name


def validate_segment(segment) -> str:
    """Return ``segment`` if it is a legal /dev/shm segment name, else raise
    ``ValueError``: 1-250 characters of ``[A-Za-z0-9._-]`` not starting with
    a dot -- so a name from a pickle can never reach outside /dev/shm."""
    if not isinstance(segment, str):
        raise TypeError(f"segment name must be a str, not {type(segment).__name__}")
    if not _VALID_SEGMENT.fullmatch(segment):
        raise ValueError(f"invalid segment name {segment!r}: use 1-{MAX_SEGMENT_LENGTH} "
                         "characters of [A-Za-z0-9._-], not starting with '.'")
    return segment


def segment_for(name) -> str:
    """The /dev/shm segment name of the named queue ``name`` (validated)."""
    return NAMED_PREFIX + validate_name(name)


def anonymous_segment() -> str:
    """A fresh, unguessable segment name for an anonymous queue."""
    return f"{ANON_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def queue_name_of(segment: str):
    """The user-visible name of a named segment, or None for an anonymous one."""
    if segment.startswith(NAMED_PREFIX):
        return segment[len(NAMED_PREFIX):]
    return None
