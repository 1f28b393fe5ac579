"""pytest-benchmark micro benchmarks: per-operation costs in ONE process.

Run them with::

    pytest benchmarks --benchmark-only            # all
    pytest benchmarks --benchmark-only -k fastmq  # only fastmq's rows

They are not part of the test suite (``testpaths = ["tests"]`` in pyproject.toml);
this conftest makes ``benchmarks/`` a root of its own. The channels come from the
same adapters (``fastmq._bench.peers``) and message builders
(``fastmq._bench.payloads``) as ``fastmq bench``, so both measure the same calls.
For cross-process throughput and latency use ``fastmq bench``.
"""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
try:  # a source checkout that was not pip-installed
    import fastmq  # noqa: F401
except ImportError:
    sys.path.insert(0, SRC)

pytest.importorskip("pytest_benchmark", reason="pip install pytest-benchmark (or fastmq[bench])")

from fastmq._bench import peers  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.benchmark)


@pytest.fixture
def channel():
    """``channel(peer_name, mode, size, depth=1024)`` -> (sender, receiver) of one
    1x1 channel in this process; everything is closed at teardown."""
    made = []

    def make(name, mode, size, depth=1024):
        peer = peers.PEERS[name](1, 1, mode, size, depth)
        made.append(peer)
        receiver = peer.receiver(0)     # zmq: bind before the sender connects
        sender = peer.sender(0)
        made.append(sender)
        made.append(receiver)
        return sender, receiver
    yield make
    for obj in reversed(made):
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - teardown is best effort
            pass
