"""Shared fixtures for fastmq's behaviour suite.

Every behaviour test takes the ``backend`` fixture (directly or through ``mq``)
and therefore runs once per backend: "native" (the C core, ``fastmq._core``)
and "pure" (``fastmq._pure``).  A missing native extension makes the native
tests FAIL with a message saying how to build it; they are only left out when
``FASTMQ_TEST_BACKENDS`` names the backends to run explicitly
(``FASTMQ_TEST_BACKENDS=pure``).

A module whose tests also apply over Redis opts in to a third backend,
"redis", with ``pytestmark = pytest.mark.backends(*WITH_REDIS)``: its redis
variants run against one private ``redis-server`` per test session (per
xdist worker; see ``redis_support``), started on first use and stopped by pid
at the end. ``FASTMQ_URL`` then names that server for the test and every
child it starts, so ``fastmq.Queue.open(name, _backend=backend)`` goes there;
``mq.Queue()`` (Redis has no anonymous queues) is a uniquely named queue,
deleted at teardown. A test that does not apply over Redis says why with
``not_on_redis(backend, why)``, which skips only its redis variant. Without a
server binary the redis variants FAIL, saying how to get one;
``FASTMQ_TEST_BACKENDS=native,pure`` leaves them out.

Helpers here:

* ``mq``            -- a small factory bound to the backend: ``mq.Queue(...)``,
                       ``mq.create(name, ...)``, ``mq.open(name)``, ``mq.unlink(name)``;
                       every handle it made is closed at teardown and every
                       name it created is unlinked.
* ``qname``         -- a fresh, unique queue name (unlinked at teardown).
* ``where(backend)`` -- the keyword (``_backend=`` or ``url=``) naming it.
* ``not_on_redis``  -- skip the redis variant of a test, saying why.
* ``shm``           -- snapshot/diff helpers for ``/dev/shm`` leftover checks.
* ``run_python``    -- run ``python -c`` in a child with a bounded wait.
* ``ChildGroup``    -- start multiprocessing children, join with a deadline,
                       always reap (terminate, then kill) in ``finally``.
* ``pool_room``     -- how many messages of a size fit in a queue right now.
* ``assert_one_line_error`` -- a ``python -m fastmq`` run failed as the
                       command line promises (exit 1, one line, no traceback).
* ``watch_until_removed`` -- ``fastmq stat --watch`` over traffic, until the
                       queue is removed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "src")
SHM_DIR = "/dev/shm"

# Make ``import fastmq`` work from a source checkout that was not pip-installed,
# and make it work the same way in every child (spawn, forkserver, subprocess):
# children inherit PYTHONPATH.  ``tests`` goes on the path too so that spawn
# children can import ``_workers``.
try:  # pragma: no cover - depends on how the tree was installed
    import fastmq as _probe  # noqa: F401
except ImportError:
    sys.path.insert(0, SRC)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _export_pythonpath():
    import fastmq
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastmq.__file__)))
    parts = [pkg_parent, HERE]
    old = os.environ.get("PYTHONPATH")
    if old:
        parts.append(old)
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


try:
    _export_pythonpath()
except ImportError:  # pragma: no cover - the package is being written
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [SRC, HERE] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


ALL_BACKENDS = ("native", "pure")
#: What a module may opt in to: ``pytestmark = pytest.mark.backends(*WITH_REDIS)``
#: (or the marker on one test). Modules without the marker run on ALL_BACKENDS.
WITH_REDIS = ALL_BACKENDS + ("redis",)
#: "file": the native core on a durable ``file:///dir`` location (a directory
#: on a real filesystem, see ``durable_dir``); modules opt in as for redis.
KNOWN_BACKENDS = WITH_REDIS + ("file",)


def selected_backends():
    env = os.environ.get("FASTMQ_TEST_BACKENDS", "").strip()
    if not env:
        return list(KNOWN_BACKENDS)
    chosen = [b.strip() for b in env.split(",") if b.strip()]
    bad = [b for b in chosen if b not in KNOWN_BACKENDS]
    if bad:
        raise pytest.UsageError(f"FASTMQ_TEST_BACKENDS: unknown backend(s) {bad}; "
                                f"choose from {KNOWN_BACKENDS}")
    return chosen


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*names): the backends this module/test runs on "
                   "(default: native, pure; add 'redis' to run on a private Redis server)")


def pytest_generate_tests(metafunc):
    """Parametrize ``backend`` (and so ``mq``, ``qname``) over the backends the
    module or test opted in to, narrowed by ``FASTMQ_TEST_BACKENDS``."""
    if "backend" not in metafunc.fixturenames:
        return
    for m in metafunc.definition.iter_markers("parametrize"):
        names = m.args[0] if m.args else m.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "backend" in names:            # the test names its own backends
            return
    marker = metafunc.definition.get_closest_marker("backends")
    allowed = marker.args if marker is not None else ALL_BACKENDS
    unknown = [b for b in allowed if b not in KNOWN_BACKENDS]
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown backend(s) {unknown}")
    chosen = [b for b in selected_backends() if b in allowed]
    metafunc.parametrize("backend", chosen, indirect=True)


def require_backend(backend):
    """Fail (not skip) when the backend under test cannot be loaded."""
    if backend in ("native", "file"):
        try:
            import fastmq._core  # noqa: F401
        except ImportError as exc:
            pytest.fail(
                "native backend not built: `import fastmq._core` failed "
                f"({exc!r}). Build it with `pip install -e . --no-build-isolation`, "
                "or run only the pure backend explicitly with FASTMQ_TEST_BACKENDS=pure.",
                pytrace=False)
    elif backend == "redis":
        try:
            import fastmq._redis  # noqa: F401
        except ImportError as exc:
            pytest.fail(f"redis backend not importable ({exc!r}): pip install fastmq[redis], "
                        "or leave redis out with FASTMQ_TEST_BACKENDS=native,pure",
                        pytrace=False)
    else:
        try:
            import fastmq._pure  # noqa: F401
        except ImportError as exc:
            pytest.fail(f"pure backend not importable: {exc!r}", pytrace=False)


_REDIS = {}            # the session's (this worker's) private server, started on first use


@pytest.fixture(scope="session")
def _redis_session():
    """One private Redis server per test session (per xdist worker), started
    only if a redis variant runs; stopped by pid at the end of the session.
    Without a server binary this FAILS with redis_support's message."""
    from redis_support import RedisServer
    server = RedisServer()
    _REDIS["url"] = server.url
    try:
        yield server
    finally:
        _REDIS.pop("url", None)
        server.close()


