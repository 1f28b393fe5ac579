"""The shared-memory API behaviours, run again on a durable ``file://`` queue.

The test functions are those of ``test_api``, ``test_acks`` and
``test_blocking``, collected here a second time under the "file" location
only (``conftest``: the native core on a directory on a real filesystem;
``mq.Queue()`` there is a uniquely named durable queue). What does not apply
to a named durable queue is deselected below, each with its reason.
"""
from __future__ import annotations

import pytest

import test_acks as _acks
import test_api as _api
import test_blocking as _blocking

pytestmark = [pytest.mark.timeout(180), pytest.mark.backends("file")]

#: test name -> why it does not apply to a durable queue
NOT_ON_FILE = {
    "test_backend_env_var_selects_backend": "FASTMQ_BACKEND picks a shared-memory ring",
    "test_named_queue_file_mode": "looks in /dev/shm; test_durable.py checks the file's mode",
    "test_cli_pending_lists_leased_messages": "its child gets FASTMQ_BACKEND=<backend>; "
                                              "test_durable.py runs the CLI on file://",
    "test_late_ack_races_expiry_exactly_one_outcome":
        "it kills its redeliverer at a random moment and then asserts no duplicate; a durable "
        "requeue holds its entry across a flush (milliseconds, not nanoseconds), and a kill "
        "there leaves the documented at-least-once duplicate",
    "test_taker_killed_mid_lease_loses_and_duplicates_nothing":
        "its child gets FASTMQ_BACKEND=<backend>; test_durable.py kills takers at the same "
        "crash points on file://",
}


def _collect(module):
    for name in dir(module):
        if name.startswith("test_") and callable(getattr(module, name)):
            if name in NOT_ON_FILE:
                continue
            globals()[name] = getattr(module, name)


for _m in (_api, _acks, _blocking):
    _collect(_m)
