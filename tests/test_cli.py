"""The ``fastmq`` command line against real named queues, in subprocesses.

Exit codes: 0 ok, 1 error with a one-line message and no traceback,
2 usage.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

import fastmq
from conftest import assert_one_line_error, watch_until_removed

# The children must import the very fastmq this process imported (the
# installed one, with its compiled core) -- not the bare source tree, which
# has no extension after a plain `pip install .` and would fall back to the
# pure backend.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastmq.__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fmq(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "fastmq", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


@pytest.fixture
def named():
    """A fresh named queue holding 3 messages; unlinked afterwards."""
    name = f"clitest-{uuid.uuid4().hex[:10]}"
    q = fastmq.Queue.create(name, maxsize=64)
    for i in range(3):
        q.put_bytes(b"x" * (i + 1))
    yield name
    q.close()
    try:
        fastmq.Queue.unlink(name)
    except FileNotFoundError:
        pass


def test_version():
    res = fmq("--version")
    assert res.returncode == 0
    assert fastmq.__version__ in res.stdout


def test_no_command_is_usage_error():
    res = fmq()
    assert res.returncode == 2
    assert "usage" in res.stderr


def test_unknown_command_and_missing_argument_are_usage_errors():
    assert fmq("frobnicate").returncode == 2
    assert fmq("stat").returncode == 2
    assert fmq("rm").returncode == 2


def test_ls_shows_queue_with_depth_and_owner(named):
    res = fmq("ls")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    row = next(r for r in rows if r and r[0] == named)
    assert row[1] == "3"                       # depth
    assert row[-1] == "ok"
    import pwd
    assert pwd.getpwuid(os.getuid()).pw_name in " ".join(row)


def test_ls_survives_a_segment_it_cannot_open():
    name = f"clitest-bad-{uuid.uuid4().hex[:8]}"
    path = f"/dev/shm/fastmq-q-{name}"
    with open(path, "wb") as f:
        f.write(b"\x00garbage" * 100)
    try:
        res = fmq("ls")
        assert res.returncode == 0, res.stderr
        row = next(line for line in res.stdout.splitlines() if line.startswith(name))
        assert "Corrupt" in row or "Error" in row, row
    finally:
        os.unlink(path)


def test_stat(named):
    res = fmq("stat", named)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for key in ("depth", "capacity", "enqueued", "dequeued", "bytes_in_use", "producers",
                "consumers", "redelivered", "abandoned", "dead_lettered"):
        assert key in out
    depth_line = next(line for line in out.splitlines() if line.split()[:1] == ["depth"])
    assert depth_line.split()[1] == "3"


def test_stat_watch_refreshes_until_interrupted(named):
    p = subprocess.Popen([sys.executable, "-m", "fastmq", "stat", named, "--watch",
                          "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    try:
        time.sleep(1.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
    assert p.returncode == 0, err
    assert out.count("queue " + named) >= 2          # refreshed at least once
    assert "Traceback" not in err


def test_stat_missing_queue_is_one_line_error():
    assert_one_line_error(fmq("stat", f"nope-{uuid.uuid4().hex[:8]}"), "no fastmq queue")


@pytest.mark.parametrize("bad", ["../etc/passwd", ".hidden", "a/b", "x" * 300])
def test_bad_names_are_one_line_errors(bad):
    assert_one_line_error(fmq("stat", bad), "invalid queue name")
    assert_one_line_error(fmq("rm", bad), "invalid queue name")


def test_pending(named):
    res = fmq("pending", named)
    q = fastmq.Queue.open(named)
    has_pending = hasattr(q, "pending")
    q.close()
    if has_pending:
        assert res.returncode == 0, res.stderr
    else:
        assert_one_line_error(res, "pending")


def test_pending_missing_queue():
    assert_one_line_error(fmq("pending", f"nope-{uuid.uuid4().hex[:8]}"))


def test_rm(named):
    res = fmq("rm", named)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(f"/dev/shm/fastmq-q-{named}")
    with pytest.raises(fastmq.QueueNotFound):
        fastmq.Queue.open(named)
    assert_one_line_error(fmq("rm", named), "no fastmq queue")


def test_bench_usage_errors():
    assert fmq("bench", "--scenarios", "no-such-scenario").returncode == 2
    assert fmq("bench", "--peers", "no-such-peer").returncode == 2
    assert fmq("bench", "--repeat", "0").returncode == 2


def test_bench_list():
    res = fmq("bench", "--list")
    assert res.returncode == 0
    assert "1x1-bytes-64" in res.stdout and "mp-queue" in res.stdout


# ------------------------------------------------ units, machine-readable output

def test_human_bytes():
    from fastmq.cli import human_bytes
    assert human_bytes(0) == "0B"
    assert human_bytes(1023) == "1023B"
    assert human_bytes(1536) == "1.5KiB"
    assert human_bytes(64 << 20) == "64.0MiB"
    assert human_bytes(3 << 40) == "3.0TiB"
    assert human_bytes(None) == "?"


def test_ls_sizes_in_human_units(named):
    import re
    res = fmq("ls")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = lines[0].split()
    row = next(line.split() for line in lines if line.split()[:1] == [named])
    for column in ("MEMORY", "CAP"):
        size = row[header.index(column)]
        assert re.fullmatch(r"\d+(\.\d)?(B|KiB|MiB|GiB|TiB)", size), (column, size)
    assert row[header.index("FILL")] == f"{100 * 3 / 64:.0f}%"


def test_ls_json(named):
    import json
    res = fmq("ls", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    mine = [q for q in doc["queues"] if q["name"] == named]
    assert len(mine) == 1, doc
    q = mine[0]
    assert (q["depth"], q["capacity"], q["status"]) == (3, 64, "ok")
    assert isinstance(q["size_bytes"], int) and q["size_bytes"] > 0
    # resident memory, not the sparse file's apparent size
    assert 0 < q["memory_bytes"] <= q["size_bytes"], q
    assert isinstance(doc["exchanges"], list)


def test_stat_says_no_rather_than_none(named):
    res = fmq("stat", named)
    assert res.returncode == 0, res.stderr
    assert "None" not in res.stdout
    stalled = next(line for line in res.stdout.splitlines() if line.split()[:1] == ["stalled"])
    assert stalled.split()[1] == "no"


def test_stat_json(named):
    import json
    res = fmq("stat", named, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["queue"] == named
    assert doc["stats"]["depth"] == 3 and doc["stats"]["enqueued"] == 3


def test_stat_prometheus_text_exposition(named):
    import re
    res = fmq("stat", named, "--prometheus")
    assert res.returncode == 0, res.stderr
    typed, values = {}, {}
    for line in res.stdout.splitlines():
        if line.startswith("# TYPE "):
            _, _, metric, kind = line.split()
            assert kind in ("counter", "gauge")
            typed[metric] = kind
        elif line.startswith("# HELP "):
            assert len(line.split(None, 3)) == 4, line
        else:
            m = re.fullmatch(r'(fastmq_[a-z_]+)\{queue="([^"]+)"\} (-?[0-9.e+]+)', line)
            assert m, line
            assert m.group(1) in typed, f"sample before its TYPE line: {line}"
            assert m.group(2) == named
            values[m.group(1)] = float(m.group(3))
    assert values["fastmq_depth"] == 3 and typed["fastmq_depth"] == "gauge"
    assert values["fastmq_enqueued_total"] == 3 and typed["fastmq_enqueued_total"] == "counter"
    assert all(kind == "counter" for m, kind in typed.items() if m.endswith("_total"))
    assert values["fastmq_stalled"] == 0


def test_prometheus_does_not_combine_with_watch(named):
    assert fmq("stat", named, "--watch", "--prometheus").returncode == 2


def test_watch_shows_rates_and_fill_and_notices_removal(named):
    q = fastmq.Queue.open(named)
    try:
        rc, out, err = watch_until_removed(["stat", named, "--watch", "--interval", "0.2"], q,
                                           lambda: fastmq.Queue.unlink(named), env=_env())
    finally:
        q.close()
    assert rc == 1, (out, err)
    assert "was removed" in err and "Traceback" not in err, err
    assert "% full" in out
    enq = [line for line in out.splitlines() if line.split()[:1] == ["enqueued"]]
    assert any(line.endswith("/s)") and "(0.0/s)" not in line for line in enq), enq


def test_rm_removes_every_existing_name_and_reports_the_missing_ones():
    a, c = (f"clitest-rm-{uuid.uuid4().hex[:8]}" for _ in range(2))
    missing = f"clitest-missing-{uuid.uuid4().hex[:8]}"
    for name in (a, c):
        fastmq.Queue.create(name).close()
    try:
        res = fmq("rm", a, missing, c)
        assert_one_line_error(res, repr(missing))
        assert repr(a) not in res.stderr and repr(c) not in res.stderr
        for name in (a, c):
            with pytest.raises(fastmq.QueueNotFound):
                fastmq.Queue.open(name)
    finally:
        for name in (a, c):
            try:
                fastmq.Queue.unlink(name)
            except fastmq.QueueNotFound:
                pass


def test_every_argument_has_help_and_defaults_are_shown():
    import argparse
    from fastmq.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        for action in p._actions:
            if action.dest in ("help", "shm_dir"):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
    res = fmq("stat", "--help")
    assert res.returncode == 0
    assert "(default: 1.0)" in res.stdout
