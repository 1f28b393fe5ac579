"""Portability of the pure backend and of backend selection.

* ``FASTMQ_SHM_DIR`` moves the pure backend's files (queues, anonymous queues,
  exchanges) out of /dev/shm, and processes agree on it;
* where ``os.pread`` is missing (Windows), a queue fails with a typed error;
* where ``/dev/shm`` is missing, the default is a private temporary directory;
* nothing imports a POSIX-only module at module level except the lock shim;
* a Linux process whose native core cannot load gets one RuntimeWarning that
  names the cause, and none when the pure backend was asked for.

Children run with bounded waits (``run_python``).
"""
from __future__ import annotations

import ast
import errno
import json
import os
import textwrap
import uuid

import pytest

from fastmq import _backend, _lifetime
from fastmq._pure import portable, ring as pure_ring

from conftest import run_python

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(_backend.__file__))),
                   "fastmq")


def _env(**extra):
    env = dict(os.environ)
    env.pop("FASTMQ_BACKEND", None)
    env.pop("FASTMQ_SHM_DIR", None)
    env.update(extra)
    return env


def _child(code, env, timeout=60):
    out = run_python(textwrap.dedent(code), env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fastmq_shm_dir_moves_every_pure_file_and_processes_agree(tmp_path):
    shm = tmp_path / "not-dev-shm"          # missing: fastmq creates it
    name = f"porta-{uuid.uuid4().hex[:10]}"
    env = _env(FASTMQ_BACKEND="pure", FASTMQ_SHM_DIR=str(shm))
    made = _child(f"""
        import json, os, fastmq
        named = fastmq.Queue.create({name!r}, maxsize=8)
        named.put("across processes")
        anon = fastmq.Queue()
        anon.put(1)
        ex = fastmq.Exchange.create({name!r} + "-x", "fanout")
        files = sorted(os.listdir(os.environ["FASTMQ_SHM_DIR"]))
        in_dev_shm = [f for f in files if os.path.exists(os.path.join("/dev/shm", f))]
        anon.close()
        after_close = sorted(os.listdir(os.environ["FASTMQ_SHM_DIR"]))
        ex.close()
        named.close()
        print(json.dumps({{"files": files, "in_dev_shm": in_dev_shm,
                           "after_close": after_close, "backend": fastmq.backend}}))
    """, env)
    try:
        assert made["backend"] == "pure"
        assert any(name in f and "-x" not in f for f in made["files"]), made
        assert any(f.startswith("fastmq-x-") for f in made["files"]), made
        assert any(f.startswith("fastmq-anon-") for f in made["files"]), made
        assert made["in_dev_shm"] == []
        # The anonymous queue's last handle closed: its file went away, there.
        assert not any(f.startswith("fastmq-anon-") for f in made["after_close"]), made
        assert not [f for f in os.listdir("/dev/shm") if name in f]

        # Another process with the same FASTMQ_SHM_DIR finds the queue ...
        got = _child(f"""
            import json, fastmq
            q = fastmq.Queue.open({name!r})
            print(json.dumps(q.get(timeout=10)))
            q.close()
        """, env)
        assert got == "across processes"
        # ... one looking in another directory does not.
        other = _child(f"""
            import json, fastmq
            try:
                fastmq.Queue.open({name!r})
                print(json.dumps("found"))
            except fastmq.QueueNotFound:
                print(json.dumps("not found"))
        """, _env(FASTMQ_BACKEND="pure", FASTMQ_SHM_DIR=str(tmp_path / "elsewhere")))
        assert other == "not found"
    finally:
        for f in os.listdir(shm):
            os.unlink(shm / f)


def test_default_directory_without_dev_shm_is_private_and_temporary(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTMQ_SHM_DIR", raising=False)
    monkeypatch.setattr(portable, "NATIVE_SHM_DIR", str(tmp_path / "no-dev-shm"))
    monkeypatch.setattr(portable.tempfile, "gettempdir", lambda: str(tmp_path))
    path = portable.shm_dir()
    assert path == str(tmp_path / f"fastmq-{os.getuid()}")
    assert os.path.isdir(path)
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_default_directory_on_linux_is_dev_shm(monkeypatch):
    monkeypatch.delenv("FASTMQ_SHM_DIR", raising=False)
    assert portable.shm_dir() == "/dev/shm"
    monkeypatch.setenv("FASTMQ_SHM_DIR", "   ")            # blank: not set
    assert portable.shm_dir() == "/dev/shm"


def test_no_positional_io_is_a_typed_error_not_a_crash(monkeypatch):
    monkeypatch.delattr(os, "pread")
    segment = f"fastmq-porta-{uuid.uuid4().hex[:10]}"
    with pytest.raises(OSError) as info:
        pure_ring.Ring.create(segment, maxsize=4, max_message_size=1024,
                              capacity_bytes=1 << 16)
    assert info.value.errno == errno.ENOSYS and "os.pread" in str(info.value)
    with pytest.raises(OSError, match="os.pread"):
        pure_ring.Ring.open(segment)
    assert not os.path.exists(_lifetime.segment_path(segment))


def test_only_the_lock_shim_imports_posix_only_modules():
    posix_only = {"fcntl", "termios", "pwd", "grp", "resource", "msvcrt"}
    offenders = []
    for root, _dirs, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            if path.endswith(os.path.join("_pure", "portable.py")):
                continue
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in tree.body:           # module level only
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module.split(".")[0]]
                offenders += [f"{os.path.relpath(path, PKG)}: {n}"
                              for n in names if n in posix_only]
    assert offenders == []


def test_shim_locks_exclude_like_flock(tmp_path):
    path = str(tmp_path / "lockme")
    a = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    b = os.open(path, os.O_RDWR)
    try:
        portable.flock_shared(a)
        portable.flock_try(b, exclusive=False)          # shared + shared: fine
        portable.funlock(b)
        with pytest.raises(BlockingIOError):
            portable.flock_try(b, exclusive=True)       # shared held by a
        portable.funlock(a)
        portable.flock_try(b, exclusive=True)
    finally:
        os.close(a)
        os.close(b)


_NO_CORE = """
    import json, sys, warnings
    sys.modules["fastmq._core"] = None        # as if the extension failed to load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastmq
        from fastmq import _backend
        _backend.select_backend()            # asked again: still one warning
    print(json.dumps({"backend": fastmq.backend,
                      "warnings": [(w.category.__name__, str(w.message)) for w in caught]}))
"""


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="native is expected on Linux only")
def test_missing_native_core_warns_once_naming_the_cause():
    got = _child(_NO_CORE, _env())
    assert got["backend"] == "pure"
    assert len(got["warnings"]) == 1, got
    category, message = got["warnings"][0]
    assert category == "RuntimeWarning"
    assert "fastmq._core" in message and "ModuleNotFoundError" in message
    assert "FASTMQ_BACKEND=pure" in message


