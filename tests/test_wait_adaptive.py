"""Waits that spin for a while after short waits still end in sleep.

A waiter spins longer when its recent waits were short (a consumer in a
ping-pong always is) and sleeps at once after long ones. The spinning must
decay: a consumer trained by thousands of sub-microsecond waits that then
blocks on an idle queue costs ~no CPU, and its deadlines still hold. CPU time
is the process's own (``time.process_time``), measured in the child around the
blocked call only; real processes, bounded waits, children reaped by the
``children`` fixture.
"""
from __future__ import annotations

import os
import pickle
import time

import pytest

import fastmq

TOL = 0.5        # seconds a timed call may overrun on a loaded 2-core machine
BURST = 3000     # ping-pong round trips that train the waiter on short waits
BLOCK = 2.0      # seconds the trained consumer then stays blocked
CPU_MAX = 0.05   # CPU seconds allowed for those 2 s (2.5%; ~1 ms measured)


def _report(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def _two_cpus():
    """Two CPUs this process may use, or None: the burst runs on two CPUs when
    it can, as that is where waits are short enough to make a waiter spin longer."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cpus[:2] if len(cpus) >= 2 else None


def _trained_consumer(ping, pong, how, cpu, result_path):
    """Echo BURST messages (every get a short wait), then block once."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    for _ in range(BURST):
        pong.put_bytes(ping.get_bytes(timeout=30))
    out = {}
    # A short deadline right after the burst: the spin phase must not outlast it.
    w0 = time.monotonic()
    try:
        ping.get_bytes(timeout=0.05)
        out["short"] = "got"
    except fastmq.Empty:
        out["short"] = "empty"
    out["short_wall"] = time.monotonic() - w0
    pong.put_bytes(b"trained")      # the parent starts its clock for "forever"
    c0, w0 = time.process_time(), time.monotonic()
    try:
        if how == "timeout":
            ping.get_bytes(timeout=BLOCK)
        else:
            ping.get_bytes()
        out["outcome"] = "got"
    except fastmq.Empty:
        out["outcome"] = "empty"
    out["cpu"] = time.process_time() - c0
    out["wall"] = time.monotonic() - w0
    _report(result_path, out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["timeout", "forever"])
def test_blocked_get_after_a_burst_of_short_waits_costs_no_cpu(mq, children, tmp_path, how):
    ping, pong = mq.Queue(maxsize=4), mq.Queue(maxsize=4)
    res = str(tmp_path / "cpu.pickle")
    cpus = _two_cpus()
    mask = os.sched_getaffinity(0) if cpus else None
    p = children.start(_trained_consumer, ping, pong, how, cpus[1] if cpus else None, res)
    try:
        if cpus:
            os.sched_setaffinity(0, {cpus[0]})
        for i in range(BURST):
            m = i.to_bytes(8, "little")
            ping.put_bytes(m)
            assert pong.get_bytes(timeout=30) == m
    finally:
        if cpus:
            os.sched_setaffinity(0, mask)
    assert pong.get_bytes(timeout=30) == b"trained"
    if how == "forever":
        time.sleep(BLOCK)   # the quantity under test is CPU used while blocked
        ping.put_bytes(b"done")
    children.join(30, [p])
    assert p.exitcode == 0, p.exitcode
    with open(res, "rb") as f:
        r = pickle.load(f)
    assert r["short"] == "empty"
    assert 0.04 <= r["short_wall"] <= 0.05 + TOL, r
    if how == "timeout":
        assert r["outcome"] == "empty"
        assert BLOCK - 0.05 <= r["wall"] <= BLOCK + TOL, r
    else:
        assert r["outcome"] == "got"
        assert r["wall"] >= BLOCK * 0.75, r
    assert r["cpu"] < CPU_MAX, (
        f"after {BURST} short waits, a get blocked for {r['wall']:.2f} s used "
        f"{r['cpu']:.3f} s of CPU")