@pytest.fixture
def backend(request, monkeypatch):
    """The backend name; also exported as FASTMQ_BACKEND for any child.

    For "redis", ``FASTMQ_URL`` names this session's private server instead, so
    that ``fastmq.Queue.open(name, _backend=backend)`` and ``Exchange`` calls in
    the test or any child (which inherit the environment) go to it."""
    b = request.param
    require_backend(b)
    if b == "file":
        monkeypatch.setenv("FASTMQ_BACKEND", "native")
        monkeypatch.setenv("FASTMQ_URL", durable_url())
    elif b == "redis":
        server = request.getfixturevalue("_redis_session")
        monkeypatch.delenv("FASTMQ_BACKEND", raising=False)
        monkeypatch.setenv("FASTMQ_URL", server.url)
    else:
        monkeypatch.delenv("FASTMQ_URL", raising=False)
        monkeypatch.setenv("FASTMQ_BACKEND", b)
    return b


def where(backend):
    """The keyword that puts a named queue/exchange on ``backend``:
    ``{"_backend": b}`` for shared memory, ``{"url": ...}`` for redis and
    for durable files."""
    if backend == "redis":
        return {"url": _REDIS["url"]}
    if backend == "file":
        return {"url": durable_url()}
    return {"_backend": backend}


def _fs_type(path):
    """The filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt, fstype = parts[1], parts[2]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, fstype
    except OSError:
        return None
    return kind


_DURABLE = {}


def durable_dir():
    """A directory on a real (disk) filesystem for durable queues, private to
    this test process: under $FASTMQ_TEST_DURABLE_DIR, /var/tmp or /tmp,
    whichever is not tmpfs/ramfs. Skips (saying why) only where none is."""
    if "dir" not in _DURABLE:
        for root in (os.environ.get("FASTMQ_TEST_DURABLE_DIR"), "/var/tmp", "/tmp"):
            if root and os.path.isdir(root) and _fs_type(root) not in ("tmpfs", "ramfs", None):
                d = os.path.join(root, f"fastmq-durable-tests-{os.getpid()}")
                os.makedirs(d, exist_ok=True)
                _DURABLE["dir"] = d
                break
        else:
            pytest.skip("no directory on a real (non-tmpfs) filesystem for durable queues; "
                        "set FASTMQ_TEST_DURABLE_DIR")
    return _DURABLE["dir"]


def durable_url():
    return "file://" + durable_dir()


def _remove_durable_dir():
    """At the end of the session (pytest_sessionfinish): this process's
    directory of durable queue files goes."""
    d = _DURABLE.get("dir")
    if d and os.path.isdir(d):
        import shutil
        shutil.rmtree(d, ignore_errors=True)


def not_on_redis(backend, why):
    """Skip only the redis variant of a test whose semantics do not apply
    over Redis, saying why; the shared-memory variants still run."""
    if backend == "redis":
        pytest.skip(f"not on redis: {why}")


# ---------------------------------------------------------------- names

def native_only(backend, why):
    """Skip the pure half of a test that is native by nature, saying why."""
    if backend != "native":
        pytest.skip(f"native-only: {why}")


def pool_room(q, size, limit=200):
    """How many ``size``-byte messages fit in ``q`` right now (drained again):
    a block pinned or leaked anywhere shows up as one fewer."""
    import fastmq
    n = 0
    try:
        while n < limit:
            q.put_bytes(b"f" * size, block=False)
            n += 1
    except fastmq.Full:
        pass
    for _ in range(n):
        q.get_bytes(timeout=5)
    return n


def assert_one_line_error(res, *needles):
    """``res`` (a finished ``python -m fastmq`` run) failed the way the command
    line promises: exit 1, one line on stderr starting ``fastmq: error:``, no
    traceback, every needle in that line."""
    assert res.returncode == 1, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr, res.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fastmq: error:"), err
    for n in needles:
        assert n in err, err


def watch_until_removed(argv, q, remove, env=None):
    """``python -m fastmq stat ... --watch`` (``argv``: the words after
    ``fastmq``) while ``q`` carries traffic for 1.5 s, then ``remove()``:
    (returncode, stdout, stderr) once the watch stopped on its own (bounded
    wait; the child is reaped in any case)."""
    p = subprocess.Popen([sys.executable, "-m", "fastmq", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:          # traffic to show a rate of
            q.put_bytes(b"y")
            q.get_bytes(timeout=5)
            time.sleep(0.01)
        remove()
        out, err = p.communicate(timeout=15)        # it must stop on its own
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
    return p.returncode, out, err


def unique_name(tag="t"):
    return f"fmqtest-{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def qname(backend):
    name = unique_name()
    yield name
    _unlink_quietly(backend, name)


def _unlink_quietly(backend, name):
    import fastmq
    try:
        fastmq.Queue.unlink(name, **where(backend))
    except Exception:
        pass
    if backend != "redis":
        # A queue the test damaged (or that fastmq refuses to unlink for any
        # other reason) must not outlive the test either: its file is ours.
        try:
            os.unlink(os.path.join(SHM_DIR, "fastmq-q-" + name))
        except OSError:
            pass


# ---------------------------------------------------------------- queue factory

class MQ:
    """Queue constructors bound to one backend; tracks what it made."""

    def __init__(self, backend):
        import fastmq
        self.fastmq = fastmq
        self.backend = backend
        self.handles = []
        self.names = []

    def Queue(self, *args, **kw):
        """An anonymous queue; on redis (where every queue has a name) a
        uniquely named one, deleted at teardown."""
        if self.backend in ("redis", "file"):
            return self.create(unique_name("anon"), **dict(zip(("maxsize",), args)), **kw)
        q = self.fastmq.Queue(*args, _backend=self.backend, **kw)
        self.handles.append(q)
        return q

    def create(self, name, **kw):
        q = self.fastmq.Queue.create(name, **where(self.backend), **kw)
        self.handles.append(q)
        self.names.append(name)
        return q

    def open(self, name, **kw):
        q = self.fastmq.Queue.open(name, **where(self.backend), **kw)
        self.handles.append(q)
        return q

    def unlink(self, name):
        return self.fastmq.Queue.unlink(name, **where(self.backend))

    def teardown(self):
        for q in self.handles:
            try:
                q.close()
            except Exception:
                pass
        for n in self.names:
            _unlink_quietly(self.backend, n)


@pytest.fixture
def mq(backend):
    m = MQ(backend)
    yield m
    m.teardown()


# ---------------------------------------------------------------- /dev/shm

class Shm:
    dir = SHM_DIR

    @staticmethod
    def listing(prefix="fastmq-"):
        try:
            return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}
        except FileNotFoundError:  # pragma: no cover - not Linux
            return set()

    @staticmethod
    def path(segment):
        return os.path.join(SHM_DIR, segment)

    @classmethod
    def segment_of_named(cls, name):
        """The /dev/shm file of a named queue (contract: ``fastmq-q-<name>``)."""
        exact = f"fastmq-q-{name}"
        if os.path.exists(cls.path(exact)):
            return cls.path(exact)
        hits = sorted(n for n in os.listdir(SHM_DIR) if n.endswith(name) and "lock" not in n)
        if len(hits) == 1:
            return cls.path(hits[0])
        raise AssertionError(f"cannot find the segment of queue {name!r} in {SHM_DIR}: {hits}")


@pytest.fixture
def shm():
    return Shm


def segment_name(q):
    """The /dev/shm segment name behind a handle (contract: Ring.name)."""
    for path in (("_ring", "name"), ("ring", "name"), ("segment",), ("_segment",)):
        obj = q
        try:
            for attr in path:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if isinstance(obj, str) and obj.startswith("fastmq-"):
            return obj
    raise AssertionError(f"cannot find the segment name of {q!r}; "
                         "expected q._ring.name (the Ring contract's `name`)")


# ---------------------------------------------------------------- children

def python_cmd():
    return [sys.executable, "-c"]


def run_python(code, *, timeout=30, env=None, check_signal=True):
    """Run ``python -c code`` with a bounded wait; return CompletedProcess.

    The child is killed on timeout (and the test fails).  With ``check_signal``
    a death by signal (negative returncode) fails the test with the output.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.Popen(python_cmd() + [textwrap.dedent(code)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check_signal and res.returncode < 0:
        pytest.fail(f"child died from signal {-res.returncode} "
                    f"({signal.Signals(-res.returncode).name})\n"
                    f"stdout:\n{out}\nstderr:\n{err}")
    return res


@pytest.fixture
def py():
    return run_python


class ChildGroup:
    """multiprocessing children with bounded joins; always reaped."""

    def __init__(self, ctx=None):
        import multiprocessing as mp
        self.ctx = ctx or mp.get_context("fork")
        self.procs = []

    def start(self, target, *args, name=None):
        p = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def join(self, timeout, procs=None):
        """Join all (or ``procs``) within ``timeout`` seconds total; fail otherwise."""
        deadline = time.monotonic() + timeout
        for p in (procs if procs is not None else self.procs):
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                self.reap()
                pytest.fail(f"child {p.name} (pid {p.pid}) still running after {timeout}s")
        bad = [(p.name, p.exitcode) for p in (procs or self.procs) if p.exitcode != 0]
        assert not bad, f"children failed: {bad}"

    def reap(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 3
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(3)


@pytest.fixture
def children():
    g = ChildGroup()
    try:
        yield g
    finally:
        g.reap()


def wait_until(pred, timeout, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# ------------------------------------------------- segments a test leaves behind
#
# Every name a test makes (unique_name) carries this process's pid, so a file
# in /dev/shm named fmqtest-...-<our pid>-... that is still there when the
# session ends was left by one of our tests: its fixtures did not unlink it.
# Each test's new ones are noted with the test that made them; at the end,
# the ones that still exist are reported with those tests, removed (they are
# ours) and fail the session.

_LEFT_BEHIND = {}                 # file name -> nodeid of the test that made it


def _own_test_files():
    mark = f"-{os.getpid()}-"
    try:
        return {n for n in os.listdir(SHM_DIR) if "fmqtest-" in n and mark in n}
    except FileNotFoundError:     # pragma: no cover - not Linux
        return set()


@pytest.fixture(autouse=True)
def _watch_for_left_behind_segments(request):
    before = _own_test_files()
    yield
    for n in _own_test_files() - before:
        _LEFT_BEHIND.setdefault(n, request.node.nodeid)


def pytest_sessionfinish(session, exitstatus):
    _remove_durable_dir()
    left = sorted((t, n) for n, t in _LEFT_BEHIND.items()
                  if os.path.lexists(os.path.join(SHM_DIR, n)))
    if not left:
        return
    lines = [f"{len(left)} file(s) in {SHM_DIR} left behind by tests of this run "
             f"(pid {os.getpid()}); removed now:"]
    for test, n in left:
        lines.append(f"  {n}  <- {test}")
        try:
            os.unlink(os.path.join(SHM_DIR, n))
        except OSError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_sep("=", "segments left behind", red=True)
        for line in lines:
            reporter.write_line(line)
    else:                         # pragma: no cover - no terminal (xdist worker)
        sys.stderr.write("\n".join(lines) + "\n")
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
