"""Fast smoke test of an installed fastmq (a wheel, or an sdist install).

It is the wheel test command of cibuildwheel and of .ci/wheels.sh, so it must
finish in seconds and must not need the source tree. It checks what a wheel
can get wrong and the suite cannot see: that the backend a user gets is the
one this platform should have, that the compiled core actually loads and works
across processes, and that the packaging (entry point, typing files, version)
is complete.

Environment, set by whoever installed the package:

* ``FASTMQ_SMOKE_BACKEND=native|pure`` -- the backend this install must give
  (default: native on Linux, pure elsewhere);
* ``FASTMQ_SMOKE_INSTALLED=1`` -- fastmq must be imported from an installed
  distribution (site-packages), not from a source checkout.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import uuid

import pytest

import fastmq

EXPECTED = os.environ.get("FASTMQ_SMOKE_BACKEND") or (
    "native" if sys.platform.startswith("linux") else "pure")
INSTALLED = os.environ.get("FASTMQ_SMOKE_INSTALLED") == "1"
PKG_DIR = os.path.dirname(os.path.abspath(fastmq.__file__))


def _child_put(name, n):
    q = fastmq.Queue.open(name)
    try:
        q.put_many([("item", i, b"x" * i) for i in range(n)])
    finally:
        q.close()


def test_backend_is_the_one_this_platform_should_have():
    assert fastmq.backend == EXPECTED, (
        f"fastmq.backend is {fastmq.backend!r}, expected {EXPECTED!r} "
        f"(fastmq imported from {PKG_DIR})")
    if EXPECTED == "native":
        from fastmq import _core
        assert os.path.dirname(os.path.abspath(_core.__file__)) == PKG_DIR


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(EXPECTED != "native", reason="the pure backend computes no CRC or MAC in C")
def test_the_core_uses_the_instructions_this_cpu_has():
    # The wheels are compiled by another compiler and runtime library than a
    # local build (clang with zig's); a feature check that answers "no" there
    # would silently leave every wheel on the portable code.
    from fastmq import _core
    flags = _cpu_flags()
    if "sse4_2" in flags:
        assert _core._crc_path() == "sse4.2"
    if "avx2" in flags:
        assert _core._mac_path() != "portable"


@pytest.mark.skipif(not INSTALLED, reason="FASTMQ_SMOKE_INSTALLED=1 not set")
def test_imported_from_an_installed_distribution():
    from importlib import metadata
    assert "site-packages" in PKG_DIR.split(os.sep), PKG_DIR
    assert metadata.version("fastmq") == fastmq.__version__
    files = {str(f).replace("\\", "/") for f in metadata.files("fastmq")}
    for needed in ("fastmq/py.typed", "fastmq/_core.pyi"):
        assert needed in files, f"{needed} missing from the installed distribution"


@pytest.mark.parametrize("backend", sorted({EXPECTED, "pure"}))
def test_round_trip_of_every_kind_of_put(backend):
    with fastmq.Queue(maxsize=64, _backend=backend) as q:
        items = [None, 1, "two", b"three", [4.0], {"five": 5}, b"z" * 200_000]
        for item in items:
            q.put(item)
        assert [q.get(timeout=5) for _ in items] == items
        assert q.put_many(range(10)) == 10
        assert q.get_many(10, timeout=5) == list(range(10))
        q.put_bytes(b"raw")
        assert q.get_bytes(timeout=5) == b"raw"
        with pytest.raises(fastmq.Empty):
            q.get(timeout=0.01)


@pytest.mark.parametrize("backend", sorted({EXPECTED, "pure"}))
def test_named_queue_between_processes(backend, monkeypatch):
    # The child uses the default backend, so force the one under test there.
    monkeypatch.setenv("FASTMQ_BACKEND", backend)
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    q = fastmq.Queue.create(name, maxsize=1000, _backend=backend)
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_child_put, args=(name, 100))
    try:
        child.start()
        got = [q.get(timeout=30) for _ in range(100)]
        assert got == [("item", i, b"x" * i) for i in range(100)]
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        q.close()
        fastmq.Queue.unlink(name, _backend=backend)


def test_command_line_tool_runs():
    out = subprocess.run([sys.executable, "-m", "fastmq", "ls"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr


def test_generic_alias_and_the_import_warning():
    assert fastmq.Queue[int] is fastmq.Queue or fastmq.Queue[int].__origin__ is fastmq.Queue
    env = dict(os.environ)
    env.pop("FASTMQ_BACKEND", None)
    code = "import warnings; warnings.simplefilter('error'); import fastmq"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    if EXPECTED == "pure" and sys.platform.startswith("linux"):
        # A Linux install without the core must say so (here: as an error).
        assert out.returncode != 0 and "RuntimeWarning" in out.stderr, out.stderr
    else:
        assert out.returncode == 0, out.stderr
