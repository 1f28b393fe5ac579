"""Choosing between the two ring implementations.

* ``native`` -- ``fastmq._core``, the C core behind a Cython binding.
* ``pure``   -- ``fastmq._pure.ring``, a pure-Python fallback with the same
  behaviour (slower; for platforms without a compiler and for cross-checking).

``FASTMQ_BACKEND=pure|native`` in the environment forces one at import time;
otherwise native is used when it can be imported, else pure. Asking for native
when the extension cannot be imported is an ImportError that says why and how
to fix it, rather than a silent fallback the user did not ask for.

Where the native backend is expected (Linux) but cannot be loaded and nothing
was forced, fastmq falls back to pure with one ``RuntimeWarning`` per process
that names the cause: the fallback works, but is many times slower, and a
silent slowdown is the worst way to learn that a build went wrong. Elsewhere
(macOS, Windows) pure is the only backend and there is nothing to warn about.

Internal API for tests: ``ring_module("pure")`` / ``ring_module("native")``
return a backend's module regardless of the selection, so one test process can
run every behaviour test against both (``Queue(..., _backend="pure")``).
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

BACKENDS = ("native", "pure")
_MODULES = {"native": "fastmq._core", "pure": "fastmq._pure.ring"}
_FIX = "reinstall fastmq with a C compiler available, or set FASTMQ_BACKEND=pure"


def ring_module(name: str):
    """Import and return the ring module of backend ``name``."""
    if name not in _MODULES:
        raise ValueError(f"unknown fastmq backend {name!r}; expected one of {BACKENDS}")
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        if name != "native":
            raise
        raise ImportError(
            f"the native fastmq backend (fastmq._core) cannot be imported: {exc}; "
            f"{_FIX}") from exc


def native_available() -> bool:
    try:
        ring_module("native")
    except ImportError:
        return False
    return True


def select_backend() -> str:
    """The backend chosen by the environment (see module docstring)."""
    forced = os.environ.get("FASTMQ_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ImportError(
                f"FASTMQ_BACKEND={forced!r} is not a fastmq backend; "
                "use 'native' or 'pure' (or unset it for the default)")
        ring_module(forced)          # raises the explanatory ImportError
        return forced
    try:
        ring_module("native")
    except ImportError as exc:
        _warn_native_missing(exc)
        return "pure"
    return "native"


_warned = False


def _warn_native_missing(exc: ImportError) -> None:
    global _warned
    if _warned or not sys.platform.startswith("linux"):
        return
    _warned = True
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    warnings.warn(
        f"fastmq: the native backend (the C core, fastmq._core) could not be loaded "
        f"({type(cause).__name__}: {cause}); using the pure-Python backend, which is "
        f"much slower. To fix: {_FIX.replace(', or set FASTMQ_BACKEND=pure', '')}. "
        f"Set FASTMQ_BACKEND=pure to use the pure backend without this warning.",
        RuntimeWarning, stacklevel=2)


# Resolved once at import, like the documented ``fastmq.backend``.
DEFAULT = select_backend()


def resolve(name=None):
    """(backend name, ring module) for ``name``, or for the default if None."""
    name = DEFAULT if name is None else name
    return name, ring_module(name)