def test_no_warning_when_pure_is_asked_for():
    got = _child(_NO_CORE, _env(FASTMQ_BACKEND="pure"))
    assert got == {"backend": "pure", "warnings": []}


def test_the_command_line_follows_fastmq_shm_dir(tmp_path):
    import subprocess
    import sys
    shm = tmp_path / "cli-shm"
    name = f"porta-cli-{uuid.uuid4().hex[:10]}"
    env = _env(FASTMQ_BACKEND="pure", FASTMQ_SHM_DIR=str(shm))
    env["PYTHONPATH"] = os.path.dirname(PKG) + os.pathsep + env.get("PYTHONPATH", "")
    _child(f"""
        import json, fastmq
        q = fastmq.Queue.create({name!r}); q.put(1); q.put(2); q.close()
        print(json.dumps(True))
    """, env)

    def fmq(*args):
        return subprocess.run([sys.executable, "-m", "fastmq", *args], capture_output=True,
                              text=True, timeout=60, env=env)
    try:
        res = fmq("ls", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["directory"] == str(shm)
        assert [(q["name"], q["depth"]) for q in doc["queues"]] == [(name, 2)]
        res = fmq("rm", name)
        assert res.returncode == 0, res.stderr
        assert os.listdir(shm) == []
    finally:
        for f in os.listdir(shm):
            os.unlink(shm / f)
