"""Tests of the C core itself (native backend only, by nature).

* A multi-threaded stress of the ring and block pool written in C
  (csrc/fmq_selftest.c), driven from here so it runs under the same build --
  including the AddressSanitizer/UBSan build in CI. Threads hammer one segment
  with inline and block-sized messages; the C driver checks every message
  exactly once, intact, in per-producer order.
* The ring's lap arithmetic (ticket -> slot and lap, a multiply by a
  reciprocal unless the slot count is a power of two) against division.
* A lint of csrc/ for the project's rules: every futex wait has a deadline,
  every C file opens with a header comment, and shared structs are guarded by
  static asserts.
"""
import os
import re
import uuid

import pytest

from fastmq import _backend

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@pytest.fixture
def native_ring():
    core = _backend.ring_module("native")
    made = []

    def make(**kw):
        params = dict(maxsize=64, max_message_size=80_000, capacity_bytes=4 << 20)
        params.update(kw)
        r = core.Ring.create(f"fastmq-anon-ctest-{uuid.uuid4().hex[:12]}", anonymous=True,
                             **params)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nprod,ncons", [(1, 1), (4, 4), (8, 2), (2, 8)])
def test_threaded_ring_stress(native_ring, nprod, ncons):
    # A small ring (64 slots) and a small pool so that the ring wraps thousands
    # of times and producers block on full slots and on an exhausted pool.
    r = native_ring()
    ok, report = r._selftest_stress(nprod, ncons, 20_000 // nprod + 1000, 70_000)
    assert ok, report
    st = r.stats()
    assert st["enqueued"] == st["dequeued"] == nprod * (20_000 // nprod + 1000)
    assert st["depth"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("maxsize", [3, 61, 1000])
def test_threaded_ring_stress_with_a_slot_count_no_power_of_two(native_ring, maxsize):
    # These rings map tickets to slots and laps by the reciprocal multiply,
    # not by a mask and shift; every message must still arrive once, intact.
    r = native_ring(maxsize=maxsize)
    ok, report = r._selftest_stress(3, 3, 6000, 70_000)
    assert ok, report
    st = r.stats()
    assert st["enqueued"] == st["dequeued"] == 3 * 6000
    assert st["depth"] == 0


def test_lap_arithmetic_equals_division_for_every_slot_count_tested():
    # Every slot count up to 2^20 and a million more up to FMQ_MAX_SLOTS
    # (2^24, with its edges), each at lap edges, at the top of the 64-bit
    # ticket range and at pseudo-random tickets.
    core = _backend.ring_module("native")
    ok, report = core._selftest_ticket_lap(1 << 20, 1_000_000, 20261202)
    assert ok, report
    # and a range past the largest ring is refused, with a reason
    assert core._selftest_ticket_lap((1 << 24) + 1, 0, 0) == (
        False, "n_all 16777217 is above FMQ_MAX_SLOTS")


@pytest.mark.timeout(120)
def test_threaded_stress_with_tiny_ring_and_one_block(native_ring):
    # maxsize=1 and a pool of one large block: every message contends.
    r = native_ring(maxsize=1, max_message_size=70_000, capacity_bytes=70_000)
    ok, report = r._selftest_stress(3, 3, 3000, 70_000)
    assert ok, report


def _c_sources():
    return {name: open(os.path.join(CSRC, name)).read()
            for name in sorted(os.listdir(CSRC)) if name.endswith((".c", ".h"))}


def test_every_futex_wait_has_a_deadline():
    # The only place that sleeps on a futex is fmq_wait_on(), and it always
    # passes a timespec; every caller passes a bounded slice.
    srcs = _c_sources()
    for name, text in srcs.items():
        for m in re.finditer(r"syscall\([^;]*FUTEX_WAIT\b[^;]*;", text):
            assert "&ts" in m.group(0), f"{name}: FUTEX_WAIT without a timeout: {m.group(0)}"
        for m in re.finditer(r"fmq_wait_on\(([^;]*)\);", text):
            if name == "fmq_wait.h":
                continue
            assert "slice" in m.group(1), f"{name}: fmq_wait_on without a bounded slice"
    assert "FUTEX_PRIVATE_FLAG" not in srcs["fmq_wait.c"].replace(
        "*without* FUTEX_PRIVATE_FLAG", ""), "futexes must be shared between processes"


def test_every_c_file_has_a_header_comment():
    for name, text in _c_sources().items():
        assert text.lstrip().startswith("/*"), f"{name} must open with a header comment"
        head = text[: text.find("*/")]
        assert len(head.splitlines()) >= 3, f"{name}: header comment too thin"


def test_shared_layout_is_guarded_by_static_asserts():
    layout = _c_sources()["fmq_layout.h"]
    for struct in ("fmq_header", "fmq_slot", "fmq_participant", "fmq_block_meta"):
        assert re.search(rf"_Static_assert\(sizeof\({struct}\)", layout), struct
