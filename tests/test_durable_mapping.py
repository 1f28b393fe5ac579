"""How a durable queue's file is mapped: without read-around.

With read-around, pages faulted in (notably by the rebuild's scan when a
closed file is opened) enter the page cache in large folios; a put that
stores into one page of such a folio dirties all of it, and the commit's
fdatasync then writes the whole folio. So every durable mapping carries the
"random access" advice, which the kernel shows as the ``rr`` flag of the
mapping in /proc/<pid>/smaps. Checked after create, after an open that
rebuilds (nobody else has the file open) and after an open that joins a
queue in use.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import time

import pytest

import fastmq
from conftest import durable_dir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")


_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


@pytest.fixture
def ddir(request):
    pytest.importorskip("fastmq._core")
    d = os.path.join(durable_dir(), f"mapping-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(d)
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def _flags_of_mappings(path):
    """VmFlags of every mapping of the file at ``path`` in this process (by
    inode: a creator maps the file under its temporary name)."""
    ino = str(os.stat(path).st_ino)
    out, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            if _HEADER.match(line):                  # a mapping: its inode
                current = line.split()[4]
            elif line.startswith("VmFlags:") and current == ino:
                out.append(line.split()[1:])
    return out


def _queue_file(d):
    files = [p for p in glob.glob(os.path.join(d, "*"))
             if os.path.isfile(p) and ".tmp-" not in p and not p.endswith(".rebuild")]
    assert len(files) == 1, files
    return files[0]


def test_durable_mappings_have_no_read_around(ddir):
    url = "file://" + ddir
    q = fastmq.Queue.create("mapped", url=url, sync="commit", maxsize=64,
                            max_message_size=32 << 10, capacity_bytes=1 << 20)
    path = _queue_file(ddir)
    try:
        q.put(b"x" * 5000)
        made = _flags_of_mappings(path)
        assert made and all("rr" in f for f in made), made        # the creator's
    finally:
        q.close()
    assert _flags_of_mappings(path) == []
    q = fastmq.Queue.open("mapped", url=url)                      # alone: rebuilds
    try:
        rebuilt = _flags_of_mappings(path)
        assert rebuilt and all("rr" in f for f in rebuilt), rebuilt
        q2 = fastmq.Queue.open("mapped", url=url)                 # joins a queue in use
        try:
            both = _flags_of_mappings(path)
            assert len(both) == 2 and all("rr" in f for f in both), both
            assert q2.get(timeout=5) == b"x" * 5000
        finally:
            q2.close()
    finally:
        q.close()
