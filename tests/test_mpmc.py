"""N producers x M consumers in real processes.

Every message is delivered exactly once, per-producer order is kept as seen by
each consumer, and every payload's checksum is verified in the consumer.
"""
from __future__ import annotations

import collections
import os
import pickle

import pytest

import fastmq

import _workers as W

pytestmark = pytest.mark.timeout(120)

CONFIGS = [(1, 1), (4, 4), (8, 2), (2, 8)]
# total messages per case, by size class (keeps each case a few seconds on 2 cores)
TOTAL = {"tiny": 4000, "medium": 1600, "large": 96}


def run_mpmc(mq, children, tmp_path, *, producers, consumers, per_producer, spec,
             kind, batch=1, queue_kw=None, max_size=None, deadline=90):
    q = mq.Queue(**(queue_kw or {}))
    results = [str(tmp_path / f"consumer-{i}.pickle") for i in range(consumers)]
    cons = [children.start(W.consumer, q, i, kind, batch, results[i], name=f"consumer-{i}")
            for i in range(consumers)]
    prods = [children.start(W.producer, q, p, per_producer, spec, kind, batch, max_size,
                            1000 + p, name=f"producer-{p}")
             for p in range(producers)]
    children.join(deadline, prods)
    for _ in range(consumers):
        if batch > 1:
            q.put(W.STOP if kind == "bytes" else None, timeout=30)
        elif kind == "bytes":
            q.put_bytes(W.STOP, timeout=30)
        else:
            q.put(None, timeout=30)
    children.join(deadline, cons)

    seen = collections.Counter()
    for path in results:
        with open(path, "rb") as f:
            rep = pickle.load(f)
        assert rep["error"] is None, f"consumer {rep['cid']} failed:\n{rep['error']}"
        last = {}
        for pid, seq in rep["got"]:
            assert seq > last.get(pid, -1), (
                f"consumer {rep['cid']}: producer {pid} order broken: {seq} after {last[pid]}")
            last[pid] = seq
            seen[(pid, seq)] += 1
    dups = {k: v for k, v in seen.items() if v != 1}
    assert not dups, f"delivered more than once: {sorted(dups)[:10]}"
    expected = {(p, s) for p in range(producers) for s in range(per_producer)}
    missing = expected - set(seen)
    assert not missing, f"{len(missing)} messages lost, e.g. {sorted(missing)[:10]}"
    assert set(seen) == expected
    # the queue is empty and its accounting agrees
    assert q.qsize() == 0
    st = q.stats()
    assert st["depth"] == 0
    return q


@pytest.mark.parametrize("spec", ["tiny", "medium", "large"])
@pytest.mark.parametrize("kind", ["bytes", "pickle"])
@pytest.mark.parametrize("producers,consumers", CONFIGS, ids=[f"{p}x{c}" for p, c in CONFIGS])
def test_exactly_once_in_order(mq, children, tmp_path, producers, consumers, kind, spec):
    per = max(1, TOTAL[spec] // producers)
    run_mpmc(mq, children, tmp_path, producers=producers, consumers=consumers,
             per_producer=per, spec=spec, kind=kind)


@pytest.mark.parametrize("producers,consumers", [(1, 1), (4, 4)], ids=["1x1", "4x4"])
@pytest.mark.parametrize("kind", ["bytes", "pickle"])
def test_batches_exactly_once_in_order(mq, children, tmp_path, producers, consumers, kind):
    """put_many / get_many across processes keep the same guarantees."""
    run_mpmc(mq, children, tmp_path, producers=producers, consumers=consumers,
             per_producer=3000 // producers, spec="tiny", kind=kind, batch=17,
             queue_kw={"maxsize": 64})


@pytest.mark.parametrize("producers,consumers", [(1, 1), (4, 4), (2, 8)],
                         ids=["1x1", "4x4", "2x8"])
def test_mixed_size_storm(mq, children, tmp_path, producers, consumers):
    """Mixed sizes with a tiny block pool and a tiny ring: the pool is exhausted
    (producers block on bytes, not only on slots) and the ring wraps many times."""
    max_size = 256 * 1024
    geometry = {"maxsize": 8, "max_message_size": max_size, "capacity_bytes": 1024 * 1024}
    # the geometry really exhausts the pool: big messages fill it before the slots
    probe = mq.Queue(**geometry)
    n = 0
    with pytest.raises(fastmq.Full):
        for n in range(1, 9):
            probe.put_bytes(b"p" * 250_000, block=False)
    assert n - 1 < 8, "capacity_bytes did not limit the queue before maxsize did"
    probe.close()
    per = 2400 // producers
    q = run_mpmc(mq, children, tmp_path, producers=producers, consumers=consumers,
                 per_producer=per, spec="mixed", kind="bytes", max_size=max_size,
                 queue_kw=geometry)
    st = q.stats()
    # the ring of 8 slots wrapped hundreds of times
    assert st["enqueued"] == producers * per + consumers
    assert st["dequeued"] == producers * per + consumers
    assert st["enqueued"] >= 100 * st["capacity"]


def test_mixed_size_storm_pickled_batches(mq, children, tmp_path):
    max_size = 256 * 1024
    run_mpmc(mq, children, tmp_path, producers=4, consumers=4, per_producer=400,
             spec="mixed", kind="pickle", batch=5, max_size=max_size - 200,
             queue_kw={"maxsize": 8, "max_message_size": max_size,
                       "capacity_bytes": 1024 * 1024})
